"""Backdoor vectors (BV): BV = θ_backdoored − θ_clean (Pawlak et al., arXiv:2510.08016).

Both fine-tunes start from the same θ_pre with the same seed, data order and hyper-parameters and
differ only in poisoning, so BV = τ_bd − τ_clean isolates what the backdoor added: merging a
backdoored model with coefficient λ adds exactly λ·BV. Here: computing BVs from checkpoints and
comparing them (global and per-tensor cosine).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mergeshield import checkpoints
from mergeshield.checkpoints import TensorInfo
from mergeshield.errors import UnsupportedModelError
from mergeshield.models import backbone_keys, family_for
from mergeshield.task_vectors import TaskVector, cosine, per_tensor_cosine


def backdoor_vector(clean: Mapping[str, Tensor], backdoored: Mapping[str, Tensor],
                    keys: Sequence[str]) -> TaskVector:
    """BV = backdoored − clean over the backbone ``keys``."""
    return TaskVector.between(clean, backdoored, keys)


def from_checkpoints(clean: checkpoints.Checkpoint, backdoored: checkpoints.Checkpoint
                     ) -> TaskVector:
    """The BV of two opened checkpoints, over their family's backbone (shared float tensors when
    the family is unknown); architectures are checked first."""
    a, b, keys = _canonical_pair(clean, backdoored)
    return backdoor_vector(a, b, keys)


def file_specs(clean: checkpoints.Checkpoint, backdoored: checkpoints.Checkpoint
               ) -> dict[str, TensorInfo]:
    """The float32 specs of ``from_checkpoints(clean, backdoored)`` as a file stores it, read
    from the headers (no tensor computed), so the BV is written as it is computed."""
    a, _, keys = _canonical_pair(clean, backdoored)
    info = a.info  # type: ignore[attr-defined]
    return {k: TensorInfo(torch.float32, info(k).shape, 4 * math.prod(info(k).shape))
            for k in keys}


def _canonical_pair(clean: checkpoints.Checkpoint, backdoored: checkpoints.Checkpoint
                    ) -> tuple[Mapping[str, Tensor], Mapping[str, Tensor], list[str]]:
    try:
        family = family_for(clean.config, backdoored.config)
    except UnsupportedModelError:
        family = None
    a = family.canonical(clean) if family else clean
    b = family.canonical(backdoored) if family else backdoored
    keys, _ = backbone_keys(family, a, b)
    checkpoints.check_compatible(a, b, keys=set(keys).__contains__)
    return a, b, list(keys)


def similarity(bvs: Sequence[TaskVector]) -> list[list[float]]:
    """The global cosine matrix of ``bvs`` (method.md, "Similarity")."""
    return [[cosine(x, y) if i != j else 1.0 for j, y in enumerate(bvs)]
            for i, x in enumerate(bvs)]


def tensor_similarity(a: TaskVector, b: TaskVector) -> dict[str, float]:
    """Per-tensor cosine of two BVs over the tensors they share."""
    shared = [k for k in a if k in b]
    return per_tensor_cosine(a.restrict(shared), b.restrict(shared))
