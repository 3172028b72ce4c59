"""A model folder as :func:`mergeshield.checkpoints.resolve` finds it: vetted before any file is
read (no link out, no FIFO or device, no remote code in any JSON file), its weight files located
(index, single file or shards), its JSON files read strictly. Refusals name what to do next.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from mergeshield.errors import (
    CorruptCheckpointError,
    NothingScannableError,
    UnsafeFileError,
    UnsafeFormatError,
)
from mergeshield.file_safety import plain_text, read_at_most, special_file_error
from mergeshield.models.config_guard import refuse_remote_code
from mergeshield.safetensors_io import INDEX_NAME

__all__ = ["MAX_JSON_BYTES", "REFUSED_SUFFIXES", "TORCH_INDEX", "allowed_root", "read_json_file",
           "regular_inside", "unsafe", "vet", "weight_files"]

REFUSED_SUFFIXES = (".pkl", ".pickle", ".joblib", ".dill")
TORCH_INDEX = "pytorch_model.bin.index.json"
MAX_JSON_BYTES = 64 * 2**20  # a config or tokenizer JSON file; tokenizer.json files reach ~30 MB


def vet(root: Path) -> None:
    """Refuse a model folder holding a link that leads out of ``allowed_root(root)`` (a clone of
    a hostile repo keeps ``special_tokens_map.json -> /proc/self/environ``) or a FIFO, device or
    socket (a FIFO named ``model.safetensors`` blocks ``open()`` forever), before any file is
    read; and any JSON file of the folder that asks for remote code (``auto_map`` in a processor
    or tokenizer config)."""
    inside = allowed_root(root)
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = Path(entry.path)
            if entry.is_symlink():
                try:
                    target = path.resolve()
                except RuntimeError:  # a link loop
                    target = Path("/")
                if not target.is_relative_to(inside):
                    raise UnsafeFileError(
                        f"{entry.name}: refused, a symbolic link that leads out of the model "
                        "folder; MergeShield reads, hashes and copies only files inside it. "
                        "Replace the link with the file", details={"file": entry.name})
            mode = os.stat(path).st_mode if os.path.exists(path) else stat.S_IFREG
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise special_file_error(path, mode)
            if entry.name.endswith(".json") and stat.S_ISREG(mode) and entry.name not in (
                    INDEX_NAME, TORCH_INDEX, "tokenizer.json", "vocab.json"):
                try:
                    value = _parse_json(path)
                except CorruptCheckpointError:
                    if entry.name == "config.json":
                        raise
                    continue  # not JSON, so no loader takes code from it: copied as it is
                refuse_remote_code(value, entry.name)



def weight_files(root: Path, remote_names: tuple[str, ...]) -> tuple[Path, ...]:
    for index_name in (INDEX_NAME, TORCH_INDEX):
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
        raise unsafe(root, "the only weights are raw pickles (.pkl/.pickle), which can run "
                            "code when loaded; export them as safetensors")
    if any(n.endswith(".py") for n in names):
        raise unsafe(root, "the repository holds only Python model code and no weights in "
                            "safetensors or PyTorch format; MergeShield never runs remote code")
    raise NothingScannableError(
        "the model folder holds no model.safetensors, sharded safetensors index or "
        "pytorch_model.bin; upload or point to the folder with the weights",
        details={"files": sorted(names)[:20]})



def _index_files(root: Path, index_name: str) -> tuple[Path, ...]:
    index = read_json_file(root / index_name) or {}
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f"{index_name}: no weight_map object",
                                     details={"file": index_name})
    files: list[Path] = []
    for tensor, fname in weight_map.items():
        plain = (isinstance(fname, str) and fname not in {"", ".", ".."}
                 and "/" not in fname and "\\" not in fname and not os.path.isabs(fname))
        if not plain or not (root / fname).is_file():
            raise CorruptCheckpointError(
                f"{index_name}: tensor {tensor!r} points to {str(fname)[:100]!r}, which is not a "
                "file name inside the checkpoint folder",
                details={"file": index_name, "tensor": tensor, "target": str(fname)[:100]})
        if root / fname not in files:
            files.append(root / fname)
    return tuple(files)



def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN / Infinity: Python's json accepts them



def _parse_json(path: Path) -> Any:
    """A file's strict JSON value (no NaN); a FIFO, a file over ``MAX_JSON_BYTES``, bad JSON
    or a lone surrogate in a string is a CorruptCheckpointError."""
    raw = read_at_most(path, MAX_JSON_BYTES)
    if raw is None:
        raise CorruptCheckpointError(f"{path.name} is larger than {MAX_JSON_BYTES} bytes, too "
                                     "large for a config", details={"file": path.name})
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{path.name} is not valid JSON: {str(exc)[:200]}",
                                     details={"file": path.name}) from None
    if not plain_text(json.dumps(value, ensure_ascii=False)):
        raise CorruptCheckpointError(f"{path.name} holds a string that is not valid Unicode "
                                     "(a lone surrogate)", details={"file": path.name})
    return value



def read_json_file(path: Path) -> dict[str, Any] | None:
    """A strict JSON object file, or None when absent; anything else is refused with a stable
    code (a FIFO, an oversized or non-JSON file, NaN, a lone surrogate, a non-object)."""
    if not os.path.lexists(path) or (path.is_symlink() and not path.exists()):
        return None
    value = _parse_json(path)
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{path.name} must hold a JSON object",
                                     details={"file": path.name})
    return value



def allowed_root(root: Path) -> Path:
    """The folder no link of the model folder ``root`` may lead out of: ``root`` itself, or for
    a snapshot of the Hugging Face cache (``<repo>/snapshots/<sha>``, downloaded by us or named
    as a local folder) the repo's cache folder, whose ``blobs/`` its files link to."""
    real = root.resolve()
    repo = real.parent.parent
    if real.parent.name == "snapshots" and (repo / "blobs").is_dir():
        return repo
    return real



def regular_inside(path: Path, inside: Path) -> bool:
    """Whether ``path`` is a regular file, through links that stay inside ``inside`` only."""
    try:
        if path.is_symlink() and not path.resolve(strict=True).is_relative_to(inside):
            return False
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, RuntimeError):  # dangling link, link loop
        return False



def unsafe(path: Path, why: str) -> UnsafeFormatError:
    return UnsafeFormatError(f"{path.name}: refused, {why}", details={"file": path.name})
