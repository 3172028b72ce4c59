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
model alone, the undefended merge and the merge; clean accuracy and the ASR of every trigger its
scan found (an inverted one read back from beside its report, ``triggers.INVERTED_FILE``).

Merges: task arithmetic θ = θ_base + Σ w_i·τ_i (``normalize``: the weights divided by their sum,
as mergekit does), TIES as mergekit computes it (``task_vectors.ties_mergekit``: per-model
density and weight, per-tensor trim, ``normalize`` on by default), and DARE as mergekit computes it
(``dare_ties``, ``dare_linear``: ``task_vectors.dare_mergekit``) but with MergeShield's own seeded
draws (``mergeshield.seed``). Other mergekit forms (slices, ``lambda``) are refused rather than
merged differently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from mergeshield import adapters, checkpoints
from mergeshield.data import load_task
from mergeshield.errors import ConfigError
from mergeshield.evaluation import Rate, attack_success_rate, clean_accuracy
from mergeshield.merge_defence import SCALES, MergeDefence, ScaleTried, choose
from mergeshield.merge_plan_schema import (
    DareConfig,
    Merged,
    MergePlan,
    PlanMerge,
    PlanModel,
    PlanModelResult,
    PlanReport,
    split_revision,
)
from mergeshield.merging import merged_tensors, task_vectors
from mergeshield.models import family_for
from mergeshield.pipeline import ScanContext, ScanRequest, percent, scan
from mergeshield.report.schema import RateModel, ScanReport
from mergeshield.report.verdict import still_responds
from mergeshield.task_vectors import TaskVector, dare_mergekit
from mergeshield.triggers import (
    INVERTED_FILE,
    Trigger,
    digest,
    load_image_triggers,
    parse_trigger,
)

SCANS_SHARE = 80.0  # percent of a plan's progress its scans take; then γ, merging, measuring


@dataclass
class PlanContext:
    out_dir: Path  # the merged model; scans' outputs under out_dir/scans/<i>
    cache_dir: Path | None = None
    device: str | None = None
    local_files_only: bool = False
    hub: dict[str, Any] = field(default_factory=dict)  # token, endpoint
    # for a service (the CLI sets none): the plan's progress as (stage, percent of the whole
    # plan); what a model name is read from (an upload's file: reports and __metadata__ keep
    # the name); the local folders the scans may read and the free disk a download must leave
    # (ScanContext's allowed_roots and min_free_bytes)
    progress: Callable[[str, float], None] | None = None
    sources: dict[str, str] = field(default_factory=dict)
    allowed_roots: tuple[Path, ...] | None = None
    min_free_bytes: int | None = None


def located(name: str, ctx: PlanContext) -> tuple[str, str | None]:
    """What a plan's model ``name`` is read from, and at which revision (``org/name@rev``)."""
    source = ctx.sources.get(name, name)
    repo, revision = split_revision(source)
    if revision is not None and not Path(source).expanduser().exists():
        return repo, revision
    return source, None


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
        **ctx.hub)


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
    plain = [_Part(m.model) for m in plan.models]  # the merge as planned, undefended
    _say(ctx, "measure_models", SCANS_SHARE)
    tasks = [t for entry, report, out in scans
             if (t := _Task.of(report, entry.model, plan, ctx, out)) is not None]
    defence = None
    if any(p.original for p in parts):  # how much of each correction: measured on the merge
        defence = _choose_scale(plan, cfg, parts, plain, tasks, ctx)
    scale = defence.scale if defence else 1.0
    _say(ctx, "write_merge", 92.0)
    files = _merge(plan, cfg, parts, scale, results, ctx, ctx.out_dir)
    # the merge as planned, undefended, beside it (only where the policy changed something)
    undefended = None
    if any(r["merged_as"] != "as is" for r in results):
        undefended = ctx.out_dir / "undefended"
        _merge(plan, plan.merge_config(), plain, 1.0, results, ctx, undefended)
    _say(ctx, "measure_merge", 95.0)
    for row, (entry, _report, _out) in zip(results, scans, strict=True):
        task = next((t for t in tasks if t.model == entry.model), None)
        if task is not None:
            row.update(task.measure_outputs(ctx.out_dir, scale, undefended, ctx))
    return PlanReport(plan=plan.model_dump(mode="json"), policy=policy,
                      merge=cfg.model_dump(mode="json"), defence=defence,
                      models=[PlanModelResult.model_validate(r) for r in results],
                      output=[p.name for p in files])


def _scale_name(gamma: float) -> str:
    return f"γ={gamma:g}"


def _choose_scale(plan: MergePlan, cfg: PlanMerge, parts: list[_Part], plain: list[_Part],
                  tasks: list[_Task], ctx: PlanContext) -> MergeDefence:
    """Each γ of ``SCALES`` merged in memory and measured on every task with data."""
    budget = plan.mergeshield.budget_points
    if not any(t.triggers for t in tasks):  # nothing to tell a removed backdoor by
        return choose([], budget)
    plain_merge = _merged(plan, plan.merge_config(), plain, 1.0, ctx)
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


def merged_as(policy: str, flagged: bool, cleaned: bool) -> Merged:
    """What of a scanned model enters the merge under ``policy``. ``cleaned``: its scan wrote a
    checkpoint it calls ``removed``; a flagged model without one (nothing measured, or the
    backdoor not removed) enters only under ``include``, as it is."""
    if not flagged or policy == "include":
        return "as is"
    if policy == "clean" and cleaned:
        return "cleaned"
    return "excluded"


def _resolve(source: str, ctx: PlanContext) -> checkpoints.ResolvedSource:
    path, revision = located(source, ctx)
    return checkpoints.resolve(path, revision=revision, local_files_only=ctx.local_files_only,
                               cache_dir=ctx.cache_dir, **ctx.hub)


def _model(source: str, base_src: checkpoints.ResolvedSource, ctx: PlanContext
           ) -> checkpoints.ResolvedSource:
    """A plan's model as it is merged: a LoRA adapter as the model it makes with the base."""
    return adapters.as_model(_resolve(source, ctx), base_src, cache_dir=ctx.cache_dir)


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
    base_src = _resolve(plan.base_model, ctx)
    with ExitStack() as stack:
        base_ck = stack.enter_context(checkpoints.open_checkpoint(base_src))
        names = [p.source for p in parts] + [p.original for p in parts if p.original]
        cks = [stack.enter_context(checkpoints.open_checkpoint(_model(n, base_src, ctx)))
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


def _plan_tensors(base: Mapping[str, Tensor], tvs: Sequence[TaskVector], cfg: PlanMerge
                  ) -> Iterator[tuple[str, Tensor]]:
    """θ_base + the plan's merge of ``tvs``, one tensor at a time in ``base``'s order."""
    if not isinstance(cfg, DareConfig):
        return merged_tensors(base, tvs, cfg)
    return dare_mergekit(list(tvs), cfg.densities, cfg.weights,
                         consensus=cfg.method == "dare_ties", normalize=cfg.normalize,
                         rescale=cfg.rescale, seed=cfg.seed, draws=cfg.models).apply_lazily(base)


def _merged(plan: MergePlan, cfg: PlanMerge, parts: list[_Part], gamma: float,
            ctx: PlanContext) -> dict[str, Tensor]:
    """The merge, in memory (canonical names), for measuring a scale before writing one."""
    with _vectors(plan, parts, gamma, ctx) as (_src, base, tvs):
        return {k: v.clone() for k, v in _plan_tensors(base, tvs, cfg)}


def _merge(plan: MergePlan, cfg: PlanMerge, parts: list[_Part], gamma: float,
           results: list[dict[str, Any]], ctx: PlanContext, out: Path) -> list[Path]:
    with _vectors(plan, parts, gamma, ctx) as (base_src, base, tvs):
        info = base.info  # type: ignore[attr-defined]
        verdicts = {r["model"]: {k: r[k] for k in ("verdict", "cleaning", "merged_as")}
                    for r in results}
        return checkpoints.save_checkpoint(
            out, _plan_tensors(base, tvs, cfg), specs={k: info(k) for k in base},
            config=base_src.config, extra_files=checkpoints.extra_files(base_src),
            metadata={"format": "pt",
                      "mergeshield.plan": plan.model_dump_json(),
                      "mergeshield.policy": plan.mergeshield.policy,
                      "mergeshield.verdicts": json.dumps(verdicts),
                      "mergeshield.merge": cfg.model_dump_json(),
                      "mergeshield.correction_scale": repr(gamma)})


@dataclass
class _Task:
    """A model's task on the merge: its head, the images its scan evaluated and the triggers
    its scan found (an inverted one read from beside its report, checked against its digest)."""

    model: str
    family: Any
    clf: Any  # the model's classifier: its own backbone and head, reloaded per merge
    test: Any
    triggers: list[tuple[str, Trigger, int]]
    references: dict[str, float]  # trigger id -> its ASR on the base (the residual rule's)
    min_asr_gap: float
    alone: dict[str, Any] = field(default_factory=dict)  # the report's *_alone numbers
    # what ``measure`` found on each merge it was given a name for ("undefended", "γ=0.5"): the
    # scale sweep's merges are the ones written, so they are not measured again from disk
    seen: dict[str, tuple[Rate, dict[str, Rate]]] = field(default_factory=dict)

    @classmethod
    def of(cls, report: ScanReport, model: str, plan: MergePlan, ctx: PlanContext,
           out: Path) -> _Task | None:
        dataset = plan.mergeshield.evaluation.get(model)
        if dataset is None or report.evaluation is None:
            return None
        found = {f.trigger_id for f in report.findings if f.trigger_id}
        # an inverted trigger is read from beside its scan's report, if it is the one described
        inverted = {i: t for i, t in load_image_triggers(out / INVERTED_FILE).items()
                    if i in found and digest(t) == _spec_digest(report, i)}
        specified = {t.id: parse_trigger(t.spec) for t in report.metrics.triggers
                     if t.id in found and t.source != "inverted"}
        triggers = specified | inverted
        measured = [t for t in report.metrics.triggers if t.id in triggers]
        base_src = _resolve(plan.base_model, ctx)
        with checkpoints.open_checkpoint(base_src) as b, \
                checkpoints.open_checkpoint(_model(model, base_src, ctx)) as m:
            family = family_for(base_src.config, m.config)
            request = plan.scan_request(model)  # the images its scan evaluated
            test = load_task(dataset, max_test=request.max_eval, seed=request.seed,
                             image_size=request.image_size,
                             mixed_size=family.preprocessing.image_size, cache_dir=ctx.cache_dir,
                             local_files_only=ctx.local_files_only, **ctx.hub).test
            mine = family.canonical(m)
            clf = family.classifier(mine, family.head_from(family.canonical(b), mine),
                                    test.classes)
        task = cls(model, family, clf, test,
                   [(t.id, triggers[t.id], t.target) for t in measured],
                   {t.id: t.asr_reference.rate if t.asr_reference else 0.0 for t in measured},
                   request.min_asr_gap)
        acc, asr = task.measure(None)  # the fine-tune alone, before any merge is loaded
        task.alone = {"accuracy_alone": acc.to_model(),
                      "asr_alone": {i: r.to_model() for i, r in asr.items()}}
        return task

    def measure(self, backbone: Mapping[str, Tensor] | None, name: str | None = None
                ) -> tuple[Rate, dict[str, Rate]]:
        """Clean accuracy and each trigger's ASR with ``backbone`` (None: the model's own),
        kept under ``name`` when given."""
        if backbone is not None:
            self.clf.load_backbone({k: backbone[k] for k in self.clf.backbone_state()})
        got = (clean_accuracy(self.clf, self.test),
               {i: attack_success_rate(self.clf, self.test, t, target)
                for i, t, target in self.triggers})
        if name is not None:
            self.seen[name] = got
        return got

    def measure_outputs(self, merged: Path, gamma: float, undefended: Path | None,
                        ctx: PlanContext) -> dict[str, Any]:
        """The report's numbers: the model alone, the written merge (at ``gamma``) and the
        undefended one (None: the same as the merge), each merge measured once."""
        out: dict[str, Any] = dict(self.alone)
        for label, name, folder in (("merged", _scale_name(gamma), merged),
                                    ("undefended", "undefended" if undefended
                                     else _scale_name(gamma), undefended or merged)):
            if name not in self.seen:
                with checkpoints.open_checkpoint(_resolve(str(folder), ctx)) as ck:
                    self.measure(self.family.canonical(ck), name)
            acc, asr = self.seen[name]
            out[f"accuracy_{label}"] = acc.to_model()
            out[f"asr_{label}"] = {i: r.to_model() for i, r in asr.items()}
        return out


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
                      for i, a in r.asr_merged.items())
        lines.append(f"  {r.model}: {r.verdict} ({r.cleaning or 'not cleaned'}), merged "
                     f"{r.merged_as}{acc}{asr}")
    return "\n".join(lines)


def _pct(rate: RateModel | None) -> str:
    return "–" if rate is None else f"{100 * rate.rate:.1f} %"


def _spec_digest(report: ScanReport, trigger_id: str) -> str | None:
    spec = next((t.spec for t in report.metrics.triggers if t.id == trigger_id), {})
    return spec.get("sha256")
