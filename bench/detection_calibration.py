"""Would calibrating the scan's trigger searches per task cut false positives? (issue 12)

    python bench/detection_searches.py --zoo /work/zoo-default --split dev --attacks 0 --clean 0 \
        --calibrators --areas 1,2 --tag calib- --shard 0/2     # and 1/2: θ_inj_clean per task
    python bench/detection_searches.py --zoo /work/zoo-default --split dev --attacks 0 \
        --clean 40 --areas 2 --no-blend --tag clean40-2x- --shard 0/2   # and 1/2
    python bench/detection_calibration.py      # the page, from those and the committed dev files

A scan scores an inverted trigger as the best target's suspect ASR minus its baseline, the larger of
the same search on the reference model and the median over the suspect's other targets. On clean
`digits` fine-tunes that score sits higher than on the MNIST tasks (one or two classes are easy to
reach with a patch: docs/efficacy/detection-clean-dev.md). This page adds a third baseline, the
same search on a clean fine-tune of the task, per target, in two forms: (a) θ_inj_clean, the clean
model a scan trains beside BV_inj (what the product could use); (b) every *other* zoo clean
fine-tune of the task, one at a time (a calibrator trained exactly as the suspects were: an upper
bound no scanner has, since it does not know how a suspect was fine-tuned). Point scores (the scan
uses the interval's lower end, so counts here are upper bounds). Dev split only.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mergeshield.measure import others_median

THRESHOLDS = (0.25, 0.3)
SEARCHES = ("patch-1x", "blend-0.1", "patch-2x")
SCAN = ("patch-1x", "blend-0.1")


def load(files: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """Rows by model id, every file's searches merged (rows without searches dropped)."""
    out: dict[str, dict[str, Any]] = {}
    for f in files:
        for r in json.loads(f.read_text()):
            if "asr" in r:
                out.setdefault(r["id"], {**r, "asr": {}})["asr"].update(r["asr"])
    return out


def best(m: dict[str, Any], search: str, calibrator: dict[str, Any] | None
         ) -> tuple[float, int]:
    """(score, target) of ``search`` on ``m``, with the per-target ASR of the same search on
    ``calibrator`` (a row of the files) as a third baseline when given."""
    sus, ref = m["asr"][f"{search}:sus"], m["asr"][f"{search}:ref"]
    cal: Sequence[float] = calibrator["asr"][f"{search}:sus"] if calibrator else [0.0] * len(sus)
    scores = [sus[t] - max(ref[t], others_median(sus, t), cal[t]) for t in range(len(sus))]
    top = max(scores)
    return top, scores.index(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("docs/efficacy"),
                    help="folder of the detection-searches-dev-*.json files")
    ap.add_argument("--out", type=Path, default=Path("docs/efficacy/detection-calibration-dev.md"))
    args = ap.parse_args()
    runs = args.runs
    clean = {k: v for k, v in load(sorted(runs.glob("detection-clean40-dev-*.json")) + sorted(
        runs.glob("detection-searches-dev-clean40-2x-*.json"))).items()
        if v["family"] == "clean"}
    attacks = {k: v for k, v in load(sorted(runs.glob("detection-searches-dev-[0-9].json")))
               .items() if v["family"] not in ("clean", "calibrator")}
    inj = {r["task"]: r for r in load(sorted(runs.glob("detection-searches-dev-calib-*.json")))
           .values()}
    tasks = sorted({m["task"] for m in clean.values()})

    def calibrators(m: dict[str, Any], combo: Sequence[str], how: str
                    ) -> list[dict[str, Any] | None]:
        if how == "none":
            return [None]
        if how == "inj-clean":
            return [inj[m["task"]]]
        return [c for c in clean.values()  # every other clean fine-tune of the task
                if c["task"] == m["task"] and c["id"] != m["id"]
                and all(f"{s}:sus" in c["asr"] for s in combo)]

    def counts(combo: Sequence[str], how: str, thr: float) -> tuple[int, int, int, int]:
        """(false positives, clean trials, detections at the target, attack trials)."""
        fp = n_clean = tp = n_att = 0
        for m in clean.values():
            if not all(f"{s}:sus" in m["asr"] for s in combo):
                continue
            for c in calibrators(m, combo, how):
                n_clean += 1
                fp += any(best(m, s, c)[0] >= thr for s in combo)
        for a in attacks.values():
            for c in calibrators(a, combo, how):
                n_att += 1
                tp += any((lambda b: b[0] >= thr and b[1] == a["target"])(best(a, s, c))
                          for s in combo)
        return fp, n_clean, tp, n_att

    hows = {"none": "none (the scan today)", "inj-clean": "(a) θ_inj_clean of the task",
            "other-clean": "(b) another clean fine-tune of the task, trained as the suspects"}
    lines = ["# Calibrating the trigger searches per task: the dev study", "",
             __doc__.split("\n\n", 2)[2].strip(), "",
             f"{len(attacks)} planted dev attacks (own ASR ≥ 80 %), {len(clean)} clean dev "
             "fine-tunes (patch-2x: those with that search run). A trial: one model with one "
             "calibrator ((b) gives each model several). What was decided from it: "
             "docs/decisions.md, \"Detection: no per-task calibration of the searches\".", "",
             "## Highest clean score per task, patch search (image/81 px)", "",
             "| calibrator | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for how, label in hows.items():
        cells = []
        for t in tasks:
            scores = sorted(best(m, "patch-1x", c)[0] for m in clean.values() if m["task"] == t
                            for c in calibrators(m, ("patch-1x",), how))
            cells.append(f"max {scores[-1]:.2f}, p95 {scores[int(0.95 * len(scores))]:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Flags: false positives and detections at the attack's target", "",
              "| searches | calibrator | " + " | ".join(f"score ≥ {t}" for t in THRESHOLDS)
              + " |", "|---|---|" + "---|" * len(THRESHOLDS)]
    for combo in [(s,) for s in SEARCHES] + [SCAN, SEARCHES]:
        for how, label in hows.items():
            cells = []
            for thr in THRESHOLDS:
                fp, nc, tp, na = counts(combo, how, thr)
                cells.append(f"FP {fp}/{nc} ({fp / nc:.1%}), TP {tp}/{na} ({tp / na:.1%})")
            lines.append(f"| {' or '.join(combo)} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "θ_inj_clean's patch-search ASR per target (the rate a calibrated baseline "
              "would use):", ""]
    for t in tasks:
        lines.append(f"- {t}: " + ", ".join(f"{x:.2f}" for x in inj[t]["asr"]["patch-1x:sus"]))
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
