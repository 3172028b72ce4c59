"""Task vectors and their algebra (Ilharco et al. 2023; Pawlak et al. arXiv:2510.08016).

A task vector is τ = θ_ft − θ_pre over the shared backbone. A backdoor vector is the same type:
``bv = TaskVector.between(clean, backdoored)``. Values are immutable and *lazy*: every operation
returns a new ``TaskVector`` whose tensors are computed one at a time when read, so a chain such as
``suspect_tv - lam * bv_inj`` over checkpoints on disk streams with a few tensors in memory.
Elementwise steps also compute a tensor by element ranges (``ranged``): ``apply_lazily`` hands
the checkpoint writer a ``TensorStream`` that it computes and writes a few MiB at a time.
Call ``materialize()`` to compute everything once when a vector is read many times.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Literal

import torch
from torch import Tensor

from mergeshield.errors import ConfigError, IncompatibleModelsError
from mergeshield.tensor_stream import Range, TensorStream, combine, ranged

_Fn = Callable[[str], Tensor]
_Ranges = Callable[[str], Range | None]


class TaskVector(Mapping[str, Tensor]):
    """An immutable, lazily evaluated mapping ``tensor name -> delta`` (always float32)."""

    __slots__ = ("_fn", "_key_set", "_keys", "_ranges")

    def __init__(self, keys: Iterable[str], fn: _Fn, ranges: _Ranges | None = None) -> None:
        """``fn``: name -> the tensor; ``ranges`` (optional): name -> the same tensor's flattened
        elements by range, bit for bit what ``fn`` gives, or None where it cannot."""
        self._keys: tuple[str, ...] = tuple(keys)
        self._key_set = frozenset(self._keys)
        self._fn = fn
        self._ranges = ranges

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> TaskVector:
        """Wrap existing deltas (copied to float32; the caller's tensors are never touched)."""
        frozen = {k: v.detach().to(torch.float32, copy=True).contiguous()
                  for k, v in tensors.items()}
        return cls(frozen, frozen.__getitem__, lambda k: ranged(frozen, k))

    @classmethod
    def stored(cls, weights: Mapping[str, Tensor]) -> TaskVector:
        """A vector saved as a checkpoint (a BV file): its tensors as float32, read lazily."""
        def delta_range(name: str) -> Range | None:
            return combine(_as_float32, ranged(weights, name))

        return cls(weights, lambda k: _as_float32(weights[k]), delta_range)

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

        def delta(ft: Tensor, b: Tensor) -> Tensor:
            return ft.to(torch.float32) - b.to(torch.float32)

        return cls(names, lambda k: delta(finetuned[k], base[k]),
                   lambda k: combine(delta, ranged(finetuned, k), ranged(base, k)))

    def materialize(self) -> TaskVector:
        """Compute every tensor now; reading the result costs nothing."""
        # one tensor computed and copied at a time (``from_tensors`` of a dict of them would
        # hold the whole vector twice at its peak)
        frozen = {k: self[k].detach().to(torch.float32, copy=True).contiguous()
                  for k in self._keys}
        return TaskVector(frozen, frozen.__getitem__, lambda k: ranged(frozen, k))

    # -- Mapping --------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        if name not in self._key_set:
            raise KeyError(name)
        return self._fn(name)

    def ranged(self, name: str) -> Range | None:
        """``self[name]`` flattened, computed by element ranges; None when a step is not
        elementwise (a per-tensor top-k, a TIES election) or a source cannot read ranges."""
        return self._ranges(name) if self._ranges is not None else None

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._key_set  # without computing the tensor (Mapping's default would)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"TaskVector({len(self._keys)} tensors)"

    # -- algebra --------------------------------------------------------------------------------
    def zip_with(self, other: TaskVector, op: Callable[[Tensor, Tensor], Tensor], *,
                 elementwise: bool = False) -> TaskVector:
        """Combine two vectors tensor by tensor with ``op``, lazily; ``elementwise``: each entry
        of the result depends only on the same entries of the inputs (then it streams by
        ranges)."""
        _require_same_keys(self._keys, other, "other task vector")
        ranges = ((lambda k: combine(op, self.ranged(k), other.ranged(k)))
                  if elementwise else None)
        return TaskVector(self._keys, lambda k: op(self[k], other[k]), ranges)

    def __add__(self, other: TaskVector) -> TaskVector:
        return self.zip_with(other, torch.add, elementwise=True)

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self.zip_with(other, torch.sub, elementwise=True)

    def __neg__(self) -> TaskVector:
        return self.map(lambda _k, t: -t, elementwise=True)

    def __mul__(self, scale: float) -> TaskVector:
        s = float(scale)
        return self.map(lambda _k, t: t * s, elementwise=True)

    __rmul__ = __mul__

    def __radd__(self, other: int) -> TaskVector:
        # lets the builtin sum() start from 0
        if other != 0:
            return NotImplemented
        return self

    def map(self, fn: Callable[[str, Tensor], Tensor], *, elementwise: bool = False
            ) -> TaskVector:
        """Apply ``fn(name, tensor)`` per tensor, lazily (``elementwise``: as in ``zip_with``)."""
        ranges = ((lambda k: combine(lambda t: fn(k, t), self.ranged(k)))
                  if elementwise else None)
        return TaskVector(self._keys, lambda k: fn(k, self[k]), ranges)

    def restrict(self, keys: Iterable[str]) -> TaskVector:
        """The same vector over a subset of its tensors."""
        names = tuple(keys)
        _require_same_keys(names, self, "task vector")
        return TaskVector(names, self.__getitem__, self._ranges)

    def apply_to(self, base: Mapping[str, Tensor], scale: float = 1.0) -> dict[str, Tensor]:
        """θ = base + scale·τ on the vector's tensors; other tensors of ``base`` pass through.

        Each result keeps the dtype of its base tensor. Eager; see ``apply_lazily`` to stream.
        """
        return dict(self.apply_lazily(base, scale))

    def stream(self) -> TensorStream:
        """The vector's own tensors in order, for the checkpoint writer (a BV saved to a file)."""
        return TensorStream(self._keys, self.__getitem__, self.ranged)

    def apply_lazily(self, base: Mapping[str, Tensor], scale: float = 1.0) -> TensorStream:
        """``(name, base + scale·τ)`` one tensor at a time, in ``base``'s key order; the
        checkpoint writer computes each by element ranges where every step allows it."""
        _require_same_keys(self._keys, base, "model")
        mine = self._key_set

        def applied(t: Tensor, delta: Tensor) -> Tensor:  # float32 sum, stored in t's dtype
            return torch.add(t.to(torch.float32), delta, alpha=scale).to(t.dtype)

        def whole(name: str) -> Tensor:
            return applied(base[name], self[name]) if name in mine else base[name]

        def ranges(name: str) -> Range | None:
            own = ranged(base, name)
            return combine(applied, own, self.ranged(name)) if name in mine else own

        return TensorStream(list(base), whole, ranges)

    # -- measurements ---------------------------------------------------------------------------
    def norms(self) -> dict[str, float]:
        """L2 norm per tensor."""
        return {k: float(torch.linalg.vector_norm(self[k])) for k in self._keys}

    def norm(self) -> float:
        """Global L2 norm over all tensors."""
        return math.sqrt(sum(n * n for n in self.norms().values()))

    def numel(self) -> int:
        return sum(self[k].numel() for k in self._keys)


def _as_float32(t: Tensor) -> Tensor:
    return t.to(torch.float32)


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


# -- sparsification (the merge methods that use it: merge_methods.py) ---------------------------
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
        return tv.map(lambda _k, t: torch.where(t.abs() >= thr, t, torch.zeros_like(t)),
                      elementwise=True)

    def per_tensor(_k: str, t: Tensor) -> Tensor:
        thr_t = _magnitude_threshold([t.abs()], keep)
        return torch.where(t.abs() >= thr_t, t, torch.zeros_like(t))

    return tv.map(per_tensor)
