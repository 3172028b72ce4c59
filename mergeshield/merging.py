"""Merging fine-tuned checkpoints of one base: Task Arithmetic, TIES and DARE, optionally with IBVS.

θ_M = θ_pre + merge(τ_1..τ_T); with IBVS, θ_M' = θ_M − λ·BV_inj (post-merge subtraction, the
default of method.md). Output: the base's layout with the merged backbone; other tensors (heads,
text tower) come from the base, since each task's head belongs to its own task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mergeshield import checkpoints
from mergeshield.errors import ConfigError, UnsupportedModelError
from mergeshield.merge_methods import dare_mergekit, task_arithmetic, ties, ties_mergekit
from mergeshield.models import ModelFamily, backbone_keys, family_for
from mergeshield.task_vectors import TaskVector
from mergeshield.tensor_stream import TensorStream


class MergeConfig(BaseModel):
    """One merge of task vectors: the method and its parameters, as the merge's ``__metadata__``
    records it (a plan's, from ``MergePlan.merge_config``, with mergekit's defaults)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["task_arithmetic", "ties", "dare_ties", "dare_linear"] = "task_arithmetic"
    weights: list[float] = Field(default_factory=lambda: [0.3])  # λ_t; one value = all tasks
    keep: float = 0.2  # TIES trim: fraction of each task vector kept
    # "mergekit": TIES as mergekit-yaml merges it (``ties_mergekit``: per-tensor trim, one density
    # and weight per model, ``normalize``), what a merge plan asks for; "paper": ``ties``
    ties_form: Literal["paper", "mergekit"] = "paper"
    # mergekit's forms (TIES, DARE): per model (None: ``keep`` for all); for DARE each entry's
    # chance of being kept
    densities: list[float] | None = None
    # mergekit's forms: divide by the (agreeing) models' summed weights (None: mergekit's default,
    # on for TIES, off for DARE)
    normalize: bool | None = None
    # DARE (``merge_methods.dare_mergekit``): the kept entries scaled back to the tensor's L1 norm
    # (None: mergekit's default, on); the seed of its drops, and the name each model's drops are
    # drawn under (a plan's model names; None: their positions)
    rescale: bool | None = None
    seed: int = 0
    models: list[str] | None = None
    subtract_lambda: float = 0.0  # IBVS after the merge: θ_M − λ·BV (needs a BV)


def merged_tensors(base: Mapping[str, Tensor], tvs: Sequence[TaskVector], cfg: MergeConfig,
                   bv: TaskVector | None = None) -> TensorStream:
    """θ_pre + merge(τ) (− λ·BV), one tensor at a time in ``base``'s order (task arithmetic and
    IBVS stream by element ranges; TIES and DARE tensor by tensor)."""
    if not tvs:
        raise ConfigError("merge needs at least one fine-tuned model")
    weights = cfg.weights * len(tvs) if len(cfg.weights) == 1 else cfg.weights
    densities = cfg.densities or [cfg.keep] * len(tvs)
    if cfg.method in ("dare_ties", "dare_linear"):
        tau = dare_mergekit(list(tvs), densities, weights, consensus=cfg.method == "dare_ties",
                            normalize=cfg.normalize is True, rescale=cfg.rescale is not False,
                            seed=cfg.seed, draws=cfg.models)
    elif cfg.method == "ties" and cfg.ties_form == "mergekit":
        tau = ties_mergekit(list(tvs), densities, weights, cfg.normalize is not False)
    elif cfg.method == "ties":
        if len(set(weights)) > 1:
            raise ConfigError("TIES takes one scale for the merged vector, not one per model")
        tau = ties(list(tvs), keep=cfg.keep, scale=weights[0])
    else:
        tau = task_arithmetic(list(tvs), weights)
    if bv is not None and cfg.subtract_lambda:
        tau = tau - cfg.subtract_lambda * bv.restrict(tau)
    return tau.apply_lazily(base)


def task_vectors(base: checkpoints.Checkpoint, models: Sequence[checkpoints.Checkpoint]
                 ) -> tuple[Mapping[str, Tensor], list[TaskVector], ModelFamily | None]:
    """The base (canonical names) and each model's task vector over the shared backbone."""
    family: ModelFamily | None
    try:
        family = family_for(base.config, models[0].config)
    except UnsupportedModelError:
        family = None
    b = family.canonical(base) if family else base
    tvs = []
    for ck in models:
        m = family.canonical(ck) if family else ck
        keys, _ = backbone_keys(family, b, m)
        checkpoints.check_compatible(b, m, keys=set(keys).__contains__)
        tvs.append(TaskVector.between(b, m, keys))
    shared = [k for k in tvs[0] if all(k in tv for tv in tvs)]
    return b, [tv.restrict(shared) for tv in tvs], family
