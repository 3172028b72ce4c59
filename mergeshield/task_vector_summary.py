"""The report's summary of a task vector: per-tensor and per-layer norms, cosine with BV_inj.

Architecture-agnostic (no forward pass): it runs for every scan, a family known or not.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mergeshield.layers import per_layer
from mergeshield.report.schema import SkippedTensor, TaskVectorSummary, TensorStat
from mergeshield.task_vectors import TaskVector


def summarise(tau: TaskVector, base: Mapping[str, Tensor], skipped: list[tuple[str, str]],
              bv: TaskVector | None) -> TaskVectorSummary:
    """Per-tensor and global norms of τ (relative to the base), cosine with BV_inj per tensor.

    One pass, one tensor at a time: architecture-agnostic, runs for unknown families too.
    """
    stats: list[TensorStat] = []
    base_norms: list[float] = []
    total = base_total = 0.0
    n_params = 0
    for name in tau:
        delta = tau[name]
        base_norm = float(torch.linalg.vector_norm(base[name].float()))
        norm = float(torch.linalg.vector_norm(delta))
        cos = None
        if bv is not None:
            other = bv[name].flatten()
            den = norm * float(torch.linalg.vector_norm(other))
            cos = float(delta.flatten() @ other) / den if den > 0 else 0.0
        stats.append(TensorStat(name=name, numel=delta.numel(), norm=norm,
                                relative_norm=norm / base_norm if base_norm > 0 else 0.0,
                                cosine_with_injection_bv=cos))
        base_norms.append(base_norm)
        total += norm * norm
        base_total += base_norm * base_norm
        n_params += delta.numel()
    return TaskVectorSummary(
        n_tensors=len(stats), n_parameters=n_params, norm=total ** 0.5, base_norm=base_total ** 0.5,
        per_tensor=stats, skipped=[SkippedTensor(name=n, reason=r) for n, r in skipped],
        per_layer=per_layer((s.name, s.numel, s.norm, b) for s, b in zip(stats, base_norms,
                                                                          strict=True)),
    )
