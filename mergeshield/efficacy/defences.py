"""Defences the bench compares, behind one call: (suspect) -> cleaned backbone (+ detection).

Scan defences run the product's one function, ``pipeline.scan``, on the saved suspect folder and
read the cleaned checkpoint it writes: ``product`` with the ScanRequest defaults of the moment (a
black box that changes as the defence does), ``ibvs-plain`` (the paper's IBVS: all of BV_inj,
``Focus(keep=1, agree_with_suspect=False)``) and ``ibvs-focused`` (the defaults at the bench's
creation, ``Focus(keep=0.2, agree_with_suspect=True)``, pinned). The repairs of
``baselines.py`` are wrapped as ``RepairDefence``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from mergeshield.efficacy.world import Backbone, World
from mergeshield.ibvs import Focus
from mergeshield.pipeline import ScanContext, ScanRequest, scan
from mergeshield.report import ScanReport


@dataclass(frozen=True)
class Case:
    """One checkpoint to defend: its task, backbone and saved folder, and a work folder."""

    task: str
    backbone: Backbone
    folder: Path
    work: Path
    seed: int


@dataclass(frozen=True)
class Cleaned:
    backbone: Backbone
    seconds: float
    flagged: bool | None = None  # the verdict; None: the defence does not detect
    score: float | None = None  # detection score (higher = more suspicious)
    detail: dict[str, Any] = field(default_factory=dict)


class Defence(Protocol):
    @property
    def name(self) -> str: ...

    def __call__(self, world: World, case: Case) -> Cleaned: ...


def detection_score(report: ScanReport) -> float:
    """Max over measured triggers of suspect ASR − reference (base backbone) ASR."""
    gaps = [t.asr_before.rate - (t.asr_reference.rate if t.asr_reference else 0.0)
            for t in report.metrics.triggers]
    return max(gaps, default=0.0)


@dataclass(frozen=True)
class ScanDefence:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)  # ScanRequest fields; {} = defaults
    cache_dir: Path | None = None  # the shared BV_inj cache

    def request(self, world: World, case: Case) -> ScanRequest:
        return ScanRequest(suspect=str(case.folder), base=str(world.path(world.base_name)),
                           evaluation=str(world.dataset_dir(case.task)), **self.overrides)

    def __call__(self, world: World, case: Case) -> Cleaned:
        out = case.work / self.name
        t0 = time.perf_counter()
        report = scan(self.request(world, case),
                      ScanContext(out_dir=out, cache_dir=self.cache_dir, device="cpu"))
        cleaned = world.load(out) if report.output is not None else case.backbone
        lam = report.sweep.chosen_lambda if report.sweep else None
        target_of = {t.id: t.target for t in report.metrics.triggers}
        targets = sorted({target_of[f.trigger_id] for f in report.findings
                          if f.trigger_id in target_of})
        return Cleaned(cleaned, time.perf_counter() - t0,
                       flagged=report.verdict.status == "backdoor_suspected",
                       score=detection_score(report),
                       detail={"verdict": report.verdict.status, "lambda": lam,
                               "cleaning": report.cleaning.status if report.cleaning else None,
                               "targets": targets,  # the findings' targets
                               "config_hash": report.config_hash,
                               "wrote_checkpoint": report.output is not None})


# ScanRequest's fields when the bench was written: a field added since is a new step of the
# product, switched off for the pinned IBVS baselines (``pinned_off``)
SESSION_START_FIELDS = frozenset({
    "suspect", "base", "suspect_revision", "base_revision", "evaluation", "evaluation_revision",
    "injection_data", "recipe", "focus", "lambdas", "budget_points", "fixed_lambda", "bv",
    "triggers", "user_targets", "probes", "inversion", "inversion_steps", "max_eval",
    "min_asr_gap", "seed"})


def pinned_off() -> dict[str, Any]:
    """Overrides that switch off every ScanRequest step added after ``SESSION_START_FIELDS``:
    a sub-model with an ``enabled`` flag gets ``enabled=False``, a flag that defaults on, False."""
    out: dict[str, Any] = {}
    for name, f in ScanRequest.model_fields.items():
        if name in SESSION_START_FIELDS:
            continue
        default = f.get_default(call_default_factory=True)
        if isinstance(default, BaseModel) and "enabled" in type(default).model_fields:
            out[name] = default.model_copy(update={"enabled": False})
        elif default is True:
            out[name] = False
    return out


def scan_defences(cache_dir: Path | None) -> list[ScanDefence]:
    """The product (defaults now), the paper's plain IBVS and the pinned focused IBVS (both
    with the steps added to the scan since switched off)."""
    plain = Focus(keep=1.0, agree_with_suspect=False)
    focused = Focus(keep=0.2, agree_with_suspect=True)
    off = pinned_off()
    return [ScanDefence("product", {}, cache_dir),
            ScanDefence("ibvs-plain", {"focus": plain, **off}, cache_dir),
            ScanDefence("ibvs-focused", {"focus": focused, **off}, cache_dir)]


Repair = Callable[[World, str, Backbone, int], tuple[Backbone, dict[str, Any]]]


@dataclass(frozen=True)
class RepairDefence:
    """A classic repair on the defender's clean data (no detection, always applied)."""

    name: str
    repair: Repair

    def __call__(self, world: World, case: Case) -> Cleaned:
        t0 = time.perf_counter()
        backbone, detail = self.repair(world, case.task, case.backbone, case.seed)
        return Cleaned(backbone, time.perf_counter() - t0, detail=detail)
