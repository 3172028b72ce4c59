"""A planned merge, scanned and defended (issue 17, first step: the library and the CLI).

The plan is a mergekit YAML (``merge_method``, ``base_model``, ``models`` with ``model`` and
``parameters.weight`` / ``density``, ``parameters.normalize``, ``dtype``) plus an optional
``mergeshield:`` section mergekit does not read: the ``policy`` for a fine-tune whose scan finds a
backdoor, and the ``evaluation`` data each model's task has. Every fine-tune is scanned against
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
scan specified in full (an inverted trigger is described in the report, not stored).

Merges: task arithmetic θ = θ_base + Σ w_i·τ_i (``normalize``: the weights divided by their sum,
as mergekit does), and TIES with one density and one weight for every model. Other mergekit
forms (DARE, per-model TIES parameters, slices) are refused rather than merged differently.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from mergeshield import adapters, checkpoints
from mergeshield.data import load_task
from mergeshield.errors import ConfigError
from mergeshield.evaluation import Rate, attack_success_rate, clean_accuracy
from mergeshield.file_safety import read_option_file
from mergeshield.merge_defence import SCALES, MergeDefence, ScaleTried, choose
from mergeshield.merging import MergeConfig, merged_tensors, task_vectors
from mergeshield.models import family_for
from mergeshield.pipeline import ScanContext, ScanRequest, scan
from mergeshield.report.schema import RateModel, ScanReport
from mergeshield.report.verdict import still_responds
from mergeshield.task_vectors import TaskVector
from mergeshield.triggers import Trigger, parse_trigger

MAX_PLAN_BYTES = 2**20
MAX_MODELS = 32


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelParameters(_Strict):
    weight: float = Field(default=1.0, ge=-10, le=10, allow_inf_nan=False)
    density: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)


class PlanModel(_Strict):
    model: str = Field(min_length=1, max_length=500)
    parameters: ModelParameters = Field(default_factory=ModelParameters)


class PlanParameters(_Strict):
    normalize: bool | None = None  # mergekit's default: False for task arithmetic, True for TIES


class PlanOptions(_Strict):
    """The ``mergeshield:`` section: what mergekit does not know."""

    policy: Literal["clean", "exclude", "include"] = "clean"
    evaluation: dict[str, str] = Field(default_factory=dict)  # model -> its task's dataset
    # ScanRequest options for every model's scan (e.g. {"max_eval": 500}); {}: the defaults
    scan: dict[str, Any] = Field(default_factory=dict)
    # accuracy points the defended merge may cost any task with evaluation data against the
    # undefended merge (mergeshield/merge_defence.py chooses how much correction enters)
    budget_points: float = Field(default=2.0, ge=0, le=100, allow_inf_nan=False)


class MergePlan(_Strict):
    merge_method: Literal["task_arithmetic", "ties"]
    base_model: str = Field(min_length=1, max_length=500)
    models: list[PlanModel] = Field(min_length=1, max_length=MAX_MODELS)
    parameters: PlanParameters = Field(default_factory=PlanParameters)
    dtype: str | None = None  # mergekit's output dtype; the merge keeps the base's dtypes
    mergeshield: PlanOptions = Field(default_factory=PlanOptions)

    @classmethod
    def read(cls, path: str | Path) -> MergePlan:
        """Parse a plan file (YAML, at most 1 MiB); a bad one is ``invalid_config``."""
        p = Path(path)
        raw = read_option_file(p, MAX_PLAN_BYTES, "plan")
        try:
            data = yaml.safe_load(raw)  # plain data only: no tags that construct objects
        except (yaml.YAMLError, RecursionError) as exc:
            raise ConfigError(f"{p.name}: not YAML ({type(exc).__name__})",
                              details={"file": p.name}) from None
        return cls.parse(data, p.name)

    @classmethod
    def parse(cls, data: Any, name: str = "plan") -> MergePlan:
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: a plan is a mapping with merge_method, base_model and "
                              "models", details={"file": name})
        try:
            plan = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError.listing(name, exc, what="field") from None
        plan.merge_config()  # a form we do not merge is refused now, before any scan
        plan.scan_request("model")  # and so are scan options out of their bounds
        return plan

    def scan_request(self, model: str) -> ScanRequest:
        """How ``model`` is scanned: the plan's scan options, its task's evaluation data."""
        fixed = {"suspect", "base", "evaluation"}
        if fixed & set(self.mergeshield.scan):
            raise ConfigError(f"mergeshield.scan: {sorted(fixed)} come from the plan itself")
        try:
            return ScanRequest(suspect=model, base=self.base_model,
                               evaluation=self.mergeshield.evaluation.get(model),
                               **self.mergeshield.scan)
        except ValidationError as exc:
            raise ConfigError.listing("mergeshield.scan", exc) from None

    def merge_config(self) -> MergeConfig:
        """The merge of this plan's models, in its order."""
        weights = [m.parameters.weight for m in self.models]
        if self.merge_method == "ties":
            densities = {m.parameters.density for m in self.models}
            if len(set(weights)) > 1 or len(densities) > 1:
                raise ConfigError("ties: one weight and one density for every model is merged "
                                  "here; per-model TIES parameters are not (yet)")
            density = densities.pop()
            return MergeConfig(method="ties", weights=weights[:1],
                               keep=density if density is not None else 1.0)
        if self.parameters.normalize:
            total = sum(weights)
            if total == 0:
                raise ConfigError("normalize: the weights sum to 0")
            weights = [w / total for w in weights]
        return MergeConfig(method="task_arithmetic", weights=weights)


Merged = Literal["as is", "cleaned", "excluded"]  # what of a model enters the merge


class PlanModelResult(_Strict):
    model: str
    verdict: str  # the scan's verdict status
    cleaning: str | None  # removed / not_removed / precautionary / not_cleaned / None
    merged_as: Merged  # see ``merged_as``
    evaluation: str | None
    accuracy_alone: RateModel | None = None  # the fine-tune on its own task
    accuracy_merged: RateModel | None = None  # the merged backbone with its head
    accuracy_undefended: RateModel | None = None  # the plan merged with every model as it is
    # trigger id -> ASR of each trigger its scan found: on the fine-tune, on the merge, on the
    # undefended merge
    asr_alone: dict[str, RateModel] = Field(default_factory=dict)
    asr_merged: dict[str, RateModel] = Field(default_factory=dict)
    asr_undefended: dict[str, RateModel] = Field(default_factory=dict)


class PlanReport(_Strict):
    plan: dict[str, Any]
    policy: str
    merge: dict[str, Any]
    defence: MergeDefence | None = None  # the scale of the cleaned models' corrections
    models: list[PlanModelResult]
    output: list[str]  # files written


@dataclass
class PlanContext:
    out_dir: Path  # the merged model; scans' outputs under out_dir/scans/<i>
    cache_dir: Path | None = None
    device: str | None = None
    local_files_only: bool = False
    hub: dict[str, Any] = field(default_factory=dict)  # token, endpoint


def run_plan(plan: MergePlan, ctx: PlanContext) -> PlanReport:
    """Scan every fine-tune, merge what the policy keeps, measure and write the merge."""
    policy = plan.mergeshield.policy
    scans: list[tuple[PlanModel, ScanReport, Path]] = []
    for i, entry in enumerate(plan.models):
        out = ctx.out_dir / "scans" / str(i)
        report = scan(plan.scan_request(entry.model),
                      ScanContext(out_dir=out, cache_dir=ctx.cache_dir, device=ctx.device,
                                  local_files_only=ctx.local_files_only, **ctx.hub))
        scans.append((entry, report, out))
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
    tasks = [t for entry, report, _ in scans
             if (t := _Task.of(report, entry.model, plan, ctx)) is not None]
    defence = None
    if any(p.original for p in parts):  # how much of each correction: measured on the merge
        defence = _choose_scale(plan, cfg, parts, plain, tasks, ctx)
    scale = defence.scale if defence else 1.0
    files = _merge(plan, cfg, parts, scale, results, ctx, ctx.out_dir)
    # the merge as planned, undefended, beside it (only where the policy changed something)
    undefended = None
    if any(r["merged_as"] != "as is" for r in results):
        undefended = ctx.out_dir / "undefended"
        _merge(plan, plan.merge_config(), plain, 1.0, results, ctx, undefended)
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


def _choose_scale(plan: MergePlan, cfg: MergeConfig, parts: list[_Part], plain: list[_Part],
                  tasks: list[_Task], ctx: PlanContext) -> MergeDefence:
    """Each γ of ``SCALES`` merged in memory and measured on every task with data."""
    budget = plan.mergeshield.budget_points
    if not any(t.triggers for t in tasks):  # nothing to tell a removed backdoor by
        return choose([], budget)
    plain_merge = _merged(plan, plan.merge_config(), plain, 1.0, ctx)
    undefended = {t.model: t.measure(plain_merge, "undefended")[0].rate for t in tasks}
    del plain_merge
    tried = []
    for gamma in SCALES:
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
    return checkpoints.resolve(source, local_files_only=ctx.local_files_only,
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


@dataclass
class _Task:
    """A model's task on the merge: its head, the images its scan evaluated and the triggers
    its scan found and specified in full (an inverted one is described, not stored)."""

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
    def of(cls, report: ScanReport, model: str, plan: MergePlan, ctx: PlanContext
           ) -> _Task | None:
        dataset = plan.mergeshield.evaluation.get(model)
        if dataset is None or report.evaluation is None:
            return None
        found = {f.trigger_id for f in report.findings if f.trigger_id}
        measured = [t for t in report.metrics.triggers if t.id in found and t.source != "inverted"]
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
                   [(t.id, parse_trigger(t.spec), t.target) for t in measured],
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
