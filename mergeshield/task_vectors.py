"""Task vectors and their algebra (Ilharco et al. 2023; Pawlak et al. arXiv:2510.08016).

A task vector is τ = θ_ft − θ_pre over the shared backbone. A backdoor vector is the same type:
``bv = TaskVector.between(clean, backdoored)``. Values are immutable and *lazy*: every operation
returns a new ``TaskVector`` whose tensors are computed one at a time when read, so a chain such as
``suspect_tv - lam * bv_inj`` over memory-mapped checkpoints streams with a few tensors in memory.
Call ``materialize()`` to compute everything once when a vector is read many times.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Literal

import torch
from torch import Tensor

from mergeshield.errors import ConfigError, IncompatibleModelsError

_Fn = Callable[[str], Tensor]


class TaskVector(Mapping[str, Tensor]):
    """An immutable, lazily evaluated mapping ``tensor name -> delta`` (always float32)."""

    __slots__ = ("_fn", "_key_set", "_keys")

    def __init__(self, keys: Iterable[str], fn: _Fn) -> None:
        self._keys: tuple[str, ...] = tuple(keys)
        self._key_set = frozenset(self._keys)
        self._fn = fn

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> TaskVector:
        """Wrap existing deltas (copied to float32; the caller's tensors are never touched)."""
        frozen = {k: v.detach().to(torch.float32, copy=True) for k, v in tensors.items()}
        return cls(frozen, frozen.__getitem__)

    @classmethod
    def between(
        cls,
        base: Mapping[str, Tensor],
        finetuned: Mapping[str, Tensor],
        keys: Iterable[str] | None = None,
    ) -> TaskVector:
        """τ = finetuned − base over ``keys`` (default: the keys of ``finetuned``)."""
        names = tuple(finetuned if keys is None else keys)
        _require_same_keys(names, base, "base")
        _require_same_keys(names, finetuned, "fine-tuned model")

        def delta(name: str) -> Tensor:
            return finetuned[name].to(torch.float32) - base[name].to(torch.float32)

        return cls(names, delta)

    def materialize(self) -> TaskVector:
        """Compute every tensor now; reading the result costs nothing."""
        return TaskVector.from_tensors({k: self[k] for k in self._keys})

    # -- Mapping --------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        if name not in self._key_set:
            raise KeyError(name)
        return self._fn(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._key_set  # without computing the tensor (Mapping's default would)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"TaskVector({len(self._keys)} tensors)"

    # -- algebra --------------------------------------------------------------------------------
    def zip_with(self, other: TaskVector, op: Callable[[Tensor, Tensor], Tensor]) -> TaskVector:
        """Combine two vectors tensor by tensor with ``op``, lazily."""
        _require_same_keys(self._keys, other, "other task vector")
        return TaskVector(self._keys, lambda k: op(self[k], other[k]))

    def __add__(self, other: TaskVector) -> TaskVector:
        return self.zip_with(other, torch.add)

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self.zip_with(other, torch.sub)

    def __neg__(self) -> TaskVector:
        return TaskVector(self._keys, lambda k: -self[k])

    def __mul__(self, scale: float) -> TaskVector:
        s = float(scale)
        return TaskVector(self._keys, lambda k: self[k] * s)

    __rmul__ = __mul__

    def __radd__(self, other: int) -> TaskVector:
        # lets the builtin sum() start from 0
        if other != 0:
            return NotImplemented
        return self

    def map(self, fn: Callable[[str, Tensor], Tensor]) -> TaskVector:
        """Apply ``fn(name, tensor)`` per tensor, lazily."""
        return TaskVector(self._keys, lambda k: fn(k, self[k]))

    def restrict(self, keys: Iterable[str]) -> TaskVector:
        """The same vector over a subset of its tensors."""
        names = tuple(keys)
        _require_same_keys(names, self, "task vector")
        return TaskVector(names, self.__getitem__)

    def apply_to(self, base: Mapping[str, Tensor], scale: float = 1.0) -> dict[str, Tensor]:
        """θ = base + scale·τ on the vector's tensors; other tensors of ``base`` pass through.

        Each result keeps the dtype of its base tensor. Eager; see ``apply_lazily`` to stream.
        """
        return dict(self.apply_lazily(base, scale))

    def apply_lazily(
        self, base: Mapping[str, Tensor], scale: float = 1.0
    ) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(name, base + scale·τ)`` one tensor at a time, in ``base``'s key order."""
        _require_same_keys(self._keys, base, "model")
        mine = self._key_set
        for name in base:
            t = base[name]
            if name in mine:
                yield name, torch.add(t.to(torch.float32), self[name], alpha=scale).to(t.dtype)
            else:
                yield name, t

    # -- measurements ---------------------------------------------------------------------------
    def norms(self) -> dict[str, float]:
        """L2 norm per tensor."""
        return {k: float(torch.linalg.vector_norm(self[k])) for k in self._keys}

    def norm(self) -> float:
        """Global L2 norm over all tensors."""
        return math.sqrt(sum(n * n for n in self.norms().values()))

    def numel(self) -> int:
        return sum(self[k].numel() for k in self._keys)


def _require_same_keys(keys: Iterable[str], other: Mapping[str, Tensor], what: str) -> None:
    missing = [k for k in keys if k not in other]
    if missing:
        raise IncompatibleModelsError(
            f"{len(missing)} tensor(s) are missing from the {what}, e.g. {missing[:3]}; "
            "both sides must share the same backbone tensors",
            details={"missing": missing},
        )


def _same_tensors(a: TaskVector, b: TaskVector) -> None:
    _require_same_keys(a, b, "second vector")
    _require_same_keys(b, a, "first vector")


def cosine(a: TaskVector, b: TaskVector) -> float:
    """Global cosine similarity of the flattened vectors (0.0 when either is zero)."""
    _same_tensors(a, b)
    dot = na = nb = 0.0
    for k in a:
        x, y = a[k].flatten(), b[k].flatten()
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
    return dot / math.sqrt(na * nb) if na > 0 and nb > 0 else 0.0


def per_tensor_cosine(a: TaskVector, b: TaskVector) -> dict[str, float]:
    """Cosine similarity per tensor (0.0 for a zero tensor)."""
    _same_tensors(a, b)
    out: dict[str, float] = {}
    for k in a:
        x, y = a[k].flatten(), b[k].flatten()
        den = float(torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y))
        out[k] = float(x @ y) / den if den > 0 else 0.0
    return out


# -- sparsification and merges (TIES: Yadav et al. 2023; DARE: Yu et al. 2024) ---------------------
def _magnitude_threshold(magnitudes: Iterable[Tensor], keep: float) -> float:
    """The |x| above which the top ``keep`` fraction of all entries lie."""
    flat = torch.cat([m.flatten() for m in magnitudes])
    k = max(1, int(round(keep * flat.numel())))
    return float(torch.topk(flat, k, sorted=False).values.min())


def top_k(tv: TaskVector, keep: float, scope: Literal["global", "tensor"] = "global") -> TaskVector:
    """Keep the ``keep`` fraction of entries with the largest magnitude, zero the rest.

    ``scope="global"`` ranks all entries together (needs one pass over the vector first).
    """
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"keep must be in (0, 1], got {keep}")
    if scope not in ("global", "tensor"):
        raise ConfigError(f"scope must be 'global' or 'tensor', got {scope!r}")
    if keep == 1.0:
        return tv
    if scope == "global":
        thr = _magnitude_threshold((tv[k].abs() for k in tv), keep)
        return tv.map(lambda _k, t: torch.where(t.abs() >= thr, t, torch.zeros_like(t)))

    def per_tensor(_k: str, t: Tensor) -> Tensor:
        thr_t = _magnitude_threshold([t.abs()], keep)
        return torch.where(t.abs() >= thr_t, t, torch.zeros_like(t))

    return tv.map(per_tensor)


def elect_sign(vectors: list[TaskVector]) -> TaskVector:
    """TIES sign election: per entry, the sign of the summed values (+1, −1, or 0)."""
    total = sum(vectors)
    assert isinstance(total, TaskVector)
    return total.map(lambda _k, t: torch.sign(t))


def sign_consistent(vectors: list[TaskVector]) -> list[TaskVector]:
    """Zero every entry whose sign disagrees with the elected sign (TIES "elect")."""
    sign = elect_sign(vectors)
    return [v.zip_with(sign, lambda x, s: torch.where(torch.sign(x) == s, x, torch.zeros_like(x)))
            for v in vectors]


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
