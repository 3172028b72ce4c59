"""A planned merge, scanned and defended (issue 17, first step: the library and the CLI).

The plan (``merge_plan_schema.MergePlan``) is a mergekit YAML plus a ``mergeshield:`` section
mergekit does not read: the ``policy`` for a fine-tune whose scan finds a backdoor, and the
``evaluation`` data each model's task has. Every fine-tune is scanned against
the base (``pipeline.scan``, its default defence); the policy decides what enters the merge:

- ``clean`` (default): the scan's cleaned checkpoint of a flagged model (left out when the scan
  says the backdoor was not removed), the others as they are; only a share γ of each cleaned
  model's correction enters, chosen on the merge with the accuracy budget over every task that
  has evaluation data (``merge_defence``);
- ``exclude``: flagged models are left out;
- ``include``: every model as it is (the merge is measured, not defended).

The merged model is written in the base's layout with the plan, the policy and each model's
verdict in ``__metadata__`` (and, where the policy changed something, the plan merged as it is
under ``undefended/``), and measured per task that has evaluation data: that model's head on the
model alone, the undefended merge, the merge and, when a model was flagged, the plan merged
without its flagged models (what ``exclude`` gives: the level a clean merge of the others answers
a found trigger with); clean accuracy and the ASR of every trigger its scan found (an inverted
one read back from beside its report, ``triggers.INVERTED_FILE``; ``merge_tasks.TaskOnMerge``).

Merges: task arithmetic θ = θ_base + Σ w_i·τ_i (``normalize``: the weights divided by their sum,
as mergekit does), TIES as mergekit computes it (``merge_methods.ties_mergekit``: per-model
density and weight, per-tensor trim, ``normalize`` on by default), and DARE as mergekit computes it
(``dare_ties``, ``dare_linear``: ``merge_methods.dare_mergekit``) but with MergeShield's own seeded
draws (``mergeshield.seed``). Other mergekit forms (slices, ``lambda``) are refused rather than
merged differently.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from mergeshield import checkpoints
from mergeshield.errors import ConfigError
from mergeshield.merge_defence import SCALES, MergeDefence, ScaleTried, choose
from mergeshield.merge_plan_schema import (
    Merged,
    MergePlan,
    PlanModel,
    PlanModelResult,
    PlanReport,
)
from mergeshield.merge_tasks import TaskOnMerge
from mergeshield.merging import MergeConfig, merged_tensors, task_vectors
from mergeshield.pipeline import ScanContext, ScanRequest, percent, scan
from mergeshield.plan_context import PlanContext, located, resolve, resolve_model
from mergeshield.report.schema import RateModel, ScanReport
from mergeshield.report.verdict import still_responds
from mergeshield.task_vectors import TaskVector

SCANS_SHARE = 80.0  # percent of a plan's progress its scans take; then γ, merging, measuring


def _scan_of(plan: MergePlan, i: int, out: Path, ctx: PlanContext
             ) -> tuple[ScanRequest, ScanContext]:
    """The scan of the plan's ``i``-th model: its request, and its context (writing to ``out``)."""
    name, n = plan.models[i].model, len(plan.models)
    (suspect, suspect_rev), (base, base_rev) = located(name, ctx), located(plan.base_model, ctx)
    request = plan.scan_request(name).model_copy(update={
        "suspect": suspect, "suspect_revision": suspect_rev,
        "base": base, "base_revision": base_rev})

    def progress(stage: str, fraction: float) -> None:  # the scan's share of the plan's
        _say(ctx, f"scan {i + 1}/{n}: {stage}",
             SCANS_SHARE * (i + (percent(stage, fraction) or 0.0) / 100) / n)

    labels = {role: m for role, m in (("suspect", name), ("base", plan.base_model))
              if m in ctx.sources}
    return request, ScanContext(
        out_dir=out, cache_dir=ctx.cache_dir, device=ctx.device,
        local_files_only=ctx.local_files_only, progress=progress if ctx.progress else None,
        allowed_roots=ctx.allowed_roots, min_free_bytes=ctx.min_free_bytes, labels=labels,
        bv_guard=ctx.bv_guard, **ctx.hub)


def _say(ctx: PlanContext, stage: str, pct: float) -> None:
    if ctx.progress is not None:
        ctx.progress(stage, round(pct, 1))


def run_plan(plan: MergePlan, ctx: PlanContext) -> PlanReport:
    """Scan every fine-tune, merge what the policy keeps, measure and write the merge."""
    policy = plan.mergeshield.policy
    scans: list[tuple[PlanModel, ScanReport, Path]] = []
    for i, entry in enumerate(plan.models):
        out = ctx.out_dir / "scans" / str(i)
        scans.append((entry, scan(*_scan_of(plan, i, out, ctx)), out))
    chosen: list[tuple[PlanModel, _Part]] = []
    results: list[dict[str, Any]] = []
    for entry, report, out in scans:
        how = merged_as(policy, report.verdict.status == "backdoor_suspected",
                        report.output is not None and report.cleaning is not None
                        and report.cleaning.status == "removed")
        if how != "excluded":
            chosen.append((entry, _Part(str(out), entry.model) if how == "cleaned"
                           else _Part(entry.model)))
        results.append({"model": entry.model, "verdict": report.verdict.status,
                        "cleaning": report.cleaning.status if report.cleaning else None,
                        "merged_as": how,
                        "evaluation": plan.mergeshield.evaluation.get(entry.model)})
    if not chosen:
        raise ConfigError("the policy excluded every model of the plan: nothing to merge",
                          details={"policy": policy})
    cfg = plan.model_copy(update={"models": [e for e, _ in chosen]}).merge_config()
    parts = [p for _, p in chosen]
    _say(ctx, "measure_models", SCANS_SHARE)
    tasks = [t for entry, report, out in scans
             if (t := TaskOnMerge.of(report, entry.model, plan, ctx, out)) is not None]
    defence = None
    if any(p.original for p in parts):  # how much of each correction: measured on the merge
        defence = _choose_scale(plan, cfg, parts, tasks, ctx)
    scale = defence.scale if defence else 1.0
    _say(ctx, "write_merge", 92.0)
    files = _merge(plan, cfg, parts, scale, results, ctx, ctx.out_dir)
    # the merge as planned, undefended, beside it (only where the policy changed something)
    undefended = None
    if any(r["merged_as"] != "as is" for r in results):
        undefended = ctx.out_dir / "undefended"
        _merge(plan, plan.merge_config(), [_Part(m.model) for m in plan.models], 1.0, results,
               ctx, undefended)
    _say(ctx, "measure_merge", 95.0)
    # what the report compares, per task: the merge written, the plan as it is, and the plan
    # without its flagged models (what ``exclude`` gives: the reference for a found trigger's ASR)
    written = (_scale_name(scale), ctx.out_dir)
    merges: dict[str, tuple[str, Path | None]] = {
        "merged": written, "undefended": ("undefended", undefended) if undefended else written}
    if (any(r["verdict"] == "backdoor_suspected" for r in results)
            and _measure_without(plan, results, tasks, ctx)):
        merges["without"] = ("without", None)  # measured in memory above
    for row, (entry, _report, _out) in zip(results, scans, strict=True):
        task = next((t for t in tasks if t.model == entry.model), None)
        if task is not None:
            row.update(task.measure_outputs(merges, ctx))
    return PlanReport(plan=plan.model_dump(mode="json"), policy=policy,
                      merge=cfg.model_dump(mode="json"), defence=defence,
                      models=[PlanModelResult.model_validate(r) for r in results],
                      output=[p.name for p in files])


def _scale_name(gamma: float) -> str:
    return f"γ={gamma:g}"


def _choose_scale(plan: MergePlan, cfg: MergeConfig, parts: list[_Part],
                  tasks: list[TaskOnMerge], ctx: PlanContext) -> MergeDefence:
    """Each γ of ``SCALES`` merged in memory and measured on every task with data."""
    budget = plan.mergeshield.budget_points
    if not any(t.triggers for t in tasks):  # nothing to tell a removed backdoor by
        return choose([], budget)
    plain_merge = merged_as_planned(plan, ctx)
    undefended = {t.model: t.measure(plain_merge, "undefended")[0].rate for t in tasks}
    del plain_merge
    tried = []
    for k, gamma in enumerate(SCALES):
        _say(ctx, "choose_scale", SCANS_SHARE + 2 + 10 * k / len(SCALES))
        merged = _merged(plan, cfg, parts, gamma, ctx)
        costs, removed = {}, True
        for t in tasks:
            acc, asr = t.measure(merged, _scale_name(gamma))
            costs[t.model] = round(100 * (undefended[t.model] - acc.rate), 2)
            removed &= not any(still_responds(r.rate, t.references[i], t.min_asr_gap)
                               for i, r in asr.items())
        tried.append(ScaleTried(scale=gamma, cost_points=costs, removed=removed))
    return choose(tried, budget)


def _measure_without(plan: MergePlan, results: list[dict[str, Any]], tasks: list[TaskOnMerge],
                     ctx: PlanContext) -> bool:
    """The plan merged in memory without its flagged models, measured on every task as
    "without"; False when every model was flagged (nothing to merge)."""
    kept = [m for m, r in zip(plan.models, results, strict=True)
            if r["verdict"] != "backdoor_suspected"]
    if not kept or not tasks:
        return False
    merged = merged_as_planned(plan.model_copy(update={"models": kept}), ctx)
    for t in tasks:
        t.measure(merged, "without")
    return True


def merged_as(policy: str, flagged: bool, cleaned: bool) -> Merged:
    """What of a scanned model enters the merge under ``policy``. ``cleaned``: its scan wrote a
    checkpoint it calls ``removed``; a flagged model without one (nothing measured, or the
    backdoor not removed) enters only under ``include``, as it is."""
    if not flagged or policy == "include":
        return "as is"
    if policy == "clean" and cleaned:
        return "cleaned"
    return "excluded"


@dataclass(frozen=True)
class _Part:
    """A model as it enters the merge: ``source``; a cleaned one also names its own fine-tune
    (``original``), so that only a share γ of its correction (cleaned − fine-tune) enters."""

    source: str
    original: str | None = None


@contextmanager
def _vectors(plan: MergePlan, parts: list[_Part], gamma: float, ctx: PlanContext
             ) -> Iterator[tuple[checkpoints.ResolvedSource, Mapping[str, Tensor],
                                 list[TaskVector]]]:
    """The base and each part's task vector, a cleaned part's as τ_suspect + γ·(τ_cleaned −
    τ_suspect), while their checkpoints are open."""
    base_src = resolve(plan.base_model, ctx)
    with ExitStack() as stack:
        base_ck = stack.enter_context(checkpoints.open_checkpoint(base_src))
        names = [p.source for p in parts] + [p.original for p in parts if p.original]
        cks = [stack.enter_context(checkpoints.open_checkpoint(resolve_model(n, base_src, ctx)))
               for n in names]
        base, tvs, _family = task_vectors(base_ck, cks)
        own = iter(tvs[len(parts):])
        mixed = []
        for p, tv in zip(parts, tvs, strict=False):
            if p.original is not None:
                suspect = next(own)
                tv = tv if gamma == 1.0 else suspect + (tv - suspect) * gamma
            mixed.append(tv)
        yield base_src, base, mixed


def merged_as_planned(plan: MergePlan, ctx: PlanContext) -> dict[str, Tensor]:
    """The plan's models merged as they are, in memory (canonical names): the undefended merge,
    or, given a plan of some of its models, the merge of those alone."""
    return _merged(plan, plan.merge_config(), [_Part(m.model) for m in plan.models], 1.0, ctx)


def _merged(plan: MergePlan, cfg: MergeConfig, parts: list[_Part], gamma: float,
            ctx: PlanContext) -> dict[str, Tensor]:
    """The merge, in memory (canonical names), for measuring a scale before writing one."""
    with _vectors(plan, parts, gamma, ctx) as (_src, base, tvs):
        return {k: v.clone() for k, v in merged_tensors(base, tvs, cfg)}


def _merge(plan: MergePlan, cfg: MergeConfig, parts: list[_Part], gamma: float,
           results: list[dict[str, Any]], ctx: PlanContext, out: Path) -> list[Path]:
    with _vectors(plan, parts, gamma, ctx) as (base_src, base, tvs):
        info = base.info  # type: ignore[attr-defined]
        verdicts = {r["model"]: {k: r[k] for k in ("verdict", "cleaning", "merged_as")}
                    for r in results}
        return checkpoints.save_checkpoint(
            out, merged_tensors(base, tvs, cfg), specs={k: info(k) for k in base},
            config=base_src.config, extra_files=checkpoints.extra_files(base_src),
            metadata={"format": "pt",
                      "mergeshield.plan": plan.model_dump_json(),
                      "mergeshield.policy": plan.mergeshield.policy,
                      "mergeshield.verdicts": json.dumps(verdicts),
                      "mergeshield.merge": cfg.model_dump_json(),
                      "mergeshield.correction_scale": repr(gamma)})


def plan_summary(report: PlanReport) -> str:
    """The plan's outcome in a few lines of text (the CLI's output)."""
    lines = [f"merged {sum(r.merged_as != 'excluded' for r in report.models)} of "
             f"{len(report.models)} models ({report.merge['method']}, policy {report.policy})"]
    if report.defence is not None:
        lines.append(f"  defence: {report.defence.message}")
    for r in report.models:
        acc = (f"; accuracy {_pct(r.accuracy_alone)} alone, {_pct(r.accuracy_undefended)} "
               f"undefended merge, {_pct(r.accuracy_merged)} merged" if r.accuracy_merged else "")
        asr = "".join(f"; {i} ASR {_pct(r.asr_alone[i])} alone, "
                      f"{_pct(r.asr_undefended.get(i))} undefended, {_pct(a)} merged"
                      f"{_against(a, r.asr_without.get(i))}"
                      for i, a in r.asr_merged.items())
        lines.append(f"  {r.model}: {r.verdict} ({r.cleaning or 'not cleaned'}), merged "
                     f"{r.merged_as}{acc}{asr}")
    return "\n".join(lines)


def _against(merged: RateModel, without: RateModel | None) -> str:
    """How far a found trigger's ASR on the merge stays above the merge without the flagged
    models: what a clean merge of the other models gives that trigger."""
    if without is None:
        return ""
    gap = 100 * (merged.rate - without.rate)
    return (f" ({_pct(without)} without the flagged models: "
            f"{f'{gap:.1f} points above' if gap > 0 else 'not above'})")


def _pct(rate: RateModel | None) -> str:
    return "–" if rate is None else f"{100 * rate.rate:.1f} %"
