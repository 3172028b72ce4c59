"""A defended merge plan against the all-clean merge: issue 17's bar, measured on the zoo.

For each attacked task of the zoo's ViT family (mnist, digits, mnist-rot90), each attack (the zoo's
BadNets and blended fine-tunes) and each task-arithmetic weight (``--weights``; 0.3 is task
arithmetic's usual coefficient, 1.0 where a BadNets survives the merge), the plan merges the
attacked task's backdoored fine-tune with the other two tasks' clean ones, under the scan's
defaults and the default policy (``clean``). Side by side, as a user would choose them:

- *undefended*: the plan as it is (what mergekit gives; policy ``include``);
- *without*: the plan without its flagged models (policy ``exclude``);
- *defended*: MergeShield's merge (policy ``clean``, γ chosen on the merge);
- *all-clean*: the three clean fine-tunes merged (the reference a user does not have), itself run
  as a plan (its cost: what a plan of clean models loses to false positives).

Per row: the **planted** trigger's ASR (the zoo's ground truth, measured with the attacked task's
head; the all-clean merge with the clean fine-tune's head) at each point, the found triggers' ASR,
and the three tasks' mean clean accuracy. The bar: defended within 5 points of all-clean at ≤ 2
points mean accuracy cost against the all-clean merge.

Run on the dev zoo while designing; ``--label holdout`` on a zoo built with another seed, once.
Writes ``docs/efficacy/merge-plan-<label>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from mergeshield import checkpoints
from mergeshield.merge_plan import merged_as_planned, run_plan
from mergeshield.merge_plan_schema import MergePlan, PlanReport
from mergeshield.merge_tasks import TaskOnMerge
from mergeshield.plan_context import PlanContext
from mergeshield.report.io import load_report
from mergeshield.triggers import parse_trigger

TASKS = ("mnist", "digits", "mnist-rot90")
ATTACKS = ("badnets", "blended")
BAR_POINTS, BUDGET_POINTS = 5.0, 2.0


def _plan(zoo: Path, names: list[str], weight: float) -> MergePlan:
    models = {n: str(zoo / "models" / n) for n in names}
    manifest = json.loads((zoo / "manifest.json").read_text())
    data = {m["name"]: str(zoo / m["dataset"]) for m in manifest["models"] if m["name"] in models}
    return MergePlan.parse({
        "merge_method": "task_arithmetic", "base_model": str(zoo / "models" / "vit-base"),
        "models": [{"model": p, "parameters": {"weight": weight}} for p in models.values()],
        "mergeshield": {"evaluation": {models[n]: data[n] for n in names}}})


def _rates(task: TaskOnMerge, name: str, backbone: Any) -> dict[str, float]:
    acc, asr = task.measure(backbone, name)
    return {"accuracy": acc.rate, **{i: r.rate for i, r in asr.items()}}


def row(zoo: Path, work: Path, task: str, attack: str, weight: float,
        clean: tuple[MergePlan, Path, PlanReport]) -> dict[str, Any]:
    bad = f"vit-{task}-{attack}"
    others = [f"vit-{t}-clean" for t in TASKS if t != task]
    plan = _plan(zoo, [bad, *others], weight)
    out = work / f"{task}-{attack}-{weight:g}"
    ctx = PlanContext(out_dir=out, cache_dir=work / "cache", device="cpu")
    t0 = time.perf_counter()
    report = run_plan(plan, ctx)
    seconds = time.perf_counter() - t0
    manifest = {m["name"]: m for m in json.loads((zoo / "manifest.json").read_text())["models"]}
    planted = manifest[bad]["attack"]
    scan = load_report(out / "scans" / "0" / "report.json")
    flagged = scan.verdict.status == "backdoor_suspected"
    # the attacked task's head on each merge, with the planted trigger beside the found ones
    points: dict[str, dict[str, float]] = {}
    for label, model, plan_of, where in (
            ("defended", bad, plan, out), ("undefended", bad, plan, out / "undefended"),
            ("all-clean", f"vit-{task}-clean", clean[0], clean[1])):
        t = TaskOnMerge.of(scan, str(zoo / "models" / model), plan_of, ctx, out / "scans" / "0")
        assert t is not None
        t.triggers.append(("planted", parse_trigger(planted["trigger"]), planted["target"]))
        if label == "defended":  # before any merge is loaded into its classifier
            points["alone"] = _rates(t, "alone", None)
        where = where if where.is_dir() else out  # nothing flagged: the merge is the plan
        with checkpoints.open_checkpoint(checkpoints.resolve(str(where))) as ck:
            points[label] = _rates(t, label, t.family.canonical(ck))
        if label == "defended":
            without = plan.model_copy(update={"models": plan.models[1:]})  # the others
            points["without"] = _rates(t, "without", merged_as_planned(without, ctx))
    rows = {Path(r.model).name: r for r in report.models}
    clean_acc = statistics.mean(r.accuracy_merged.rate for r in clean[2].models
                                if r.accuracy_merged)
    mean = {k: statistics.mean(getattr(r, f"accuracy_{k}").rate for r in rows.values()
                               if getattr(r, f"accuracy_{k}") is not None)
            for k in ("merged", "undefended", "without") if all(
                getattr(r, f"accuracy_{k}") is not None for r in rows.values())}
    gap = 100 * (points["defended"]["planted"] - points["all-clean"]["planted"])
    cost = 100 * (clean_acc - mean.get("merged", 0.0))
    return {"task": task, "attack": attack, "weight": weight, "verdict": scan.verdict.status,
            "merged_as": rows[bad].merged_as, "found": [i for i in points["defended"]
                                                        if i not in ("accuracy", "planted")],
            "gamma": report.defence.scale if report.defence else None,
            "within_budget": report.defence.within_budget if report.defence else None,
            "planted_asr": {k: v["planted"] for k, v in points.items()},
            "mean_accuracy": {**mean, "all-clean": clean_acc},
            "gap_points": round(gap, 1), "cost_points": round(cost, 1),
            "meets_bar": flagged and gap <= BAR_POINTS and cost <= BUDGET_POINTS,
            "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--zoo", type=Path, required=True, help="a quick or default zoo")
    p.add_argument("--label", default="dev", help="dev, or holdout for a zoo of another seed")
    p.add_argument("--weights", default="0.3,1.0")
    p.add_argument("--work", type=Path, default=Path("/tmp/merge-plan-efficacy"))
    p.add_argument("--out", type=Path, default=Path("docs/efficacy"))
    args = p.parse_args(argv)
    weights = [float(w) for w in args.weights.split(",")]
    work = args.work / args.label
    t0 = time.perf_counter()
    rows, clean_costs = [], {}
    for weight in weights:
        names = [f"vit-{t}-clean" for t in TASKS]
        cdir = work / f"all-clean-{weight:g}"
        creport = run_plan(_plan(args.zoo, names, weight),
                           PlanContext(out_dir=cdir, cache_dir=work / "cache", device="cpu"))
        clean_costs[weight] = {
            "flagged": sum(r.verdict == "backdoor_suspected" for r in creport.models),
            "cost_points": round(100 * statistics.mean(
                r.accuracy_undefended.rate - r.accuracy_merged.rate for r in creport.models
                if r.accuracy_merged and r.accuracy_undefended), 2)}
        for task in TASKS:
            for attack in ATTACKS:
                rows.append(row(args.zoo, work, task, attack, weight,
                                (_plan(args.zoo, names, weight), cdir, creport)))
                print(json.dumps(rows[-1]), flush=True)
    manifest = json.loads((args.zoo / "manifest.json").read_text())
    result = {"label": args.label, "zoo": str(args.zoo), "zoo_seed": manifest["seed"],
              "zoo_scale": manifest["scale"], "machine": platform.processor() or platform.machine(),
              "seconds": round(time.perf_counter() - t0), "clean_plans": clean_costs,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"merge-plan-{args.label}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"merge-plan-{args.label}.md").write_text(markdown(result))
    print(markdown(result))


def _p(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Defended merge plans against the all-clean merge ({result['label']})", "",
             f"`python bench/merge_plan_efficacy.py --zoo {result['zoo']} --label "
             f"{result['label']}` — zoo seed {result['zoo_seed']} ({result['zoo_scale']}), "
             f"{result['seconds']} s on {result['machine']}. Planted trigger's ASR (%) with the "
             "attacked task's head; mean clean accuracy (%) over the three tasks, each with its "
             f"own head. Bar: defended within {BAR_POINTS:g} points of all-clean at ≤ "
             f"{BUDGET_POINTS:g} points mean cost.", "",
             "| task | attack | w | verdict | γ | ASR alone | undefended | without | defended "
             "| all-clean | gap | acc. undefended | without | defended | all-clean | cost | bar |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        a, m = r["planted_asr"], r["mean_accuracy"]
        lines.append(
            f"| {r['task']} | {r['attack']} | {r['weight']:g} | {r['verdict']} "
            f"({r['merged_as']}) | {r['gamma'] if r['gamma'] is not None else '–'} | "
            f"{_p(a['alone'])} | {_p(a['undefended'])} | {_p(a['without'])} | "
            f"{_p(a['defended'])} | {_p(a['all-clean'])} | {r['gap_points']:+.1f} | "
            f"{_p(m.get('undefended'))} | {_p(m.get('without'))} | {_p(m.get('merged'))} | "
            f"{_p(m['all-clean'])} | {r['cost_points']:+.1f} | "
            f"{'met' if r['meets_bar'] else 'missed'} |")
    met = sum(r["meets_bar"] for r in result["rows"])
    lines += ["", f"Bar met in {met} of {len(result['rows'])} rows. Plans of the three clean "
              "fine-tunes: " + "; ".join(
                  f"w {w}: {c['flagged']} flagged, mean cost {c['cost_points']:+.2f} points"
                  for w, c in result["clean_plans"].items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
