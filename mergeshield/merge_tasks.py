"""A plan's model's task measured on merges (issue 17): its head on a merged backbone, clean
accuracy on the images its scan evaluated and the ASR of every trigger its scan found."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from mergeshield import checkpoints
from mergeshield.data import load_task
from mergeshield.evaluation import Rate, attack_success_rate, clean_accuracy
from mergeshield.merge_plan_schema import MergePlan
from mergeshield.models import family_for
from mergeshield.plan_context import PlanContext, resolve, resolve_model
from mergeshield.report.schema import ScanReport
from mergeshield.triggers import INVERTED_FILE, Trigger, digest, load_image_triggers, parse_trigger


@dataclass
class TaskOnMerge:
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
           out: Path) -> TaskOnMerge | None:
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
        base_src = resolve(plan.base_model, ctx)
        with checkpoints.open_checkpoint(base_src) as b, \
                checkpoints.open_checkpoint(resolve_model(model, base_src, ctx)) as m:
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

    def measure_outputs(self, merges: Mapping[str, tuple[str, Path | None]], ctx: PlanContext
                        ) -> dict[str, Any]:
        """The report's numbers: the model alone and, per label of ``merges`` ("merged",
        "undefended", "without"), the merge measured under its name (a merge not measured yet
        is read from its folder; None: measured in memory already), each measured once."""
        out: dict[str, Any] = dict(self.alone)
        for label, (name, folder) in merges.items():
            if name not in self.seen and folder is not None:
                with checkpoints.open_checkpoint(resolve(str(folder), ctx)) as ck:
                    self.measure(self.family.canonical(ck), name)
            acc, asr = self.seen[name]
            out[f"accuracy_{label}"] = acc.to_model()
            out[f"asr_{label}"] = {i: r.to_model() for i, r in asr.items()}
        return out


def _spec_digest(report: ScanReport, trigger_id: str) -> str | None:
    spec = next((t.spec for t in report.metrics.triggers if t.id == trigger_id), {})
    return spec.get("sha256")
