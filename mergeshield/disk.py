"""Free disk space: refuse to write what would leave less than ``min_free`` bytes on the disk.

Checked before the bytes arrive (a hub download, an archive's members, an upload's declared
length) and again while they stream, so a full disk is met with a clear refusal, not a half file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergeshield.errors import InsufficientStorageError

__all__ = ["ensure_room", "free_bytes", "private_dir"]


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or would: its nearest existing parent)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_room(path: Path, need: int, min_free: int, what: str) -> None:
    """Raise :class:`InsufficientStorageError` unless writing ``need`` more bytes under ``path``
    leaves at least ``min_free`` bytes free."""
    free = free_bytes(path)
    if free - need < min_free:
        raise InsufficientStorageError(
            f"not enough free disk for {what}: it needs {need} bytes and {min_free} must stay "
            f"free, but {free} are free; free some disk space and retry",
            details={"needed": need, "free": free, "min_free": min_free})


def private_dir(cache_dir: str | Path | None, name: str) -> Path:
    """``<cache>/<name>`` (what a scan writes for itself: converted ``.bin`` files, merged
    adapters), else a private per-user folder in the temp directory."""
    if cache_dir:
        folder = Path(cache_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    folder = Path(tempfile.gettempdir()) / f"{name}-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if folder.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-"))  # someone else's: avoid
    return folder


@contextmanager
def built_once(folder: Path, prefix: str) -> Iterator[Path]:
    """A scratch folder beside ``folder`` to build a model folder in, renamed to ``folder`` when
    the body succeeds: whole or not at all. A racing builder that finished first keeps its
    folder (a model folder with its config.json: the same bytes). The scratch never stays."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=folder.parent))
    try:
        yield work
        try:
            work.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
