"""A stream of named tensors that can also be computed a range of elements at a time.

``TaskVector.apply_lazily`` returns one. Iterated, it yields ``(name, tensor)`` pairs as any lazy
mapping would; the checkpoint writer (``checkpoint_writer.py``) asks it instead for each tensor's
flat element ranges, so an elementwise chain such as θ_suspect − λ·BV over safetensors files is
read, computed (in float32) and written a few MiB at a time by several threads, never a whole
tensor and its temporaries at once. A tensor whose computation is not elementwise (a per-tensor
top-k, a TIES election) has no ranges and is computed whole. Pure: no files here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from torch import Tensor

# (start, stop) -> the tensor's flattened elements [start, stop), a fresh or read-only tensor
Range = Callable[[int, int], Tensor]


class TensorStream(Iterator[tuple[str, Tensor]]):
    """``(name, tensor)`` pairs in write order; ``ranges(name)`` computes one by element ranges."""

    def __init__(self, names: Iterable[str], whole: Callable[[str], Tensor],
                 ranges: Callable[[str], Range | None]) -> None:
        self._names = iter(names)
        self.whole = whole  # name -> the whole tensor
        self.ranges = ranges  # name -> its elements by range, or None: only whole

    def __iter__(self) -> TensorStream:
        return self

    def __next__(self) -> tuple[str, Tensor]:
        name = next(self._names)
        return name, self.whole(name)

    def next_name(self) -> str | None:
        """Advance without computing: the next tensor's name, or None at the end."""
        return next(self._names, None)


def ranged(weights: Mapping[str, Tensor], name: str) -> Range | None:
    """``weights[name]`` by element ranges, when ``weights`` can read a range without the rest of
    the tensor (a checkpoint on disk, an in-memory dict); None otherwise."""
    if isinstance(weights, dict):
        tensor = weights[name]
        if not tensor.is_contiguous():
            return None
        flat = tensor.view(-1)
        return lambda start, stop: flat[start:stop]
    reader = getattr(weights, "range_reader", None)
    return reader(name) if callable(reader) else None


def combine(op: Callable[..., Tensor], *parts: Range | None) -> Range | None:
    """``op`` applied elementwise to ranges of ``parts`` (None when any part has none)."""
    present = [p for p in parts if p is not None]
    if len(present) != len(parts):
        return None
    return lambda start, stop: op(*(p(start, stop) for p in present))
