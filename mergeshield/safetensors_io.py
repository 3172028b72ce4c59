"""Our own reader of safetensors headers and a streaming safetensors writer.

A safetensors file is ``u64 little-endian header length N``, ``N`` bytes of UTF-8 JSON, then the
data region. The header is validated here before any other code touches the file, so a hostile
header (a 1 TB claim, overlapping tensors, a wrong byte count) is refused without allocating.
The writer computes the header up front from ``specs`` and writes each tensor as it arrives.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from mergeshield import cancellation
from mergeshield.errors import (
    ConfigError,
    CorruptCheckpointError,
    InvalidWeightsError,
    StorageFullError,
    UnsupportedTensorError,
)
from mergeshield.file_safety import open_regular, plain_text, read_regular

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
    # fast path: any NaN/inf makes the (float64) sum non-finite; only then look element-wise
    if t.numel() and not bool(torch.isfinite(t.sum(dtype=torch.float64))) \
            and not bool(torch.isfinite(t).all()):
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


def write_safetensors(path: Path, specs: list[tuple[str, TensorInfo]],
                      tensors: Iterator[tuple[str, torch.Tensor]],
                      metadata: Mapping[str, str]) -> None:
    """Write one file: the header from ``specs``, then each tensor as ``tensors`` yields it."""
    with AtomicFile(path) as f:
        f.write(header_bytes(specs, metadata))
        for name, info in specs:
            got = next(tensors, None)
            if got is None:
                raise ConfigError(f"the tensors ended before {name!r}: specs list more tensors "
                                  "than were produced", details={"tensor": name})
            got_name, tensor = got
            if got_name != name or tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
                raise ConfigError(
                    f"tensor {got_name!r} ({tensor.dtype}, {tuple(tensor.shape)}) does not match "
                    f"the next spec {name!r} ({info.dtype}, {info.shape}): produce tensors in "
                    "spec order with the declared dtype and shape",
                    details={"tensor": got_name, "expected": name})
            check_finite(got_name, tensor)  # never write NaN or infinity into an output
            write_tensor_bytes(f, tensor)
            del tensor, got  # peak memory: one tensor


SHARD_NAME = "model-{i:05d}-of-{n:05d}.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _plan_shards(specs: list[tuple[str, TensorInfo]],
                 max_shard_bytes: int) -> list[list[tuple[str, TensorInfo]]]:
    shards: list[list[tuple[str, TensorInfo]]] = [[]]
    size = 0
    for name, info in specs:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, info))
        size += info.nbytes
    return shards


def save_checkpoint(
    out_dir: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    *,
    specs: Mapping[str, TensorInfo] | None = None,
    config: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Path] | None = None,
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> list[Path]:
    """Write a Hugging Face layout folder; with ``specs``, one tensor in memory at a time.

    ``specs`` (name → dtype/shape, in write order) lets the headers be computed up front, so each
    tensor the iterable yields goes straight to disk. Without it the tensors are collected first.
    Above ``max_shard_bytes`` the weights are sharded like transformers does, with an index.
    Every file is written atomically; the list of written files is returned.
    """
    out = Path(out_dir)
    items: Iterator[tuple[str, torch.Tensor]]
    if isinstance(tensors, Mapping):
        mapping: Mapping[str, torch.Tensor] = tensors
        info = getattr(mapping, "info", None)
        if specs is None:
            specs = {k: info(k) if callable(info) else TensorInfo.of(mapping[k]) for k in mapping}
        items = ((k, mapping[k]) for k in specs)
    elif specs is None:
        listed = list(tensors)
        specs = {k: TensorInfo.of(t) for k, t in listed}
        items = iter(listed)
    else:
        items = iter(tensors)
    spec_list = [(k, TensorInfo(v.dtype, tuple(v.shape),
                                math.prod(v.shape) * torch.empty((), dtype=v.dtype).element_size()))
                 for k, v in specs.items()]
    meta = {"format": "pt", **dict(metadata or {})}
    shards = _plan_shards(spec_list, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [SHARD_NAME.format(i=i + 1, n=len(shards)) for i in range(len(shards))])
    written: list[Path] = []
    try:
        for name, shard in zip(names, shards, strict=True):
            write_safetensors(out / name, shard, items, meta)
            written.append(out / name)
    except BaseException:
        for path in written:  # a refused tensor in a later shard: no half checkpoint stays
            path.unlink(missing_ok=True)
        raise
    if next(items, None) is not None:
        raise ConfigError("more tensors were produced than specs list; pass a spec for each")
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(i.nbytes for _, i in spec_list)},
                 "weight_map": {k: n for n, shard in zip(names, shards, strict=True)
                                for k, _ in shard}}
        atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(out / INDEX_NAME)
    _remove_stale_weights(out, {p.name for p in written})
    if config is not None:
        text = json.dumps(dict(config), indent=2, allow_nan=False)  # strict JSON, no bare NaN
        atomic_write_text(out / "config.json", text + "\n")
        written.append(out / "config.json")
    for fname, src in (extra_files or {}).items():
        if Path(fname).name != fname or fname in {"config.json", INDEX_NAME}:
            raise ConfigError(f"extra file name {fname!r} must be a plain file name that does "
                              "not replace the weights or config", details={"file": fname})
        atomic_write_bytes(out / fname, read_regular(Path(src)))  # never a FIFO or device
        written.append(out / fname)
    return written


def _remove_stale_weights(out: Path, keep: set[str]) -> None:
    """Drop weight files of an earlier, differently sharded write so loaders see one layout."""
    for path in out.iterdir():
        stale = path.name == "model.safetensors" or path.name == INDEX_NAME or (
            path.name.startswith("model-") and path.name.endswith(".safetensors"))
        if stale and path.name not in keep:
            path.unlink()
