"""Every file access of MergeShield: resolve a source, read it lazily, write checkpoints.

Hub repos are fetched by :mod:`mergeshield.hub`; a model folder is vetted and its weight files
found by :mod:`mergeshield.model_folder`. Weights are read only from validated
safetensors; a PyTorch ``.bin`` is loaded with ``torch.load(weights_only=True)`` and converted
once (:mod:`mergeshield.torch_bin`), an open_clip folder once to the Hugging Face CLIP layout
(:mod:`mergeshield.open_clip`). Anything that would need ``pickle.load`` or remote code is
refused with :class:`UnsafeFormatError` before a byte of it is interpreted.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch

from mergeshield import model_folder, open_clip, torch_bin
from mergeshield.checkpoint_writer import save_checkpoint
from mergeshield.errors import (
    CorruptCheckpointError,
    IncompatibleModelsError,
    InvalidWeightsError,
    SourceNotFoundError,
    mismatches,
)
from mergeshield.file_safety import check_regular, open_regular
from mergeshield.hub import HUB_PATTERNS, download_repo
from mergeshield.models import MAX_PARAMETERS, check_config
from mergeshield.safetensors_io import (
    INDEX_NAME,
    SafetensorsHeader,
    TensorInfo,
    atomic_write_text,
    check_finite,
    read_header,
    sha256_file,
)
from mergeshield.tensor_stream import Range

__all__ = [
    "Checkpoint", "ResolvedSource", "TensorInfo", "atomic_write_text", "check_compatible",
    "extra_files", "open_checkpoint", "read_json", "resolve", "save_checkpoint", "sha256_file",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint located on local disk, with where it came from."""

    source: str
    kind: Literal["hub", "directory", "file"]
    revision_requested: str | None
    revision: str | None  # commit sha for hub sources
    root: Path  # local folder holding the files
    weight_files: tuple[Path, ...]  # as found: safetensors or PyTorch pickles
    config: dict[str, Any] | None
    # What open_checkpoint reads: weight_files, or their safetensors conversions.
    tensor_files: tuple[Path, ...] = field(default=(), repr=False)
    _digests: dict[str, list[tuple[str, int, str]]] = field(
        default_factory=dict, repr=False, compare=False)

    def files_digest(self) -> list[tuple[str, int, str]]:
        """(path relative to root, size, sha256) of each weight file and config.json."""
        if "all" not in self._digests:
            files = list(self.weight_files)
            if (self.root / "config.json").is_file():
                files.append(self.root / "config.json")
            self._digests["all"] = [(_relative(p, self.root), p.stat().st_size, sha256_file(p))
                                    for p in files]
        return list(self._digests["all"])


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def resolve(source: str, *, revision: str | None = None, token: str | None = None,
            endpoint: str | None = None, cache_dir: str | Path | None = None,
            local_files_only: bool = False, min_free_bytes: int | None = None,
            max_parameters: int = MAX_PARAMETERS) -> ResolvedSource:
    """Locate ``source`` (folder, file or hub repo id) and check it is safe to read; a hub
    download or a ``.bin`` conversion must leave ``min_free_bytes`` free on the disk (None: no
    check); a config describing more than ``max_parameters`` parameters is refused."""
    path = Path(source).expanduser()
    limits = _Limits(min_free_bytes, max_parameters)
    if os.path.lexists(path):
        if path.is_dir():
            return _from_folder(source, "directory", path, None, None, cache_dir, limits)
        if open_clip.is_lone_weights(path):  # read with the config beside it, as its folder
            model_folder.vet(path.parent)
            return _from_open_clip(source, "directory", path.parent, None, None, cache_dir,
                                   limits)
        return _from_file(source, path, cache_dir, limits)
    if not _REPO_ID.match(source):
        raise SourceNotFoundError(f"{source!r} is neither an existing path nor a hub repo id "
                                  "(owner/name): check the spelling", details={"source": source})
    folder, sha, remote_names = download_repo(
        source, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir,
        local_files_only=local_files_only, patterns=HUB_PATTERNS, min_free_bytes=min_free_bytes)
    return _from_folder(source, "hub", folder, revision, sha, cache_dir, limits, remote_names)


@dataclass(frozen=True)
class _Limits:
    min_free_bytes: int | None  # free disk a conversion must leave; None = no check
    max_parameters: int


def _from_file(source: str, path: Path, cache_dir: str | Path | None,
               limits: _Limits) -> ResolvedSource:
    if not path.exists():
        raise SourceNotFoundError(f"{path.name}: a symbolic link to nothing; give the file "
                                  "itself", details={"file": path.name})
    check_regular(path)  # a FIFO or device named like a checkpoint: refused before open()
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        read_header(path)
        tensor_files: tuple[Path, ...] = (path,)
    elif suffix in PICKLE_SUFFIXES:
        tensor_files = (torch_bin.convert(path, cache_dir, limits.min_free_bytes),)
    elif suffix in model_folder.REFUSED_SUFFIXES:
        raise model_folder.unsafe(path, "a raw pickle can run arbitrary code when loaded; "
                                        "export the weights as safetensors")
    else:
        raise CorruptCheckpointError(
            f"{path.name}: not a checkpoint file (expected .safetensors, .bin, .pt or .pth)",
            details={"file": path.name})
    return ResolvedSource(source, "file", None, None, path.parent, (path,), None, tensor_files)


def _from_folder(source: str, kind: Literal["hub", "directory"], root: Path,
                 revision: str | None, sha: str | None, cache_dir: str | Path | None,
                 limits: _Limits, remote_names: tuple[str, ...] = ()) -> ResolvedSource:
    model_folder.vet(root)
    if open_clip.is_open_clip(root):
        return _from_open_clip(source, kind, root, revision, sha, cache_dir, limits)
    config = _read_config(root)
    weights = model_folder.weight_files(root, remote_names)
    if weights[0].suffix == ".safetensors":
        headers = [read_header(p) for p in weights]
        tensor_files = weights
    else:
        if config is not None:  # a config bomb is refused before any conversion
            check_config(config, max_parameters=limits.max_parameters)
        tensor_files = tuple(torch_bin.convert(p, cache_dir, limits.min_free_bytes)
                             for p in weights)
        headers = [read_header(p) for p in tensor_files]
    if config is not None:
        elements = sum(math.prod(e.info.shape) for h in headers for e in h.tensors.values())
        check_config(config, weight_elements=elements, max_parameters=limits.max_parameters)
    return ResolvedSource(source, kind, revision, sha, root, weights, config, tensor_files)


def _from_open_clip(source: str, kind: Literal["hub", "directory"], root: Path,
                    revision: str | None, sha: str | None, cache_dir: str | Path | None,
                    limits: _Limits) -> ResolvedSource:
    """A vetted open_clip folder, converted once to the Hugging Face CLIP layout
    (:mod:`mergeshield.open_clip`) and read from there; the source still names its weights."""
    weights = open_clip.weights_file(root)
    stored = ResolvedSource(source, kind, revision, sha, root, (weights,), None)
    with open_checkpoint(stored) as tensors:
        folder = open_clip.convert(root, tensors, cache_dir=cache_dir,
                                   min_free_bytes=limits.min_free_bytes,
                                   max_parameters=limits.max_parameters)
    return ResolvedSource(source, kind, revision, sha, folder, (weights,), _read_config(folder),
                          tuple(sorted(folder.glob("*.safetensors"))))


def _read_config(root: Path) -> dict[str, Any] | None:
    return model_folder.read_json_file(root / "config.json")  # remote code: refused by vet


def read_json(src: ResolvedSource, name: str) -> dict[str, Any] | None:
    """A JSON file (e.g. preprocessor_config.json) beside the weights, or None."""
    if Path(name).name != name or src.kind == "file":
        return None
    return model_folder.read_json_file(src.root / name)


def extra_files(src: ResolvedSource) -> dict[str, Path]:
    """Processor and tokenizer files to copy next to a rewritten checkpoint."""
    if src.kind == "file":
        return {}
    skip = {"config.json", INDEX_NAME, model_folder.TORCH_INDEX}
    inside = _inside(src)
    return {p.name: p for p in sorted(src.root.iterdir())
            if p.suffix in {".json", ".txt", ".model"} and p.name not in skip
            and model_folder.regular_inside(p, inside)}


def _inside(src: ResolvedSource) -> Path:
    """The folder no file of ``src`` may lead out of."""
    return model_folder.allowed_root(src.root)


class Checkpoint(Mapping[str, torch.Tensor]):
    """Lazy ``name → tensor`` view of validated safetensors files; one tensor read per access,
    or one range of its elements (``range_reader``: the checkpoint writer's chunks, read from
    several threads)."""

    def __init__(self, resolved: ResolvedSource) -> None:
        self.config = resolved.config
        self.metadata: dict[str, str] = {}
        self._headers: list[SafetensorsHeader] = []
        self._where: dict[str, int] = {}
        self._handles: dict[int, int] = {}  # shard index -> file descriptor
        self._opening = threading.Lock()
        # per thread, the last ranges read: θ_base + (θ_suspect − θ_base − λ·BV) asks for the
        # base's range twice while computing one chunk; the second read costs nothing
        self._recent = threading.local()
        for i, path in enumerate(resolved.tensor_files or resolved.weight_files):
            header = read_header(path)
            self._headers.append(header)
            self.metadata.update(header.metadata)
            for name in header.tensors:
                if name in self._where:
                    raise CorruptCheckpointError(
                        f"tensor {name!r} appears in two shards", details={"tensor": name})
                self._where[name] = i

    def info(self, name: str) -> TensorInfo:
        """dtype, shape and byte size of ``name`` without reading it."""
        return self._headers[self._where[name]].tensors[name].info

    def __getitem__(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory (``pread``, not a memory map) and tell the kernel
        its pages can go: a pass over a 8 GB checkpoint then holds one tensor, not 8 GB of cache
        charged to the process. Offsets come from the validated header."""
        info = self.info(name)
        tensor = self._read(name, 0, info.nbytes).view(info.dtype).reshape(info.shape)
        check_finite(name, tensor)
        return tensor

    def range_reader(self, name: str) -> Range:
        """``name``'s flattened elements [start, stop), read alone (no other byte of the
        tensor) and checked for NaN and infinity like a whole tensor."""
        info = self.info(name)

        def read(start: int, stop: int) -> torch.Tensor:
            recent: dict[tuple[str, int, int], torch.Tensor] = \
                self._recent.__dict__.setdefault("parts", {})
            key = (name, start, stop)
            if key in recent:
                return recent[key]
            size = info.dtype.itemsize
            part = self._read(name, start * size, (stop - start) * size).view(info.dtype)
            try:
                check_finite(name, part)
            except InvalidWeightsError:
                self[name]  # raises with the whole tensor's counts
                raise
            if len(recent) >= 4:
                recent.pop(next(iter(recent)))
            recent[key] = part
            return part

        return read

    def _read(self, name: str, start: int, size: int) -> torch.Tensor:
        """``size`` bytes of ``name`` from its byte ``start``: a pread that checks for a short
        file, then POSIX_FADV_DONTNEED on what was read."""
        i = self._where[name]
        header = self._headers[i]
        entry = header.tensors[name]
        with self._opening:
            if i not in self._handles:
                self._handles[i] = open_regular(header.path)
            fd = self._handles[i]
        offset = header.data_start + entry.begin + start
        buf = torch.empty(size, dtype=torch.uint8)
        view = buf.numpy().data if size else memoryview(b"")
        done = 0
        while done < size:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CorruptCheckpointError(
                    f"{header.path.name}: tensor {name!r} is cut short (file truncated?)",
                    details={"file": str(header.path), "tensor": name})
            done += n
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
        # safetensors stores little-endian bytes, the byte order of every platform torch targets
        return buf

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def close(self) -> None:
        """Close the open files."""
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_checkpoint(resolved: ResolvedSource) -> Checkpoint:
    """A lazy mapping over the checkpoint's tensors (use as a context manager)."""
    return Checkpoint(resolved)


def _info(weights: Mapping[str, torch.Tensor], name: str) -> TensorInfo:
    info = getattr(weights, "info", None)
    return info(name) if callable(info) else TensorInfo.of(weights[name])


def check_compatible(base: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], *,
                     keys: Callable[[str], bool] | None = None) -> None:
    """Same tensor names and shapes among the selected keys, and dtypes that are equal or both
    floats (a bf16 or fp16 fine-tune of an fp32 base: task vectors are computed in float32),
    else a listed error."""
    pick = keys or (lambda _: True)
    a = [k for k in base if pick(k)]
    b = [k for k in other if pick(k)]
    b_set, a_set = set(b), set(a)
    shape: list[dict[str, Any]] = []
    dtype: list[dict[str, Any]] = []
    for name in (k for k in a if k in b_set):
        ia, ib = _info(base, name), _info(other, name)
        if ia.shape != ib.shape:
            shape.append({"name": name, "base": list(ia.shape), "other": list(ib.shape)})
        if ia.dtype != ib.dtype and not (ia.dtype.is_floating_point
                                         and ib.dtype.is_floating_point):
            dtype.append({"name": name, "base": str(ia.dtype), "other": str(ib.dtype)})
    details: dict[str, list[Any]] = {"missing": [k for k in a if k not in b_set],
               "unexpected": [k for k in b if k not in a_set], "shape": shape, "dtype": dtype}
    if any(details.values()):
        raise IncompatibleModelsError(
            "the two checkpoints do not share an architecture: " + mismatches(details)
            + "; check that the suspect was fine-tuned from this base", details=details)
