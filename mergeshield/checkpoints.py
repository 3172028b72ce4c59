"""Every file access of MergeShield: resolve a source, read it lazily, write checkpoints.

Hub repos are fetched by :mod:`mergeshield.hub`. Weights are read only from validated
safetensors; a PyTorch ``.bin`` is loaded with ``torch.load(weights_only=True)`` and converted
once. Anything that would need ``pickle.load`` or remote code is refused with
:class:`UnsafeFormatError` before a byte of it is interpreted.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch

from mergeshield.errors import (
    CorruptCheckpointError,
    IncompatibleModelsError,
    InvalidWeightsError,
    NothingScannableError,
    SourceNotFoundError,
    UnsafeFormatError,
)
from mergeshield.hub import HUB_PATTERNS, download_repo
from mergeshield.safetensors_io import (
    INDEX_NAME,
    SafetensorsHeader,
    TensorInfo,
    atomic_write_text,
    read_header,
    save_checkpoint,
    sha256_file,
    write_safetensors,
)

__all__ = [
    "Checkpoint", "ResolvedSource", "TensorInfo", "atomic_write_text", "check_compatible",
    "extra_files", "open_checkpoint", "read_json", "resolve", "save_checkpoint", "sha256_file",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
REFUSED_SUFFIXES = (".pkl", ".pickle", ".joblib", ".dill")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TORCH_INDEX = "pytorch_model.bin.index.json"


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
            local_files_only: bool = False, min_free_bytes: int | None = None) -> ResolvedSource:
    """Locate ``source`` (folder, file or hub repo id) and check it is safe to read; a hub
    download must leave ``min_free_bytes`` free on the disk (None: no check)."""
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            return _from_folder(source, "directory", path, None, None, cache_dir)
        return _from_file(source, path, cache_dir)
    if not _REPO_ID.match(source):
        raise SourceNotFoundError(f"{source!r} is neither an existing path nor a hub repo id "
                                  "(owner/name): check the spelling", details={"source": source})
    folder, sha, remote_names = download_repo(
        source, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir,
        local_files_only=local_files_only, patterns=HUB_PATTERNS, min_free_bytes=min_free_bytes)
    return _from_folder(source, "hub", folder, revision, sha, cache_dir, remote_names)


def _from_file(source: str, path: Path, cache_dir: str | Path | None) -> ResolvedSource:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        read_header(path)
        tensor_files: tuple[Path, ...] = (path,)
    elif suffix in PICKLE_SUFFIXES:
        tensor_files = (_convert_pickle(path, cache_dir),)
    elif suffix in REFUSED_SUFFIXES:
        raise _unsafe(path, "a raw pickle can run arbitrary code when loaded; export the weights "
                            "as safetensors")
    else:
        raise CorruptCheckpointError(
            f"{path.name}: not a checkpoint file (expected .safetensors, .bin, .pt or .pth)",
            details={"file": str(path)})
    return ResolvedSource(source, "file", None, None, path.parent, (path,), None, tensor_files)


def _from_folder(source: str, kind: Literal["hub", "directory"], root: Path,
                 revision: str | None, sha: str | None, cache_dir: str | Path | None,
                 remote_names: tuple[str, ...] = ()) -> ResolvedSource:
    config = _read_config(root)
    weights = _weight_files(root, remote_names)
    if weights[0].suffix == ".safetensors":
        for p in weights:
            read_header(p)
        tensor_files = weights
    else:
        tensor_files = tuple(_convert_pickle(p, cache_dir) for p in weights)
    return ResolvedSource(source, kind, revision, sha, root, weights, config, tensor_files)


def _read_config(root: Path) -> dict[str, Any] | None:
    config = read_json_file(root / "config.json")
    if config is None:
        return None
    if "auto_map" in config or config.get("trust_remote_code"):
        raise _unsafe(root / "config.json", "the config needs custom Python code "
                      "(auto_map / trust_remote_code), which MergeShield never runs; use a "
                      "checkpoint of an architecture built into transformers")
    return config


def _weight_files(root: Path, remote_names: tuple[str, ...]) -> tuple[Path, ...]:
    for index_name in (INDEX_NAME, _TORCH_INDEX):
        if (root / index_name).is_file():
            return _index_files(root, index_name)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (root / name).is_file():
            return (root / name,)
    found = sorted(root.glob("*.safetensors"))
    if len(found) == 1:
        return (found[0],)
    names = {p.name for p in root.iterdir()} | set(remote_names)
    if any(n.lower().endswith(REFUSED_SUFFIXES) for n in names):
        raise _unsafe(root, "the only weights are raw pickles (.pkl/.pickle), which can run "
                            "code when loaded; export them as safetensors")
    if any(n.endswith(".py") for n in names):
        raise _unsafe(root, "the repository holds only Python model code and no weights in "
                            "safetensors or PyTorch format; MergeShield never runs remote code")
    raise NothingScannableError(
        f"{root}: no model.safetensors, sharded safetensors index or pytorch_model.bin found",
        details={"root": str(root), "files": sorted(names)[:20]})


def _index_files(root: Path, index_name: str) -> tuple[Path, ...]:
    index = read_json_file(root / index_name) or {}
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f"{index_name}: no weight_map object",
                                     details={"file": str(root / index_name)})
    files: list[Path] = []
    for tensor, fname in weight_map.items():
        plain = (isinstance(fname, str) and fname not in {"", ".", ".."}
                 and "/" not in fname and "\\" not in fname and not os.path.isabs(fname))
        if not plain or not (root / fname).is_file():
            raise CorruptCheckpointError(
                f"{index_name}: tensor {tensor!r} points to {str(fname)[:100]!r}, which is not a "
                "file name inside the checkpoint folder",
                details={"file": str(root / index_name), "tensor": tensor, "target": str(fname)})
        if root / fname not in files:
            files.append(root / fname)
    return tuple(files)


def read_json_file(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when absent; anything else is a CorruptCheckpointError."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{path.name} is not valid JSON: {str(exc)[:200]}",
                                     details={"file": str(path)}) from None
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{path.name} must hold a JSON object",
                                     details={"file": str(path)})
    return value


def read_json(src: ResolvedSource, name: str) -> dict[str, Any] | None:
    """A JSON file (e.g. preprocessor_config.json) beside the weights, or None."""
    if Path(name).name != name or src.kind == "file":
        return None
    return read_json_file(src.root / name)


def extra_files(src: ResolvedSource) -> dict[str, Path]:
    """Processor and tokenizer files to copy next to a rewritten checkpoint."""
    if src.kind == "file":
        return {}
    skip = {"config.json", INDEX_NAME, _TORCH_INDEX}
    return {p.name: p for p in sorted(src.root.iterdir())
            if p.is_file() and p.suffix in {".json", ".txt", ".model"} and p.name not in skip}


def _unsafe(path: Path, why: str) -> UnsafeFormatError:
    return UnsafeFormatError(f"{path.name}: refused, {why}", details={"file": str(path)})


def _conversion_dir(cache_dir: str | Path | None) -> Path:
    """Where converted ``.bin`` files live: the cache, else a private per-user temp folder."""
    if cache_dir:
        folder = Path(cache_dir) / "mergeshield-converted"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    folder = Path(tempfile.gettempdir()) / f"mergeshield-converted-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if folder.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        folder = Path(tempfile.mkdtemp(prefix="mergeshield-converted-"))  # someone else's: avoid
    return folder


def _convert_pickle(path: Path, cache_dir: str | Path | None) -> Path:
    """torch.load(weights_only=True) a flat state dict and write it once as safetensors."""
    digest = sha256_file(path)
    out = _conversion_dir(cache_dir) / f"{digest}.safetensors"
    if out.is_file():
        return out
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
        raise CorruptCheckpointError(f"{path.name}: cannot read the PyTorch file: {text[:200]}",
                                     details={"file": str(path)}) from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CorruptCheckpointError(f"{path.name}: not a flat dict of named tensors (save "
                                     "model.state_dict())", details={"file": str(path)})
    specs = [(k, TensorInfo.of(v)) for k, v in state.items()]
    write_safetensors(out, specs, iter(state.items()), {"format": "pt"})
    return out


class Checkpoint(Mapping[str, torch.Tensor]):
    """Lazy ``name → tensor`` view of validated safetensors files; one tensor read per access."""

    def __init__(self, resolved: ResolvedSource) -> None:
        self.config = resolved.config
        self.metadata: dict[str, str] = {}
        self._headers: list[SafetensorsHeader] = []
        self._where: dict[str, int] = {}
        self._handles: dict[int, int] = {}  # shard index -> file descriptor
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
        i = self._where[name]
        header = self._headers[i]
        entry = header.tensors[name]
        if i not in self._handles:
            self._handles[i] = os.open(header.path, os.O_RDONLY)
        fd = self._handles[i]
        offset, size = header.data_start + entry.begin, entry.info.nbytes
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
        tensor = buf.view(entry.info.dtype).reshape(entry.info.shape)
        if tensor.is_floating_point():
            _check_finite(name, tensor)
        return tensor

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


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    t = tensor.to(torch.float16) if tensor.element_size() == 1 else tensor  # fp8: no isfinite
    # fast path: any NaN/inf makes the (float64) sum non-finite; only then look element-wise
    if t.numel() and not bool(torch.isfinite(t.sum(dtype=torch.float64))) \
            and not bool(torch.isfinite(t).all()):
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise InvalidWeightsError(
            f"tensor {name!r} holds {nan} NaN and {inf} infinite values; the checkpoint is "
            "broken or tampered with", details={"tensor": name, "nan": nan, "inf": inf})


def open_checkpoint(resolved: ResolvedSource) -> Checkpoint:
    """A lazy mapping over the checkpoint's tensors (use as a context manager)."""
    return Checkpoint(resolved)


def _info(weights: Mapping[str, torch.Tensor], name: str) -> TensorInfo:
    info = getattr(weights, "info", None)
    return info(name) if callable(info) else TensorInfo.of(weights[name])


def check_compatible(base: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], *,
                     keys: Callable[[str], bool] | None = None) -> None:
    """Same tensor names, shapes and dtypes among the selected keys, else a listed error."""
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
        if ia.dtype != ib.dtype:
            dtype.append({"name": name, "base": str(ia.dtype), "other": str(ib.dtype)})
    details: dict[str, list[Any]] = {"missing": [k for k in a if k not in b_set],
               "unexpected": [k for k in b if k not in a_set], "shape": shape, "dtype": dtype}
    if any(details.values()):
        parts = []
        for label, items in details.items():
            if items:
                names = [i["name"] if isinstance(i, dict) else i for i in items[:3]]
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{len(items)} {label}: {', '.join(names)}{more}")
        raise IncompatibleModelsError(
            "the two checkpoints do not share an architecture: " + "; ".join(parts)
            + "; check that the suspect was fine-tuned from this base", details=details)
