"""Unpack an uploaded zip or tar safely: no escaping paths, no links, bounded size and count."""

from __future__ import annotations

import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mergeshield.disk import ensure_room
from mergeshield.errors import (
    CorruptCheckpointError,
    InputError,
    SourceNotFoundError,
    UnsafeArchiveError,
)

_CHUNK = 1024 * 1024  # bytes per read: memory stays flat whatever the member size
_ROOM_EVERY = 64 * _CHUNK  # while writing, free disk is looked at again after this many bytes
# what a damaged archive raises while read: gzip/bz2 raise OSError, an encrypted zip member
# RuntimeError, an unknown compression method NotImplementedError
_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
                OSError, NotImplementedError, RuntimeError)
_DRIVE = re.compile(r"^[A-Za-z]:")
# a member's path inside the archive: well under PATH_MAX (4096) once under the upload folder
MAX_PATH_BYTES = 1024
MAX_PATH_DEPTH = 32
_ZIP_KINDS = {stat.S_IFLNK: "a symbolic link", stat.S_IFCHR: "a device file",
              stat.S_IFBLK: "a device file", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}
_FIX = "re-create the archive from the model folder with plain files only, or upload the files"


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int = 40 * 1024**3  # total unpacked size; a 7B model in fp32 is about 28 GiB
    max_files: int = 10_000  # members, directories included
    # free disk (bytes) to leave: the whole archive (zip) or each member (tar) is refused before
    # it is written when it would leave less; None = no free-space check
    min_free_bytes: int | None = None


def is_archive(path: Path) -> bool:
    """True for a zip or a (gzip/bz2/xz) tar by content; a torch.save zip is a checkpoint."""
    if not path.is_file():
        return False
    return not _is_torch_zip(path) if _is_zip(path) else tarfile.is_tarfile(path)


def _is_zip(path: Path) -> bool:
    """A zip from its first bytes on: ``zipfile.is_zipfile`` alone also accepts any file that
    merely ends in a zip, e.g. a tar whose last member is a torch.save zip (it would then be
    unpacked as that inner zip)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    return magic in (b"PK\x03\x04", b"PK\x05\x06") and zipfile.is_zipfile(path)


def unpack(archive: Path, dest: Path, limits: ArchiveLimits = ArchiveLimits()) -> Path:
    """Extract ``archive`` into the new or empty ``dest``; the model root (a lone top folder or
    ``dest``). Raises UnsafeArchiveError or CorruptCheckpointError and leaves ``dest`` empty."""
    if not archive.is_file():
        raise SourceNotFoundError(f"no archive file {archive.name!r}; check the upload finished",
                                  details={"archive": archive.name})
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise InputError(f"cannot unpack {archive.name}: the destination {dest.name!r} is not "
                         "empty; unpack into a new folder", details={"archive": archive.name})
    ex = _Extraction(archive.name, dest, limits)
    try:
        if _is_zip(archive):
            _unpack_zip(archive, ex)
        elif tarfile.is_tarfile(archive):
            _unpack_tar(archive, ex)
        else:
            raise CorruptCheckpointError(f"{archive.name} is not a zip or tar archive; upload a "
                                         ".zip, .tar, .tar.gz, .tar.bz2 or .tar.xz of the model "
                                         "folder", details={"archive": archive.name})
    except BaseException:
        shutil.rmtree(dest)  # only plain files and folders were made there, never links
        if not created:
            dest.mkdir()  # the caller's folder stays, empty again
        raise
    top = list(dest.iterdir())
    return top[0] if len(top) == 1 and top[0].is_dir() else dest


@dataclass
class _Extraction:
    archive: str  # the file name only: messages never show server paths
    dest: Path
    limits: ArchiveLimits
    members: int = 0
    written: int = 0  # real bytes written so far, whatever the headers claim
    files: set[tuple[str, ...]] = field(default_factory=set)
    dirs: set[tuple[str, ...]] = field(default_factory=set)

    def refuse(self, member: str, why: str, fix: str = _FIX) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"{self.archive}: member {member[:200]!r} {why}; {fix}",
                                  details={"archive": self.archive, "member": member[:200],
                                           "problem": why})

    def check(self, name: str, members: int, size: int) -> None:
        """Refuse when ``members`` members or ``size`` unpacked bytes would break the limits."""
        if members > self.limits.max_files:
            raise self.refuse(name, f"is past the limit of {self.limits.max_files} members",
                              "upload fewer files, e.g. only the model folder")
        if size > self.limits.max_bytes:
            raise self.refuse(name, f"takes the archive past {self.limits.max_bytes} unpacked "
                              "bytes", "upload a smaller model or the files one by one")

    def room(self, need: int) -> None:
        """Refuse (InsufficientStorageError) when ``need`` more bytes would fill the disk."""
        if self.limits.min_free_bytes is not None:
            ensure_room(self.dest, need, self.limits.min_free_bytes, f"unpacking {self.archive}")

    def member(self, name: str, kind: str | None, is_dir: bool, size: int) -> Path | None:
        """Vet one member and make its folders; the file to write, or None for a folder."""
        if kind is not None:
            raise self.refuse(name, f"is {kind}")
        self.members += 1
        self.check(name, self.members, self.written + size)
        self.room(size)
        if "\\" in name or "\x00" in name or name.startswith("/") or _DRIVE.match(name):
            raise self.refuse(name, "has an absolute, Windows-style or NUL path")
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if ".." in parts:
            raise self.refuse(name, "climbs out of the archive with '..'")
        if not parts and not is_dir:
            raise self.refuse(name, "is a file without a name")
        if any(len(os.fsencode(p)) > 255 for p in parts):
            raise self.refuse(name, "has a path part longer than 255 bytes")
        if len(os.fsencode("/".join(parts))) > MAX_PATH_BYTES or len(parts) > MAX_PATH_DEPTH:
            raise self.refuse(name, f"has a path longer than {MAX_PATH_BYTES} bytes or deeper "
                                    f"than {MAX_PATH_DEPTH} folders")
        parents = {parts[:i] for i in range(1, len(parts))}
        if parts in self.files or (not is_dir and parts in self.dirs) or parents & self.files:
            raise self.refuse(name, "appears twice or clashes with another member")
        self.dirs |= parents
        (self.dirs if is_dir else self.files).add(parts)
        target = self.dest.joinpath(*parts)
        (target if is_dir else target.parent).mkdir(parents=True, exist_ok=True)
        return None if is_dir else target

    def write(self, name: str, target: Path, read: Callable[[int], bytes]) -> int:
        """Stream one member to a new file, counting the bytes really written; its size."""
        size = 0
        with open(target, "xb") as out:
            while True:
                with _reading(self.archive, name):
                    chunk = read(_CHUNK)
                if not chunk:
                    return size
                size += len(chunk)
                self.written += len(chunk)
                self.check(name, 0, self.written)  # headers may lie: count what is written
                if self.written % _ROOM_EVERY < len(chunk):
                    self.room(0)
                out.write(chunk)


@contextmanager
def _reading(archive: str, member: str | None) -> Iterator[None]:
    """Turn a reader's failure into a CorruptCheckpointError that names the member."""
    try:
        yield
    except _READ_ERRORS as exc:
        where = f"member {member[:200]!r}" if member is not None else "the archive"
        problem = f"{type(exc).__name__}: {str(exc)[:200]}"
        raise CorruptCheckpointError(
            f"{archive}: cannot read {where} ({problem}); the archive is damaged, truncated or "
            "encrypted, re-create it and upload it again",
            details={"archive": archive, "member": member, "problem": problem}) from exc


def _is_torch_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False  # unpack will report it as corrupt
    tops = {n.split("/", 1)[0] for n in names}
    return len(tops) == 1 and f"{tops.pop()}/data.pkl" in names


def _unpack_zip(archive: Path, ex: _Extraction) -> None:
    with _reading(ex.archive, None):
        zf = zipfile.ZipFile(archive)
    with zf:
        infos = zf.infolist()
        if infos:  # refuse from the central directory before writing anything
            ex.check(infos[-1].filename, len(infos), sum(i.file_size for i in infos))
            ex.room(sum(i.file_size for i in infos))
        for info in infos:
            mode = info.external_attr >> 16  # Unix st_mode; 0 from tools that do not set it
            kind, is_dir = _ZIP_KINDS.get(stat.S_IFMT(mode)), info.is_dir() or stat.S_ISDIR(mode)
            if (target := ex.member(info.filename, kind, is_dir, info.file_size)) is not None:
                with _reading(ex.archive, info.filename):
                    src = zf.open(info)
                with src:
                    ex.write(info.filename, target, src.read)


def _unpack_tar(archive: Path, ex: _Extraction) -> None:
    with _reading(ex.archive, None):
        tf = tarfile.open(archive, "r|*")  # stream mode: one pass, even through gzip/bz2/xz
    with tf:
        members = iter(tf)
        while True:
            with _reading(ex.archive, None):
                m = next(members, None)
            if m is None:
                return
            kind = ("a symbolic link" if m.issym() else "a hard link" if m.islnk() else
                    "a device file or FIFO" if m.isdev() else None if m.isreg() or m.isdir()
                    else "an unsupported member type")
            if (target := ex.member(m.name, kind, m.isdir(), m.size)) is not None:
                with _reading(ex.archive, m.name):
                    src = tf.extractfile(m)
                if src is not None:  # always, for a regular file; a short one fails in read()
                    ex.write(m.name, target, src.read)
