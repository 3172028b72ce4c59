"""Which trigger search tells a backdoored fine-tune from a clean one? (issue 12, detection)

    python bench/detection_searches.py --zoo /work/zoo-default --split dev --attacks 24 \
        --clean 12 --shard 0/2 &      # and --shard 1/2 beside it: 25 min on 2 cores
    python bench/detection_searches.py --split dev --render    # the page from both shards
    # more searches on the same plantings, merged into the page by model (how the half-area
    # patch was measured, 12 min on 2 cores):
    python bench/detection_searches.py --zoo /work/zoo-default --split dev --areas 0.25,0.5 \
        --no-blend --tag small- --shard 0/2 &      # and 1/2

Plants the efficacy bench's attacks of a split (``mergeshield.efficacy``: the same draws, seeds and
planting) and clean fine-tunes with the split's clean seeds, then runs each search the scan could
use on the suspect and on the reference (the base backbone with the task's head): the free-mask
patch search at 1, 2 and 4 × the scan's area budget (image/81 pixels; ``--areas``) and the
full-image blend search at α = 0.1 (one target at a time, 48 images per step). Each cell is the
scan's score for that search, the best target's suspect ASR minus its baseline (the larger of the
reference's ASR and the median over the suspect's other targets), with that target's ASR and
whether it is the attack's target (*).
Raw per-target ASRs go to ``<out>/detection-searches-<split>-<shard>.json``, the page to
``<out>/detection-searches-<split>.md`` (``detection-differential-*`` with ``--differential``:
other plantings, another machine, so another page).

The differential searches (``--differential '1,2;0.1'``, 2026-12-07, on this session's AMD EPYC:
25 min on 2 cores for 24 drawn + 12 clean) run each search against the reference and beside them
the scan's own two searches on the same plantings; docs/decisions.md, "Detection: differential
searches", reads them.
The warp searches (``--warps 1,2``, 2026-12-07, AMD EPYC; ``--families warp`` draws only warps)
run the scan's own two searches as it runs them and the smooth-warp search of each bound
(``inversion.invert_warps``) on the same plantings, the reference's side once per task:
``detection-warp-*`` files and page; docs/decisions.md, "Detection: a warp search", reads them.
Run it on the dev split only: the test splits are scored once, by ``mergeshield bench efficacy``.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mergeshield.efficacy.attacks import clean_seeds, draw_split
from mergeshield.efficacy.world import Backbone, World, WorldConfig
from mergeshield.evaluation import attack_success_rate
from mergeshield.ibvs import InjectionRecipe, build_injection_bv
from mergeshield.inversion import InversionConfig, invert_blends, invert_triggers, invert_warps
from mergeshield.measure import SEARCH_ROWS, others_median, sample_rows
from mergeshield.models import Classifier

AREAS = (1, 2, 4)  # × the scan's budget, image/81 pixels
BLEND_ALPHA = 0.1
# 48 images per step, as the committed dev page was measured; the scan's batched search uses 24
# per target (the paired dev runs compared the two: docs/decisions.md, "Detection")
BLEND_SEARCH = InversionConfig(batch=48)
EVAL = 1000  # test images, as a default scan
SCAN = ("patch-1x", f"blend-{BLEND_ALPHA}")  # the searches a default scan runs


def searches(w: World, task: str, backbone: Backbone | Classifier,
             areas: tuple[float, ...] = AREAS, blend: bool = True) -> dict[str, list[float]]:
    """ASR per target of each search on the suspect (``:sus``) and the reference (``:ref``);
    a classifier as ``backbone`` (θ_inj_clean) is searched alone, as ``:sus``."""
    data = w.data[task]
    test, opt = data.test.subset(slice(0, EVAL)), sample_rows(data.train, SEARCH_ROWS, 0)
    k = len(test.classes)
    out: dict[str, list[float]] = {}
    models = ((("sus", backbone),) if isinstance(backbone, Classifier) else
              (("sus", w.classifier(task, backbone)), ("ref", w.classifier(task))))
    for name, clf in models:
        for a in areas:
            cfg = InversionConfig(area_fraction=a / 81, seed=0)
            found = invert_triggers(clf, opt.images, opt.labels, k, cfg)
            out[f"patch-{a:g}x:{name}"] = [attack_success_rate(clf, test, found[t], t).rate
                                           for t in range(k)]
        if not blend:
            continue
        blends = [invert_blends(clf, opt.images, opt.labels, [t], BLEND_SEARCH,
                                BLEND_ALPHA)[0] for t in range(k)]  # one target at a time
        out[f"blend-{BLEND_ALPHA}:{name}"] = [attack_success_rate(clf, test, blends[t], t).rate
                                              for t in range(k)]
    return out


_REFERENCE: dict[tuple[str, str], list[float]] = {}  # (task, search) -> the reference's ASRs


def scan_searches(w: World, task: str, backbone: Backbone,
                  warps: tuple[float, ...]) -> dict[str, list[float]]:
    """The scan's own searches as it runs them (``patch-1x``, ``blend-0.1``: every target in one
    batch, 24 images each) and the warp searches (``warp-Dpx``, D pixels at most), on the
    suspect and on the reference (searched once per task and process: it is the same model)."""
    data = w.data[task]
    test, opt = data.test.subset(slice(0, EVAL)), sample_rows(data.train, SEARCH_ROWS, 0)
    k, cfg = len(test.classes), InversionConfig()
    def warp(d: float) -> Any:
        return lambda clf: invert_warps(clf, opt.images, opt.labels, range(k), cfg, d)

    runs: dict[str, Any] = {
        "patch-1x": lambda clf: invert_triggers(clf, opt.images, opt.labels, k, cfg),
        f"blend-{BLEND_ALPHA}": lambda clf: invert_blends(clf, opt.images, opt.labels, range(k),
                                                          cfg, BLEND_ALPHA),
        **{f"warp-{d:g}px": warp(d) for d in warps}}
    out: dict[str, list[float]] = {}
    for side, clf in (("sus", w.classifier(task, backbone)), ("ref", w.classifier(task))):
        for name, run in runs.items():
            if side == "ref" and (task, name) in _REFERENCE:
                out[f"{name}:ref"] = _REFERENCE[(task, name)]
                continue
            found = run(clf)
            out[f"{name}:{side}"] = [attack_success_rate(clf, test, found[t], t).rate
                                     for t in range(k)]
            if side == "ref":
                _REFERENCE[(task, name)] = out[f"{name}:ref"]
    return out


def differential(w: World, task: str, backbone: Backbone, areas: tuple[float, ...],
                 alphas: tuple[float, ...]) -> dict[str, list[float]]:
    """The differential searches (``invert_triggers(..., contrast=reference)``): each trigger
    optimised to send the suspect to the target while the reference keeps the true label.
    ``:sus`` is its ASR on the suspect, ``:ref`` the same trigger's ASR on the reference (not
    the reference's own search): the score is what the fine-tune answers and its base does not.
    Beside them, the scan's own two searches as it runs them (``patch-1x``, ``blend-0.1`` with
    24 images per target), on the same plantings."""
    data = w.data[task]
    test, opt = data.test.subset(slice(0, EVAL)), sample_rows(data.train, SEARCH_ROWS, 0)
    k = len(test.classes)
    sus, ref = w.classifier(task, backbone), w.classifier(task)
    out: dict[str, list[float]] = {}
    found: dict[str, list[Any]] = {}
    for a in areas:
        cfg = InversionConfig(area_fraction=a / 81, seed=0)
        found[f"dpatch-{a:g}x"] = invert_triggers(sus, opt.images, opt.labels, k, cfg,
                                                  contrast=ref)
    for alpha in alphas:  # all targets in one batch, 24 images each, as the scan's blend search
        found[f"dblend-{alpha:g}"] = invert_blends(sus, opt.images, opt.labels, range(k),
                                                   InversionConfig(seed=0), alpha, contrast=ref)
    for name, triggers in found.items():
        for side, clf in (("sus", sus), ("ref", ref)):
            out[f"{name}:{side}"] = [attack_success_rate(clf, test, triggers[t], t).rate
                                     for t in range(k)]
    for side, clf in (("sus", sus), ("ref", ref)):  # the scan's own searches, on the same models
        own = {"patch-1x": invert_triggers(clf, opt.images, opt.labels, k, InversionConfig()),
               f"blend-{BLEND_ALPHA}": invert_blends(clf, opt.images, opt.labels, range(k),
                                                     InversionConfig(), BLEND_ALPHA)}
        for name, triggers in own.items():
            out[f"{name}:{side}"] = [attack_success_rate(clf, test, triggers[t], t).rate
                                     for t in range(k)]
    return out


def calibrator(w: World, task: str) -> Classifier:
    """θ_inj_clean as a default scan builds it beside BV_inj (the default recipe on the task's
    training rows, the head fit on them): the model a scan calibrates its searches with."""
    base = w.zoo.weights(w.base_name, w.ref)
    train = w.data[task].train
    make = w.family.task_classifier(base, train, device=torch.device("cpu"))
    kept: list[Classifier] = []
    build_injection_bv(make, train, InjectionRecipe(), held_out=w.test(task),
                       inspect=lambda clean, _bd: kept.append(clean))
    return kept[0]


def run(zoo: Path, split: str, n_attacks: int, n_clean: int, shard: tuple[int, int], out: Path,
        areas: tuple[float, ...] = AREAS, blend: bool = True, tag: str = "",
        calibrators: bool = False, diff: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
        warps: tuple[float, ...] = (), families: tuple[str, ...] | None = None,
        family: str = "vit") -> None:
    torch.set_num_threads(1)
    w = World(zoo, WorldConfig(family=family))
    i_shard, n_shards = shard
    rows: list[dict[str, object]] = []
    path = out / f"{_prefix(diff, warps)}-{split}-{tag}{i_shard}.json"
    for j, task in enumerate(w.tasks if calibrators else ()):
        if j % n_shards != i_shard:
            continue
        t0 = time.perf_counter()
        rows.append({"id": f"calibrator-{task}", "family": "calibrator", "task": task,
                     "target": None, "asr": searches(w, task, calibrator(w, task), areas, blend),
                     "seconds": round(time.perf_counter() - t0, 1)})
        path.write_text(json.dumps(rows))
        print(rows[-1]["id"], f"{rows[-1]['seconds']} s", flush=True)
    def attack(a: Any) -> dict[str, object]:
        planted = w.plant(a)
        own = w.asr(a.task, planted, w.trigger(a), a.target).rate
        row: dict[str, object] = {"id": a.id, "family": a.family, "task": a.task,
                                  "target": a.target, "own_asr": own, "params": a.params}
        if own >= 0.8:  # the efficacy bench's planting floor
            row["asr"] = (differential(w, a.task, planted, *diff) if diff else
                          scan_searches(w, a.task, planted, warps) if warps else
                          searches(w, a.task, planted, areas, blend))
        return row

    def clean(j: int, seed: int) -> dict[str, object]:
        task = w.tasks[j % len(w.tasks)]
        backbone = w.finetune(task, w.data[task].train, seed)
        return {"id": f"{split}-clean-{j:03d}", "family": "clean", "task": task, "target": None,
                "asr": (differential(w, task, backbone, *diff) if diff else
                        scan_searches(w, task, backbone, warps) if warps else
                        searches(w, task, backbone, areas, blend))}

    drawn = draw_split(split, n_attacks, w.tasks, **({"families": families} if families else {}))
    jobs = [partial(attack, a) for i, a in enumerate(drawn)
            if i % n_shards == i_shard]
    cleans = [partial(clean, j, seed) for j, seed in enumerate(clean_seeds(split, n_clean))
              if j % n_shards == i_shard]
    every = max(1, round(len(jobs) / max(1, len(cleans))))  # clean rows among the attacks, so a
    for n, job in enumerate(cleans):                        # partial run already has both
        jobs.insert(min(len(jobs), (n + 1) * (every + 1) - 1), job)
    for job in jobs:
        t0 = time.perf_counter()
        row = job()
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        path.write_text(json.dumps(rows))
        print(row["id"], f"own ASR {row.get('own_asr', '-')}", f"{row['seconds']} s", flush=True)


def score(sus: list[float], ref: list[float]) -> tuple[float, int, float]:
    """(suspect ASR − baseline, target, suspect ASR) at the target that stands out most."""
    best = (-2.0, -1, 0.0)
    for t, rate in enumerate(sus):
        gap = rate - max(ref[t], others_median(sus, t))  # the scan's baseline (measure._inverted)
        if gap > best[0]:
            best = (gap, t, rate)
    return best


def _prefix(diff: object, warps: object = ()) -> str:
    return ("detection-differential" if diff else "detection-warp" if warps else
            "detection-searches")


def render(split: str, out: Path, page: Path, prefix: str = "detection-searches") -> None:
    by_id: dict[str, dict[str, Any]] = {}  # one row per model, its searches from every file
    for f in sorted(out.glob(f"{prefix}-{split}-*.json")):
        for r in json.loads(f.read_text()):
            if "asr" in r:
                by_id.setdefault(r["id"], {**r, "asr": {}})["asr"].update(r["asr"])
    rows = [r for r in by_id.values() if r["family"] != "calibrator"
            and all(f"{n}:sus" in r["asr"] for n in {k.split(":")[0] for q in by_id.values()
                                                     for k in q["asr"]})]
    rows.sort(key=lambda r: (r["family"] == "clean", r["family"], r["id"]))
    names = sorted({k.split(":")[0] for r in rows for k in r["asr"]})
    lines = [f"# Trigger searches on the `{split}` split: which one separates backdoors from clean "
             "fine-tunes", "",
             f"Written by `python bench/detection_searches.py --split {split} --render"
             + {"detection-differential": " --differential 1,2;0.1",
                "detection-warp": " --warps 1,2"}.get(prefix, "") + "` from "
             f"{len(rows)} models (planted attacks with own ASR ≥ 80 %, and clean fine-tunes). "
             "A cell: the scan's score for that search (best target's suspect ASR − baseline) / "
             "that target's suspect ASR, `*` when it is the attack's target. The scan flags an "
             "inverted trigger at a score ≥ 0.3 (on the interval's lower end) with ASR ≥ 0.5.", "",
             "| model | target | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = []
        for n in names:
            gap, t, rate = score(r["asr"][f"{n}:sus"], r["asr"][f"{n}:ref"])
            cells.append(f"{gap:.2f} / {rate:.2f}{' *' if t == r['target'] else ''}")
        lines.append(f"| {r['id']} | {r['target'] if r['target'] is not None else '–'} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Highest score on a clean fine-tune, and attacks at ≥ 0.3 at their own target:",
              "", "| search | clean max | attacks ≥ 0.3 at the target |", "|---|---|---|"]
    attacks = [r for r in rows if r["family"] != "clean"]

    def flags(r: dict[str, Any], n: str) -> bool:
        s = score(r["asr"][f"{n}:sus"], r["asr"][f"{n}:ref"])
        return s[0] >= 0.3 and s[1] == r["target"]

    for n in names:
        clean = max(score(r["asr"][f"{n}:sus"], r["asr"][f"{n}:ref"])[0]
                    for r in rows if r["family"] == "clean")
        hit = sum(1 for r in attacks if flags(r, n))
        lines.append(f"| {n} | {clean:.2f} | {hit}/{len(attacks)} |")
    ran = [n for n in SCAN if n in names]
    if len(ran) == len(SCAN):  # the scan's searches together (a finding in any)
        hit = sum(1 for r in attacks if any(flags(r, n) for n in ran))
        lines.append(f"| {' or '.join(ran)} (the scan) | – | {hit}/{len(attacks)} |")
        for extra in (n for n in names if n.startswith("warp-")):  # the scan with a warp search
            hit = sum(1 for r in attacks if any(flags(r, n) for n in (*ran, extra)))
            lines.append(f"| the scan or {extra} | – | {hit}/{len(attacks)} |")
    page.write_text("\n".join(lines) + "\n")
    print(page.read_text())


def _differential(arg: str | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if not arg:
        return None
    areas, alphas = arg.split(";")
    return (tuple(float(a) for a in areas.split(",") if a),
            tuple(float(a) for a in alphas.split(",") if a))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path("zoo"))
    ap.add_argument("--split", default="dev")
    ap.add_argument("--attacks", type=int, default=24)
    ap.add_argument("--clean", type=int, default=12)
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--out", type=Path, default=Path("docs/efficacy"))
    ap.add_argument("--areas", default=",".join(map(str, AREAS)),
                    help="patch searches' area budgets, × image/81 pixels")
    ap.add_argument("--no-blend", action="store_true", help="skip the blend search")
    ap.add_argument("--tag", default="", help="written to detection-searches-<split>-<tag><i>.json"
                    " (the page merges every file's searches by model)")
    ap.add_argument("--calibrators", action="store_true",
                    help="also search θ_inj_clean of each task, as a default scan builds it")
    ap.add_argument("--differential", metavar="AREAS;ALPHAS",
                    help="run the differential searches instead (e.g. '1,2,4;0.1,0.2'): patch "
                    "areas × image/81 and blend alphas, each against the reference")
    ap.add_argument("--warps", default="", help="run the scan's searches and warp searches of "
                    "these bounds in pixels instead (e.g. '1,2'; detection-warp-* files)")
    ap.add_argument("--families", default="", help="draw only these attack families")
    ap.add_argument("--family", default="vit", help="the zoo's model family to attack (vit, clip)")
    ap.add_argument("--render", action="store_true", help="only write the page from the shards")
    args = ap.parse_args()
    if not args.render:
        i, n = (int(x) for x in args.shard.split("/"))
        run(args.zoo, args.split, args.attacks, args.clean, (i, n), args.out,
            tuple(float(a) for a in args.areas.split(",")), not args.no_blend, args.tag,
            args.calibrators, _differential(args.differential),
            tuple(float(d) for d in args.warps.split(",") if d),
            tuple(f for f in args.families.split(",") if f) or None, args.family)
    prefix = _prefix(args.differential, args.warps)
    render(args.split, args.out, args.out / f"{prefix}-{args.split}.md", prefix)


if __name__ == "__main__":
    main()
