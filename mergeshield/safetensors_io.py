"""Our own reader of safetensors headers and a streaming safetensors writer.

A safetensors file is ``u64 little-endian header length N``, ``N`` bytes of UTF-8 JSON, then the
data region. The header is validated here before any other code touches the file, so a hostile
header (a 1 TB claim, overlapping tensors, a wrong byte count) is refused without allocating.
The writers (``checkpoint_writer.py``) compute the header up front from the tensors' specs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from mergeshield import cancellation
from mergeshield.errors import (
    CorruptCheckpointError,
    InvalidWeightsError,
    StorageFullError,
    UnsupportedTensorError,
)
from mergeshield.file_safety import open_regular, plain_text

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
MAX_METADATA_BYTES = 2**20  # provenance strings, not payloads
MAX_DIMS = 64
MAX_DIM = 2**62  # a dimension, and the product of the non-zero ones: numel stays an int64
_CHUNK = 64 * 2**20  # bytes written or hashed per step

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# in the safetensors format but not scanned: unsigned wide integers, complex, sub-byte floats
SPEC_ONLY_DTYPES = frozenset({"U16", "U32", "U64", "C64", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"})


@dataclass(frozen=True)
class TensorInfo:
    """What a tensor is, known without reading its data."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorInfo:
        return cls(tensor.dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size())


@dataclass(frozen=True)
class TensorEntry:
    """One validated header entry: where a tensor's bytes live in the data region."""

    info: TensorInfo
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    data_start: int  # absolute file offset of the data region
    tensors: dict[str, TensorEntry]  # in data-offset order
    metadata: dict[str, str]


def _corrupt(path: Path, what: str, tensor: str | None = None) -> CorruptCheckpointError:
    where = f"{path.name}" + (f", tensor {tensor!r}" if tensor is not None else "")
    return CorruptCheckpointError(
        f"{where}: {what}; the file is not a valid safetensors checkpoint, re-export or "
        "re-download it", details={"file": path.name, "tensor": tensor, "problem": what})


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """InvalidWeightsError when a float tensor holds NaN or infinity."""
    if not tensor.is_floating_point():
        return
    t = tensor.to(torch.float16) if tensor.element_size() == 1 else tensor  # fp8: no isfinite
    # fast path: a finite sum proves every entry finite (NaN and ±inf never cancel out); only an
    # overflowing sum or a real NaN/inf looks element-wise. The sum in the tensor's own dtype
    # (float32 accumulation for halves) reads it at memory speed, 20× a float64 sum's
    if t.numel() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise InvalidWeightsError(
            f"tensor {name!r} holds {nan} NaN and {inf} infinite values; the checkpoint is "
            "broken or tampered with", details={"tensor": name, "nan": nan, "inf": inf})


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} in header")
        out[key] = value
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_header(path: Path, raw: bytes, data_size: int) -> SafetensorsHeader:
    """Validate header bytes against a data region of ``data_size`` bytes."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _corrupt(path, f"header is not valid UTF-8 JSON ({str(exc)[:200]})") from None
    if not isinstance(obj, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    if sum(len(k) + len(v) for k, v in metadata.items()) > MAX_METADATA_BYTES:
        raise _corrupt(path, f"__metadata__ is larger than {MAX_METADATA_BYTES} bytes")
    if not all(plain_text(k) and plain_text(v) for k, v in metadata.items()):
        raise _corrupt(path, "__metadata__ holds a string that is not valid Unicode (a lone "
                             "surrogate)")
    entries: list[tuple[str, TensorEntry]] = []
    for name, spec in obj.items():
        entries.append((name, _entry(path, name, spec, data_size)))
    entries.sort(key=lambda kv: (kv[1].begin, kv[1].end))
    expected = 0
    for name, entry in entries:  # the spec: the data region is fully indexed, without holes
        if entry.begin < expected:
            raise _corrupt(path, f"data_offsets overlap another tensor (begins at {entry.begin}, "
                                 f"previous tensor ends at {expected})", name)
        if entry.begin > expected:
            raise _corrupt(path, f"hole in the data region before this tensor ({expected} to "
                                 f"{entry.begin})", name)
        expected = entry.end
    if expected != data_size:
        raise _corrupt(path, f"tensors cover {expected} bytes but the data region holds "
                             f"{data_size} (truncated or padded file)")
    return SafetensorsHeader(path, 0, dict(entries), dict(metadata))


def _entry(path: Path, name: str, spec: Any, data_size: int) -> TensorEntry:
    if not name:
        raise _corrupt(path, "empty tensor name")
    if not plain_text(name):
        raise _corrupt(path, "tensor name is not valid Unicode (a lone surrogate)",
                       name.encode("utf-8", "backslashreplace").decode())
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise _corrupt(path, "entry must have exactly dtype, shape and data_offsets", name)
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if isinstance(dtype, str) and dtype in SPEC_ONLY_DTYPES:
        raise UnsupportedTensorError(
            f"{path.name}, tensor {name!r}: dtype {dtype} is valid safetensors but MergeShield "
            f"cannot scan it (supported: {', '.join(sorted(DTYPES))}); convert the checkpoint "
            "to float32, float16 or bfloat16", details={"file": path.name, "tensor": name,
                                                       "dtype": dtype})
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _corrupt(path, f"unknown dtype {str(dtype)[:32]!r}", name)
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(_is_int(d) and d >= 0 for d in shape)):
        raise _corrupt(path, "shape must be a list of at most 64 non-negative integers", name)
    if math.prod(max(d, 1) for d in shape) > MAX_DIM:
        raise _corrupt(path, f"shape {str(shape)[:100]} has more than 2**62 elements (even when "
                             "a dimension is 0, no tensor library can index it)", name)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets)):
        raise _corrupt(path, "data_offsets must be [begin, end] integers", name)
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _corrupt(path, f"data_offsets [{begin}, {end}] fall outside the data region "
                             f"of {data_size} bytes", name)
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    nbytes = math.prod(shape) * itemsize
    if end - begin != nbytes:
        raise _corrupt(path, f"dtype {dtype} and shape {shape} need {nbytes} bytes but "
                             f"data_offsets span {end - begin}", name)
    return TensorEntry(TensorInfo(DTYPES[dtype], tuple(shape), nbytes), begin, end)


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of ``path``; reads at most the header bytes."""
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _corrupt(path, f"file is {size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise _corrupt(path, f"header length {n} exceeds the file ({size} bytes) or the "
                                     f"{MAX_HEADER_BYTES}-byte limit")
            raw = f.read(n)
    except OSError as exc:
        raise _corrupt(path, f"cannot read the file ({exc.strerror})") from None
    if len(raw) != n:
        raise _corrupt(path, "file changed while reading the header")
    header = parse_header(path, raw, size - 8 - n)
    return SafetensorsHeader(path, 8 + n, header.tensors, header.metadata)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (a cancelled scan stops between two)."""
    digest = hashlib.sha256()
    with os.fdopen(open_regular(Path(path)), "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            cancellation.check()
    return digest.hexdigest()


class AtomicFile:
    """Write ``path`` via a hidden temporary file in the same folder: fsync, then ``os.replace``,
    so a reader sees the old file or the new one, never half of one. A failed write leaves
    nothing behind; one that ran out of room raises ``StorageFullError``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")

    def __enter__(self) -> IO[bytes]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: never follow a planted link; mode 0o666 minus the umask, like a plain open()
        self._f = os.fdopen(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
        return self._f

    def __exit__(self, exc_type: object, exc: BaseException | None, _tb: object) -> None:
        try:
            with self._f:  # closed whatever happens
                if exc is None:
                    self._f.flush()
                    os.fsync(self._f.fileno())
            if exc is None:
                os.replace(self.tmp, self.path)
                return
        except OSError as err:  # a full disk often shows only at flush, fsync or close
            exc = err
        self.tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and (full := StorageFullError.of(exc, self.path.name)):
            raise full from exc
        if exc_type is None:
            raise exc


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with AtomicFile(Path(path)) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def header_bytes(specs: Iterable[tuple[str, TensorInfo]], metadata: Mapping[str, str]) -> bytes:
    """``u64 length`` + JSON header, padded with spaces to an 8-byte boundary."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, info in specs:
        if info.dtype not in DTYPE_NAMES:
            raise unsupported_dtype(name, info.dtype)
        if not plain_text(name):
            raise CorruptCheckpointError("a tensor name is not valid Unicode (a lone surrogate)",
                                         details={"tensor": ascii(name)})
        nbytes = math.prod(info.shape) * torch.empty((), dtype=info.dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def unsupported_dtype(name: str, dtype: torch.dtype) -> UnsupportedTensorError:
    kind = str(dtype).removeprefix("torch.")
    return UnsupportedTensorError(
        f"tensor {name!r} has dtype {kind}, which MergeShield cannot scan or store as "
        f"safetensors (supported: {', '.join(sorted(DTYPES))}); convert the checkpoint to "
        "float32, float16 or bfloat16", details={"tensor": name, "dtype": kind})


def write_tensor_bytes(f: IO[bytes], tensor: torch.Tensor) -> None:
    """Raw little-endian bytes of ``tensor``, written in bounded chunks."""
    assert sys.byteorder == "little", "safetensors is little-endian"
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    for start in range(0, flat.numel(), _CHUNK):
        f.write(flat[start:start + _CHUNK].numpy().data)


INDEX_NAME = "model.safetensors.index.json"
