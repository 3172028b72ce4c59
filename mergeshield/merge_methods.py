"""Merge methods over task vectors: task arithmetic (Ilharco et al. 2023), TIES (Yadav et al.
2023) in the paper's form and in mergekit's, and DARE (Yu et al. 2024) as mergekit computes it
with MergeShield's own seeded drops. Each takes ``TaskVector``s and returns the merged one,
lazily (``task_vectors.py`` holds the type and its algebra)."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from mergeshield.errors import ConfigError
from mergeshield.task_vectors import TaskVector, top_k


def elect_sign(vectors: list[TaskVector]) -> TaskVector:
    """TIES sign election: per entry, the sign of the summed values (+1, −1, or 0)."""
    total = sum(vectors)
    assert isinstance(total, TaskVector)
    return total.map(lambda _k, t: torch.sign(t), elementwise=True)


def sign_consistent(vectors: list[TaskVector]) -> list[TaskVector]:
    """Zero every entry whose sign disagrees with the elected sign (TIES "elect")."""
    sign = elect_sign(vectors)
    return [v.zip_with(sign, lambda x, s: torch.where(torch.sign(x) == s, x, torch.zeros_like(x)),
                       elementwise=True) for v in vectors]


def task_arithmetic(vectors: list[TaskVector], weights: float | list[float] = 1.0) -> TaskVector:
    """τ_M = Σ_t λ_t τ_t (Task Arithmetic). Apply with ``tau.apply_to(base)``."""
    if not vectors:
        raise ConfigError("task arithmetic needs at least one task vector")
    lams = [float(weights)] * len(vectors) if isinstance(weights, int | float) else weights
    if len(lams) != len(vectors):
        raise ConfigError(f"{len(lams)} weights for {len(vectors)} task vectors")
    merged = sum(lam * v for lam, v in zip(lams, vectors, strict=True))
    assert isinstance(merged, TaskVector)
    return merged


def ties_mergekit(vectors: list[TaskVector], densities: list[float], weights: list[float],
                  normalize: bool = True) -> TaskVector:
    """TIES as mergekit merges it (``merge_method: ties``), for plans written for mergekit: each
    task vector trimmed *per tensor* to its ``int(density·n)`` largest entries (at least one),
    times its weight; per entry the sign of the weighted sum elected (+ on a tie); the agreeing
    weighted entries summed and, with ``normalize`` (mergekit's default), divided by the summed
    weights of the models that agree. ``ties`` below is the paper's form (one trim over the whole
    vector, the disjoint mean times one scale); the two differ (docs/benchmarks/
    merge-plan-mergekit.md)."""
    _check_mergekit_args("TIES", vectors, densities, weights)

    def merged(name: str) -> Tensor:
        deltas = torch.stack([_trim_tensor(v[name], d)
                              for v, d in zip(vectors, densities, strict=True)])  # (T, *shape)
        return _mergekit_mix(deltas, weights, consensus=True, normalize=normalize)

    return TaskVector(vectors[0], merged)


def dare_mergekit(vectors: list[TaskVector], densities: list[float], weights: list[float], *,
                  consensus: bool, normalize: bool = False, rescale: bool = True, seed: int = 0,
                  draws: list[str] | None = None) -> TaskVector:
    """DARE (Yu et al., arXiv:2311.03099) as mergekit 0.1.5 merges it: ``dare_ties`` with
    ``consensus``, ``dare_linear`` without. Each entry of each task vector is kept with
    probability ``density`` (a Bernoulli draw; density 1 draws nothing), with ``rescale`` the kept
    ones scaled so the tensor keeps its L1 norm (mergekit's ``RescaleNorm.l1``: about 1/density,
    not exactly), times its weight; then, with ``consensus``, TIES's sign election and agreeing
    sum (no magnitude trim), else the plain sum; ``normalize`` divides by the summed (agreeing)
    weights, off by default as in mergekit. The draws are MergeShield's own: model ``i``'s drop of
    tensor ``k`` comes from ``dare_generator(seed, k, draws[i])`` (default: ``str(i)``), so a
    merge depends on neither the tensors' order nor the other models; mergekit draws from torch's
    global generator instead, in its scheduler's order (docs/decisions.md)."""
    _check_mergekit_args("DARE", vectors, densities, weights)
    keys = [str(i) for i in range(len(vectors))] if draws is None else draws
    if len(keys) != len(vectors):
        raise ConfigError(f"{len(keys)} draw names for {len(vectors)} task vectors")

    def merged(name: str) -> Tensor:
        deltas = []
        for v, d, key in zip(vectors, densities, keys, strict=True):
            t = v[name]
            kept = dare_drop(t, d, dare_generator(seed, name, key))
            deltas.append(l1_rescaled(t, kept) if rescale and kept is not t else kept)
        return _mergekit_mix(torch.stack(deltas), weights, consensus=consensus,  # (T, *shape)
                             normalize=normalize)

    return TaskVector(vectors[0], merged)


def dare_generator(seed: int, tensor: str, draw: str) -> torch.Generator:
    """The CPU generator of one model's drop of one tensor, seeded by SHA-256 of (seed, tensor
    name, the model's draw name): independent of every other tensor and model."""
    digest = hashlib.sha256(f"{seed}\0{tensor}\0{draw}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def dare_drop(t: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """``t`` with each entry kept with probability ``density`` (mergekit's ``sparsify.bernoulli``
    draw: one ``torch.bernoulli`` over a tensor of ``density``), the rest zeroed; unscaled."""
    if density >= 1.0 or t.numel() == 0:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator)


def l1_rescaled(t: Tensor, kept: Tensor) -> Tensor:
    """``kept`` (``t`` sparsified) scaled to ``t``'s L1 norm (mergekit's ``rescaled_masked_tensor``
    with ``RescaleNorm.l1``: unscaled when either norm is under 1e-7)."""
    before, after = t.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def _mergekit_mix(deltas: Tensor, weights: list[float], consensus: bool, normalize: bool
                  ) -> Tensor:
    """mergekit's ``GeneralizedTaskArithmeticMerge`` after sparsifying: (T, *shape) deltas
    weighted; with ``consensus`` only the entries agreeing with the sign of the weighted sum
    (+ on a tie) summed; ``normalize``: over the summed (agreeing) weights, a zero divisor read
    as 1."""
    w = torch.tensor(weights, dtype=deltas.dtype).view(-1, *[1] * (deltas.dim() - 1))
    deltas = deltas * w
    if consensus:
        majority = (deltas.sum(0) >= 0).to(deltas.dtype) * 2 - 1
        agree = deltas.sign() == majority  # a dropped or trimmed (zero) entry never agrees
        mixed = (deltas * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    return mixed / divisor if normalize else mixed


def _check_mergekit_args(what: str, vectors: list[TaskVector], densities: list[float],
                         weights: list[float]) -> None:
    if not vectors:
        raise ConfigError(f"{what} needs at least one task vector")
    if not len(vectors) == len(densities) == len(weights):
        raise ConfigError(f"{len(densities)} densities and {len(weights)} weights for "
                          f"{len(vectors)} task vectors")
    if not all(0.0 < d <= 1.0 for d in densities):
        raise ConfigError(f"densities must be in (0, 1], got {densities}")


def _trim_tensor(t: Tensor, density: float) -> Tensor:
    """``t`` with all but its ``max(1, int(density·n))`` largest-magnitude entries zeroed."""
    if density >= 1.0 or t.numel() == 0:
        return t
    k = max(1, int(density * t.numel()))
    order = torch.argsort(t.abs().reshape(-1).float(), descending=True)[:k]
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[order] = 1
    return t * mask.reshape_as(t)


def ties(vectors: list[TaskVector], keep: float = 0.2, scale: float = 1.0) -> TaskVector:
    """TIES-Merging: trim each vector to its top ``keep`` (per vector, global), elect signs,
    and take the disjoint mean of the entries that agree with the elected sign; × ``scale``."""
    if not vectors:
        raise ConfigError("TIES needs at least one task vector")
    trimmed = [top_k(v, keep).materialize() for v in vectors]
    sign = elect_sign(trimmed).materialize()

    def disjoint_mean(name: str) -> Tensor:
        s = sign[name]
        stack = torch.stack([t[name] for t in trimmed])  # (T, *shape)
        agree = (torch.sign(stack) == s) & (stack != 0)
        count = agree.sum(0).clamp(min=1)
        return scale * (stack * agree).sum(0) / count

    return TaskVector(trimmed[0], disjoint_mean)
