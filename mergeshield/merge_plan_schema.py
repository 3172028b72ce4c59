"""A merge plan and what running it reports (issue 17): the data, read and checked here; run by
``merge_plan``.

The plan is a mergekit YAML (``merge_method``, ``base_model``, ``models`` with ``model`` and
``parameters.weight`` / ``density``, ``parameters.normalize`` / ``rescale``, ``dtype``) plus an
optional ``mergeshield:`` section mergekit does not read (``PlanOptions``; DARE's ``seed`` too). A
model is a local path or a hub id, at a branch, tag or commit as mergekit writes it:
``org/name@revision``. A plan that MergeShield would merge differently from mergekit is refused
here, before any scan (``MergePlan.parse``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergeshield.errors import ConfigError
from mergeshield.file_safety import read_option_file
from mergeshield.merge_defence import MergeDefence
from mergeshield.merging import MergeConfig
from mergeshield.pipeline import ScanRequest
from mergeshield.report.schema import RateModel

MAX_PLAN_BYTES = 2**20
MAX_MODELS = 32
# mergekit's ``org/name@revision``: a hub model at a branch, tag or commit
AT_REVISION = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)@([\w./-]{1,200})$")


def split_revision(name: str) -> tuple[str, str | None]:
    """A plan's ``org/name@rev`` as (``org/name``, ``rev``); any other name as (name, None)."""
    at = AT_REVISION.match(name)
    return (at[1], at[2]) if at else (name, None)


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelParameters(_Strict):
    weight: float = Field(default=1.0, ge=-10, le=10, allow_inf_nan=False)
    density: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)


class PlanModel(_Strict):
    model: str = Field(min_length=1, max_length=500)
    parameters: ModelParameters = Field(default_factory=ModelParameters)


class PlanParameters(_Strict):
    normalize: bool | None = None  # mergekit's default: True for TIES, else False
    # the sparsified deltas scaled back to their L1 norm; mergekit's default: True for DARE, else
    # False (task arithmetic sparsifies nothing: no effect; TIES with it: refused)
    rescale: bool | None = None


class PlanOptions(_Strict):
    """The ``mergeshield:`` section: what mergekit does not know."""

    policy: Literal["clean", "exclude", "include"] = "clean"
    evaluation: dict[str, str] = Field(default_factory=dict)  # model -> its task's dataset
    # ScanRequest options for every model's scan (e.g. {"max_eval": 500}); {}: the defaults
    scan: dict[str, Any] = Field(default_factory=dict)
    # accuracy points the defended merge may cost any task with evaluation data against the
    # undefended merge (mergeshield/merge_defence.py chooses how much correction enters)
    budget_points: float = Field(default=2.0, ge=0, le=100, allow_inf_nan=False)
    # DARE's random drop: model m's drop of tensor k is drawn from a generator seeded by (seed,
    # k, m) (``merge_methods.dare_generator``); mergekit's own seed is ``--random-seed``
    seed: int = Field(default=0, ge=0, le=2**63 - 1)


class MergePlan(_Strict):
    merge_method: Literal["task_arithmetic", "ties", "dare_ties", "dare_linear"]
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
        """The merge of this plan's models, in its order, with mergekit's defaults."""
        weights = [m.parameters.weight for m in self.models]
        densities = [m.parameters.density or 1.0 for m in self.models]  # mergekit's default: 1
        normalize, rescale = self.parameters.normalize, self.parameters.rescale
        if self.merge_method in ("dare_ties", "dare_linear"):
            return MergeConfig(method=self.merge_method, weights=weights, densities=densities,
                               normalize=normalize is True, rescale=rescale is not False,
                               seed=self.mergeshield.seed, models=[m.model for m in self.models])
        if self.merge_method == "ties":  # as mergekit merges it, normalize on by default
            if rescale:
                raise ConfigError("rescale: TIES with its trimmed deltas rescaled is not merged "
                                  "here (yet); leave rescale out, or merge with mergekit")
            return MergeConfig(method="ties", ties_form="mergekit", weights=weights,
                               densities=densities, normalize=normalize is not False)
        if normalize:
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
    # the plan merged without its flagged models (what ``exclude`` gives; measured when a model
    # was flagged and another was not): what a found trigger's ASR on the merge is held against
    accuracy_without: RateModel | None = None
    # trigger id -> ASR of each trigger its scan found: on the fine-tune, on the merge, on the
    # undefended merge, on the merge without the flagged models
    asr_alone: dict[str, RateModel] = Field(default_factory=dict)
    asr_merged: dict[str, RateModel] = Field(default_factory=dict)
    asr_undefended: dict[str, RateModel] = Field(default_factory=dict)
    asr_without: dict[str, RateModel] = Field(default_factory=dict)


class PlanReport(_Strict):
    plan: dict[str, Any]
    policy: str
    merge: dict[str, Any]
    defence: MergeDefence | None = None  # the scale of the cleaned models' corrections
    models: list[PlanModelResult]
    output: list[str]  # files written
