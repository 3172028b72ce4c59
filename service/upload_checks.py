"""What an upload must be, checked as it arrives (not minutes later in a worker), and told in
the uploader's terms: their file name, never a path of this server."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mergeshield import archives
from mergeshield.errors import (
    MergeShieldError,
    NothingScannableError,
    StorageFullError,
    UnsafeArchiveError,
    UnsafeFormatError,
)
from mergeshield.model_folder import REFUSED_SUFFIXES
from mergeshield.safetensors_io import read_header

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def unpack(path: Path, filename: str, dest: Path, limits: archives.ArchiveLimits) -> Path:
    """Unpack the upload ``filename`` (at ``path``); an OS refusal (a member path past PATH_MAX,
    a name the file system cannot hold) is the archive's fault, said with the user's name."""
    try:
        return archives.unpack(path, dest, limits)
    except MergeShieldError:
        raise
    except OSError as exc:
        if (full := StorageFullError.of(exc, f"{filename} unpacked")) is not None:
            raise full from None
        raise UnsafeArchiveError(
            f"{filename}: a member cannot be unpacked ({exc.strerror or type(exc).__name__},"
            " e.g. a path too long for the file system); repack the model folder with short "
            "relative paths", details={"filename": filename}) from None


def check_weights(filename: str, root: Path) -> None:
    """An archive must hold model weights in its model folder (where a scan looks), and every
    safetensors header there must be sound: refused now, not minutes later in a worker."""
    names = sorted(p.name for p in root.iterdir())
    weights = [p for p in root.iterdir()
               if p.is_file() and not p.is_symlink() and p.name.lower().endswith(WEIGHT_SUFFIXES)]
    if not weights and any(n.lower().endswith(REFUSED_SUFFIXES) for n in names):
        raise UnsafeFormatError(f"{filename}: the only weights are raw pickles, which can run "
                                "code when loaded; export them as safetensors",
                                details={"filename": filename})
    if not weights and any(n.endswith(".py") for n in names):
        raise UnsafeFormatError(f"{filename}: the archive holds Python model code and no "
                                "weights in safetensors or PyTorch format; MergeShield never "
                                "runs remote code", details={"filename": filename})
    if not weights:
        raise NothingScannableError(
            f"{filename}: the archive holds no model weights (.safetensors or .bin) in its model "
            "folder; zip the Hugging Face model folder itself",
            details={"filename": filename, "files": names[:20]})
    for path in weights:
        if path.name.lower().endswith(".safetensors"):
            try:
                read_header(path)
            except MergeShieldError as exc:  # said of the member, in the user's archive
                exc.message = f"{filename}: {exc.message}"
                exc.args = (exc.message,)
                raise


def without_server_paths(exc: MergeShieldError, tmp_dir: Path) -> MergeShieldError:
    """The error as the uploader should read it: paths under the upload's private folder
    (``tmp/<random>/``, ``tmp/<random>/x/`` for an archive's members) cut to what they sent."""
    private = re.compile(re.escape(str(tmp_dir)) + r"/[^/\s'\"]+/(?:x/)?")

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return private.sub("", value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    exc.message, exc.details = clean(exc.message), clean(exc.details)
    exc.args = (exc.message,)
    return exc
