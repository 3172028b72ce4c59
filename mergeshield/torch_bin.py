"""PyTorch ``.bin`` checkpoints, converted once to safetensors without running pickled code.

``torch.load(weights_only=True)`` reads a flat state dict; what is written is bounded by the
bytes the file really holds, so a stride-0 view cannot become a gigabyte file. Called by
:func:`mergeshield.checkpoints.resolve`, the one entry point for reading a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergeshield.checkpoint_writer import write_safetensors
from mergeshield.disk import ensure_room, private_dir
from mergeshield.errors import (
    CorruptCheckpointError,
    MergeShieldError,
    UnsafeFormatError,
    UnsupportedTensorError,
)
from mergeshield.file_safety import check_regular, plain_text
from mergeshield.safetensors_io import DTYPE_NAMES, TensorInfo, sha256_file, unsupported_dtype

__all__ = ["convert"]

# a converted .bin may hold at most this many times its file's bytes: tied weights (two names,
# one storage) are written twice; a thousand views of one storage are not
_CONVERSION_FACTOR = 2


def _unsafe(path: Path, why: str) -> UnsafeFormatError:
    return UnsafeFormatError(f"{path.name}: refused, {why}", details={"file": path.name})


def convert(path: Path, cache_dir: str | Path | None, min_free_bytes: int | None) -> Path:
    """torch.load(weights_only=True) a flat state dict and write it once as safetensors.

    What is written is bounded by what the file holds: a view larger than its storage (a
    stride-0 ``expand``, overlapping strides) is refused, and all tensors together may hold at
    most ``_CONVERSION_FACTOR`` times the file's bytes; the conversion must leave
    ``min_free_bytes`` free (None: no check). A failed conversion leaves no file behind."""
    check_regular(path)
    digest = sha256_file(path)
    folder = private_dir(cache_dir, "mergeshield-converted")
    out = folder / f"{digest}.safetensors"
    if out.is_file():
        return out
    state = _load_pickle(path)
    specs = _conversion_specs(path, state)
    total = sum(info.nbytes for _, info in specs)
    if total > _CONVERSION_FACTOR * path.stat().st_size + 2**20:
        raise CorruptCheckpointError(
            f"{path.name}: its tensors claim {total} bytes but the file holds "
            f"{path.stat().st_size}: many views of the same storage would be written out in "
            "full; save each tensor once (model.state_dict())",
            details={"file": path.name, "bytes": total})
    if min_free_bytes is not None:
        ensure_room(folder, total, min_free_bytes, f"converting {path.name}")
    try:
        write_safetensors(out, specs, iter(state.items()), {"format": "pt"})
    except MergeShieldError:
        raise
    except (RuntimeError, ValueError, TypeError) as exc:  # a tensor torch cannot write out
        raise CorruptCheckpointError(
            f"{path.name}: cannot convert a tensor ({type(exc).__name__}: {str(exc)[:200]})",
            details={"file": path.name}) from None
    return out


def _load_pickle(path: Path) -> dict[str, Any]:
    try:
        try:
            state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, weights_only=True, map_location="cpu")  # legacy format
    except Exception as exc:  # every failure is a refusal or corruption
        text = str(exc)
        if "weights_only" in text or "Unpickl" in type(exc).__name__:
            raise _unsafe(path, "the pickle holds more than plain tensors (code or objects "
                          "that weights_only loading forbids); save a state_dict as "
                          "safetensors") from None
        why = f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
        raise CorruptCheckpointError(f"{path.name}: cannot read the PyTorch file ({why})",
                                     details={"file": path.name}) from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CorruptCheckpointError(f"{path.name}: not a flat dict of named tensors (save "
                                     "model.state_dict())", details={"file": path.name})
    return state


def _conversion_specs(path: Path, state: dict[str, torch.Tensor]
                      ) -> list[tuple[str, TensorInfo]]:
    """Each tensor's spec, once it is known to be a plain dense CPU tensor whose bytes are
    really in the file; anything else is refused before a byte is written."""
    specs = []
    for name, t in state.items():
        if not name or not plain_text(name):
            raise CorruptCheckpointError(
                f"{path.name}: a tensor name is empty or not valid Unicode (a lone surrogate)",
                details={"file": path.name, "tensor": ascii(name)[:200]})
        if t.is_meta:
            raise CorruptCheckpointError(
                f"{path.name}: tensor {name!r} is a meta tensor, a shape with no data; save "
                "the real weights", details={"file": path.name, "tensor": name})
        if t.layout != torch.strided or t.is_quantized or t.is_nested:
            kind = "quantized" if t.is_quantized else "nested" if t.is_nested else "sparse"
            raise UnsupportedTensorError(
                f"{path.name}: tensor {name!r} is {kind} ({t.layout}, {t.dtype}); MergeShield "
                "reads dense tensors only, save dense float weights",
                details={"file": path.name, "tensor": name, "kind": kind})
        if t.dtype not in DTYPE_NAMES:
            raise unsupported_dtype(name, t.dtype)
        info = TensorInfo.of(t)
        if info.nbytes > t.untyped_storage().nbytes():
            raise CorruptCheckpointError(
                f"{path.name}: tensor {name!r} is a view of {info.nbytes} bytes over a storage "
                f"of {t.untyped_storage().nbytes()} (stride 0 or overlapping strides), which "
                "would be written out in full; save contiguous tensors",
                details={"file": path.name, "tensor": name})
        specs.append((name, info))
    return specs
