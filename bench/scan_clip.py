"""A full-size CLIP ViT-B/32 scan, stage by stage: wall time and peak RSS (issue 16).

    python bench/scan_clip.py                      # the ScanRequest defaults (hours on 2 cores)
    python bench/scan_clip.py --reduced            # issue 16's first measurement's settings
    python bench/scan_clip.py --profile            # unit costs of B/32 and the defaults projected

Builds a randomly initialised CLIP ViT-B/32 (openai/clip-vit-base-patch32's shapes, 151 M
parameters) as the base, and a "fine-tune" of it (seeded noise on the vision tower) as the suspect,
each with a character-level tokenizer (the zero-shot head needs one). Then ``pipeline.scan`` runs
twice in fresh subprocesses on one cache folder: **cold** (nothing cached: BV_inj is built, the
reference model's searches run) and **cached** (BV_inj and the reference's searches read from the
cache). Evaluation data: the bundled ``digits`` (sklearn, 8×8, upscaled by the model to 224). The
device is the pipeline's own choice (CUDA when present, bf16 autocast there).

Per stage: the report's ``timings`` (pipeline.py's timer) and the peak RSS inside that stage
(``VmHWM``, reset through ``/proc/self/clear_refs`` whenever the scan's progress names a new
stage, so the fine-tunes ``inject-clean`` / ``inject-bd`` get their own peaks). The ratio is
peak RSS over the suspect's checkpoint bytes (the largest stage peak: resetting VmHWM also
lowers ``ru_maxrss``). Every run records the machine's load averages: the two
cores are shared, and a load above 2 means other processes competed for them.

``--profile`` times one unit of each kind of work on B/32 with MergeShield's own functions (an
evaluation batch, a training step, an inversion step, a classifier build) and multiplies by what
a scan at ``ScanRequest``'s defaults does (counted from the code: see ``default_units``), since a
default-option scan of B/32 on 2 CPU cores does not fit in a working session.

Writes ``docs/benchmarks/scan-clip.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arithmetic import machine, measure  # noqa: E402  (bench/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
# issue 16's first measurement (docs/benchmarks/arithmetic.md before this bench): 259 s
REDUCED = {"recipe": {"epochs": 1, "max_train": 128, "batch_size": 32},
           "lambdas": [0.0, 0.5, 1.0], "inversion": False, "max_eval": 50}


# -- the model ------------------------------------------------------------------------------------
def clip_config_dict() -> dict[str, Any]:
    """openai/clip-vit-base-patch32's shapes, written out by hand (random weights)."""
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 512,
        "logit_scale_init_value": 2.6592,
        "text_config": {"vocab_size": 49408, "hidden_size": 512, "num_hidden_layers": 12,
                        "num_attention_heads": 8, "intermediate_size": 2048,
                        "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1},
        "vision_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                          "intermediate_size": 3072, "patch_size": 32, "image_size": 224,
                          "num_channels": 3, "hidden_act": "quick_gelu"},
    }


def job_clip_make(work: Path) -> dict[str, Any]:
    """``work/base`` (CLIPModel) and ``work/suspect`` (its vision tower moved by seeded noise)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from mergeshield.checkpoints import save_checkpoint
    from mergeshield.models.clip import char_level_vocab

    cfg = clip_config_dict()
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    vocab = char_level_vocab(special_start=49406)
    save_checkpoint(work / "base", state, config=cfg)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(work / "base")
    gen = torch.Generator().manual_seed(1)  # the "fine-tune": seeded noise on the vision tower
    moved = {k: v + 1e-3 * torch.randn(v.shape, generator=gen)
             if k.startswith("vision_model.") and v.is_floating_point() else v
             for k, v in state.items()}
    save_checkpoint(work / "suspect", moved, config=cfg)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(work / "suspect")
    return {"n_params": sum(v.numel() for v in state.values()),
            "vision_params": sum(v.numel() for k, v in state.items()
                                 if k.startswith("vision_model.")),
            "checkpoint_bytes": sum(p.stat().st_size
                                    for p in (work / "suspect").glob("*.safetensors"))}


# -- one scan, in its own process -----------------------------------------------------------------
class StagePeaks:
    """Peak RSS (MiB) per progress stage: VmHWM read and reset whenever a new stage starts."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.current = "start"
        self.t0 = time.perf_counter()
        self._reset()

    @staticmethod
    def _hwm() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    @staticmethod
    def _reset() -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5\n")  # VmHWM := current RSS
        except OSError:
            pass

    def __call__(self, stage: str, _fraction: float) -> None:
        if stage != self.current:
            self.close()
            self.current, self.t0 = stage, time.perf_counter()

    def close(self) -> None:
        name = self.current
        self.peaks[name] = max(self.peaks.get(name, 0.0), round(self._hwm(), 1))
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - self.t0, 3)
        self._reset()


def job_clip_scan(work: Path, cache: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    import torch

    from mergeshield.pipeline import ScanContext, ScanRequest, scan

    request = ScanRequest.model_validate({"suspect": str(work / "suspect"),
                                          "base": str(work / "base"), "evaluation": "digits",
                                          **overrides})
    peaks = StagePeaks()
    t0 = time.perf_counter()
    report = scan(request, ScanContext(out_dir=work / "scan", cache_dir=cache, progress=peaks))
    peaks.close()
    return {"wall_s": time.perf_counter() - t0, "timings": report.timings,
            "stage_peak_rss_mib": peaks.peaks, "progress_stage_s": peaks.seconds,
            "device": report.device, "torch_threads": torch.get_num_threads(),
            "bv_cached": report.injection.cached if report.injection else None,
            "chosen_lambda": report.sweep.chosen_lambda if report.sweep else None,
            "verdict": report.verdict.status, "overrides": overrides,
            "evaluated": report.evaluation.size if report.evaluation else None}


def fix_peak(r: dict[str, Any], checkpoint_bytes: int) -> None:
    """The run's peak RSS is its stages' largest: the reset of VmHWM between stages also lowers
    what ``ru_maxrss`` reports at exit, so ``measure``'s own peak is not used here."""
    r["peak_rss_mib"] = max(r["job"]["stage_peak_rss_mib"].values())
    r["ratio_to_checkpoint"] = r["peak_rss_mib"] * 2**20 / checkpoint_bytes


def run_scans(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    py, me = sys.executable, str(Path(__file__).resolve())
    env = dict(os.environ)
    if args.code:  # another checkout's mergeshield (e.g. the commit before a change)
        env["PYTHONPATH"] = str(args.code)
    print("[CLIP ViT-B/32] building the random base and suspect ...", flush=True)
    made = measure([py, me, "--job", "clip-make", str(work)], cold=False, env=env)["job"]
    runs = {}
    for name in ("cold", "cached"):
        print(f"  scan ({name}) ...", flush=True)
        r = measure([py, me, "--job", "clip-scan", str(work), str(work / "cache"),
                     json.dumps(overrides)], cold=False, env=env)
        fix_peak(r, made["checkpoint_bytes"])
        runs[name] = r
        print(f"  {name}: {r['wall_s']:.0f} s, peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"({r['ratio_to_checkpoint']:.1f}x the checkpoint); stages "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["job"]["timings"].items()), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return {"model": made, "overrides": overrides, "runs": runs, "code": str(args.code or ROOT)}


# -- unit costs and the defaults projected --------------------------------------------------------
def job_profile(work: Path) -> dict[str, Any]:
    """Seconds per unit of B/32 work, each timed with the scan's own functions (second call of
    each): wall, and CPU seconds over the threads (what an idle machine's wall would be, near
    enough, when the cores are shared: the bench's loads run to 10 and more)."""
    import torch

    from mergeshield import checkpoints
    from mergeshield.data import load_task
    from mergeshield.evaluation import predict
    from mergeshield.inversion import InversionConfig, invert_triggers
    from mergeshield.models import family_for
    from mergeshield.training import FinetuneConfig, finetune

    threads = torch.get_num_threads()
    out: dict[str, Any] = {"threads": threads}

    def timed(name: str, per: int, run: Any) -> Any:
        t, c = time.perf_counter(), time.process_time()
        got = run()
        out[f"{name}_wall_s"] = (time.perf_counter() - t) / per
        out[f"{name}_s"] = (time.process_time() - c) / threads / per
        return got

    src = checkpoints.resolve(str(work / "base"))
    family = family_for(src.config, src.config, tokenizer_root=str(src.root),
                        processor=checkpoints.read_json(src, "preprocessor_config.json"))
    task = load_task("digits", seed=0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out["device"] = str(dev)
    with checkpoints.open_checkpoint(src) as base:
        w = family.canonical(base)
        for _ in range(2):
            clf = timed("build", 1, lambda: family.classifier(w, w, task.test.classes).to(dev))
        imgs = task.test.images[:128]
        for _ in range(2):
            timed("eval", len(imgs), lambda: predict(clf, imgs))
        order = [torch.arange(64)] * 2
        timed("train", 128, lambda: finetune(clf, task.train, FinetuneConfig(), order=order))
        inv = InversionConfig(steps=2)
        timed("inversion", 2 * 10 * inv.batch, lambda: invert_triggers(
            clf, task.train.images[:512], task.train.labels[:512], 10, inv))
    return out


def default_units() -> dict[str, dict[str, float]]:
    """What a scan at ``ScanRequest``'s defaults runs on ``digits`` (360 test images, 1437
    train, 10 classes), by kind: images through an inference pass (``eval``), a training step
    (``train``) and an inversion step (``invert``); counted from measure.py, ibvs.py,
    inversion.py and unlearning.py at their defaults. Upper bounds where the code branches:
    6 tracked triggers in the sweep, 3 unlearning rounds each with its searches."""
    test, non_target, train, k = 360, 324, 1437, 10
    probes = 9  # probe_panel: 8 patches + 1 blend
    search = 60 * k * 24  # steps x targets x batch, one inversion search
    searches = 2  # the patch and the faint blend (inversion_small_patch is off)
    return {
        "measure_suspect": {"eval": 2 * test + probes * (test + non_target)},
        "invert_triggers (suspect)": {"invert": searches * search,
                                      "eval": searches * k * non_target},
        "invert_triggers (reference, cached after the first scan)": {
            "invert": searches * search, "eval": searches * k * non_target},
        "injection_bv (built; cached after the first scan)": {
            "train": 2 * 4 * min(train, 2000), "eval": k * non_target},
        "injection probes (ref + suspect)": {"eval": 2 * k * non_target},
        "sweep (9 λ, <= 6 tracked)": {"eval": 9 * (test + 6 * non_target)},
        # repair: rounds x (epochs over max_train rows + a patch, a large patch and a blend search
        # towards each found target) -- one target assumed
        "unlearn (<= 3 rounds)": {"train": 3 * 5 * min(train, 2000),
                                  "invert": 3 * (2 * 60 * 24 + 60 * 48)},
        "measure_cleaned": {"eval": test + (probes + k + searches) * non_target},
    }


def project(unit: dict[str, Any]) -> dict[str, float]:
    per = {"eval": unit["eval_s"], "train": unit["train_s"], "invert": unit["inversion_s"]}
    return {stage: round(sum(n * per[kind] for kind, n in work.items()), 0)
            for stage, work in default_units().items()}


# -- report ---------------------------------------------------------------------------------------
def write_docs(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scan-clip.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = ["# A CLIP ViT-B/32 scan, stage by stage (issue 16)", "",
             f"Written by `bench/scan_clip.py` (last: {m['date']}) on {m['nproc']} CPUs "
             f"({m['cpu']}), {m['ram_gib']} GiB RAM, torch {m['torch']}, no GPU. A randomly "
             "initialised CLIP ViT-B/32 with openai/clip-vit-base-patch32's shapes; evaluation "
             "`digits` (360 test images). **cold**: nothing cached (BV_inj built, the "
             "reference's searches run); **cached**: the same scan again on that cache. Ratio = "
             "peak RSS / the suspect's checkpoint bytes. Load = 1/5/15-min load averages at the "
             "start and end of the run (2 CPUs: above 2, other processes competed).", ""]
    for label, block in result.get("sets", {}).items():
        model = block["model"]
        lines += [f"## {label}", "", f"Code: `{block['code']}`; request overrides "
                  f"`{json.dumps(block['overrides'])}` (everything else: `ScanRequest`'s "
                  f"defaults). Checkpoint {model['checkpoint_bytes'] / 2**20:.0f} MiB.", ""]
        stages: list[str] = []
        for r in block["runs"].values():
            stages += [s for s in r["job"]["timings"] if s not in stages]
        lines += ["| stage | " + " | ".join(f"{n} s | {n} peak MiB" for n in block["runs"])
                  + " |", "|---|" + "---|---|" * len(block["runs"])]
        for s in stages:
            cells = []
            for r in block["runs"].values():
                t = r["job"]["timings"].get(s)
                p = r["job"]["stage_peak_rss_mib"].get(s)
                cells += [f"{t:.1f}" if t is not None else "–", f"{p:.0f}" if p else "–"]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        for key, name in (("wall_s", "total wall"),):
            lines.append(f"| **{name}** | " + " | ".join(
                f"**{r[key]:.0f}** | **{r['peak_rss_mib']:.0f}** ({r['ratio_to_checkpoint']:.1f}x)"
                for r in block["runs"].values()) + " |")
        for n, r in block["runs"].items():
            fine = {k: v for k, v in r["job"]["progress_stage_s"].items()
                    if k.startswith(("inject", "unlearn"))}
            ls, le = r["loadavg_start"], r["loadavg_end"]
            peaks = r["job"]["stage_peak_rss_mib"]
            lines.append(f"\n{n}: load {ls[0]:.1f}/{ls[1]:.1f}/{ls[2]:.1f} → {le[0]:.1f}/"
                         f"{le[1]:.1f}/{le[2]:.1f}; device {r['job']['device']}, "
                         f"{r['job']['torch_threads']} threads; BV_inj cached: "
                         f"{r['job']['bv_cached']}; fine-tunes "
                         + (", ".join(f"{k} {v:.1f} s / {peaks.get(k, 0):.0f} MiB"
                                      for k, v in fine.items()) or "–") + ".")
        lines.append("")
    prof = result.get("profile")
    if prof:
        u = prof["unit"]
        lines += ["## The defaults, projected from unit costs", "",
                  f"Measured on B/32 ({u['device']}, {u['threads']} threads, load "
                  f"{prof['loadavg'][0]:.1f}), in CPU seconds over the threads (the wall "
                  "time of an idle machine, near enough; wall at that load in brackets): "
                  f"evaluation {1 / u['eval_s']:.1f} images/s ({1 / u['eval_wall_s']:.1f}), "
                  f"training {1 / u['train_s']:.2f} images/s ({1 / u['train_wall_s']:.2f}; "
                  f"batch 64), inversion {1 / u['inversion_s']:.2f} images/s "
                  f"({1 / u['inversion_wall_s']:.2f}), a classifier built in "
                  f"{u['build_s']:.1f} s ({u['build_wall_s']:.1f}). Work per stage at "
                  "`ScanRequest`'s defaults: `default_units` in the bench (upper bounds where "
                  "the code branches).", "",
                  "| stage | projected s |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in prof["projected_s"].items()]
        total = sum(prof["projected_s"].values())
        cached = sum(v for k, v in prof["projected_s"].items() if "cached after" not in k)
        lines += [f"| **cold** | **{total:.0f}** |", f"| **cached** | **{cached:.0f}** |", ""]
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]]
    (out / "scan-clip.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reduced", action="store_true",
                   help=f"issue 16's first measurement's settings: {json.dumps(REDUCED)}")
    p.add_argument("--set", dest="overrides", type=json.loads, default=None,
                   help="ScanRequest fields as JSON (instead of the defaults)")
    p.add_argument("--label", help="the section these runs go to (default: from the options)")
    p.add_argument("--profile", action="store_true", help="unit costs and the defaults projected")
    p.add_argument("--code", type=Path, help="run this checkout's mergeshield (PYTHONPATH)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/msbench-clip"))
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--job", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.job:
        name, *rest = args.job
        if name == "clip-make":
            res = job_clip_make(Path(rest[0]))
        elif name == "clip-scan":
            res = job_clip_scan(Path(rest[0]), Path(rest[1]), json.loads(rest[2]))
        elif name == "profile":
            res = job_profile(Path(rest[0]))
        else:
            raise SystemExit(f"unknown job {name}")
        print(json.dumps(res))
        return
    path = args.out / "scan-clip.json"
    result = json.loads(path.read_text()) if path.exists() else {"sets": {}, "notes": []}
    result["machine"] = machine()
    result["notes"] = result.get("notes", []) + args.note
    if args.profile:
        args.workdir.mkdir(parents=True, exist_ok=True)
        py, me = sys.executable, str(Path(__file__).resolve())
        measure([py, me, "--job", "clip-make", str(args.workdir)], cold=False)
        r = measure([py, me, "--job", "profile", str(args.workdir)], cold=False)
        result["profile"] = {"unit": r["job"], "loadavg": r["loadavg_start"],
                             "projected_s": project(r["job"]), "units": default_units()}
        shutil.rmtree(args.workdir, ignore_errors=True)
    else:
        overrides = args.overrides if args.overrides is not None else (
            REDUCED if args.reduced else {})
        label = args.label or ("reduced (issue 16's first settings)" if args.reduced else
                               "defaults" if not overrides else "custom")
        result["sets"][label] = run_scans(args, overrides)
    write_docs(args.out, result)
    print(f"wrote {args.out / 'scan-clip.md'} and scan-clip.json", flush=True)


if __name__ == "__main__":
    main()
