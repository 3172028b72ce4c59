"""Does a long CPU scan keep talking when its stderr is piped? (issue 15)

    python bench/progress_piped.py [--work DIR] [--out docs/progress-piped.md]

Builds a randomly initialised CLIP ViT-B/32 (openai/clip-vit-base-patch32's shapes, 151 M
parameters: ``bench/scan_clip.py``'s builder) and a "fine-tune" of it, and a user's image folder
(JPEGs of mixed sizes, 48–320 px, ten classes from sklearn's digits, ``<class>/*``), then runs
``mergeshield scan`` on them as a user would in CI, stderr piped, and timestamps every line it
prints there. The scan runs the defaults but for a smaller injection and evaluation
(``--inject-max-train 200 --inject-epochs 1 --max-eval 200``) and no trigger inversion (a default
inversion of B/32 on 2 CPU cores alone takes tens of minutes; the printer's ticker is the same in
every stage). Writes the largest silence between two lines and where it fell.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan_clip import job_clip_make  # noqa: E402  (bench/ is not a package)

LIMIT_S = 10.0  # the bound on a silence


def image_folder(root: Path, per_class: int = 30, seed: int = 0) -> int:
    """``root/<digit>/<i>.jpg``: digits upscaled to random sides (mixed sizes, as photos are)."""
    rng = np.random.default_rng(seed)
    d = load_digits()
    written = 0
    for label in range(10):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        rows = np.flatnonzero(d.target == label)[:per_class]
        for i, r in enumerate(rows):
            side = int(rng.integers(48, 321))
            pixels = (d.images[r] / 16 * 255).astype(np.uint8)
            img = Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR)
            img.convert("RGB").save(root / str(label) / f"{i}.jpg", quality=90)
            written += 1
    return written


def run(work: Path) -> dict[str, Any]:
    made = job_clip_make(work)
    n_images = image_folder(work / "photos")
    options = ["--inject-max-train", "200", "--inject-epochs", "1", "--max-eval", "200",
               "--no-inversion", "--device", "cpu"]
    cmd = ["mergeshield", "scan", str(work / "suspect"), "--base", str(work / "base"),
           "--eval", str(work / "photos"), "--out", str(work / "out"), *options]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None and proc.stdout is not None
    lines: list[tuple[float, str]] = []
    for line in proc.stderr:  # read as it comes: the arrival time is what a log shows
        lines.append((time.monotonic() - t0, line.rstrip()))
    stdout = proc.stdout.read()
    rc = proc.wait()
    wall = time.monotonic() - t0
    progress = [(t, s) for t, s in lines if s.startswith("[")]
    stamps = [0.0] + [t for t, _ in progress] + [wall]
    gaps = [(b - a, i) for i, (a, b) in enumerate(zip(stamps, stamps[1:], strict=False))]
    worst, at = max(gaps)
    after = "the start" if at == 0 else progress[at - 1][1]
    return {"command": " ".join(["mergeshield scan SUSPECT --base BASE --eval PHOTOS --out OUT",
                                  *options]),
            "exit_code": rc, "wall_s": round(wall, 1), "model": made, "images": n_images,
            "progress_lines": len(progress), "other_stderr_lines": len(lines) - len(progress),
            "largest_silence_s": round(worst, 1), "silence_after": after,
            "verdict": stdout.strip().splitlines()[:1],
            "first_lines": [f"{t:6.1f} s  {s}" for t, s in progress[:8]],
            "last_lines": [f"{t:6.1f} s  {s}" for t, s in progress[-4:]],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"}


def write(out: Path, r: dict[str, Any]) -> None:
    ok = r["largest_silence_s"] <= LIMIT_S and r["exit_code"] in (0, 1)
    lines = ["# A piped scan of a full-size CLIP ViT-B/32 keeps printing its progress", "",
             f"Written by `python bench/progress_piped.py` ({r['machine']}). "
             f"{r['model']['n_params'] / 1e6:.0f} M parameters, random weights with "
             "openai/clip-vit-base-patch32's shapes, against a folder of "
             f"{r['images']} JPEGs of mixed sizes, on a machine shared with other work "
             "(the scan's own time is not the point here). Command (stderr piped):", "",
             f"    {r['command']}", "",
             f"- exit code {r['exit_code']} (0 / 1: a report), {r['wall_s']:.0f} s in all",
             f"- {r['progress_lines']} progress lines on stderr ({r['other_stderr_lines']} "
             "other lines)",
             f"- **largest silence {r['largest_silence_s']:.1f} s** (after `{r['silence_after']}`)"
             f": {'within' if ok else 'OVER'} the {LIMIT_S:.0f} s the issue asks", "",
             "First and last lines, with their arrival time:", "", "```",
             *r["first_lines"], "...", *r["last_lines"], "```", ""]
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")


def render(out: Path) -> None:
    """The page again from the JSON beside it (``--render``)."""
    write(out, json.loads(out.with_suffix(".json").read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=Path("docs/progress-piped.md"))
    ap.add_argument("--render", action="store_true", help="only rewrite the page from its JSON")
    args = ap.parse_args()
    if args.render:
        render(args.out)
        print(args.out.read_text())
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="progress-piped-"))
    try:
        result = run(work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    write(args.out, result)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
