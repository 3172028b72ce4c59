"""Uploads: a multipart body streamed to disk (never held in memory), size-limited while it
arrives, hashed on the way, de-duplicated by sha256, archives unpacked safely."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fastapi import Request
from python_multipart.exceptions import ParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from mergeshield import archives
from mergeshield.disk import ensure_room
from mergeshield.errors import (
    InputError,
    MergeShieldError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnsafeFormatError,
)
from mergeshield.model_folder import REFUSED_SUFFIXES
from mergeshield.safetensors_io import read_header
from mergeshield.settings import Settings
from service import upload_checks
from service.quotas import StoredBytes
from service.upload_checks import WEIGHT_SUFFIXES
from worker.db import Database, Upload

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
CHUNK = 1 << 20
ROOM_EVERY = 64 * CHUNK  # free disk is looked at again after this many bytes of an upload
SLACK = 64 * 1024  # multipart framing around the file in a body's Content-Length


@dataclass
class Received:
    filename: str = ""
    # uploads/tmp/<random>/<filename>: the user's own file name, so a message about the file
    # (a bad header, a bad archive member) names their file, never a server temp name
    path: Path | None = None
    size: int = 0
    sha256: str = ""
    complete: bool = False  # the body's closing boundary arrived
    _hash: hashlib._Hash = field(default_factory=hashlib.sha256, repr=False)

    def discard(self) -> None:
        """Remove the received file and its private folder (whatever became of them)."""
        if self.path is not None:
            shutil.rmtree(self.path.parent, ignore_errors=True)


async def receive(request: Request, settings: Settings, quota: StoredBytes | None = None
                  ) -> Received:
    """Stream the ``file`` part of a multipart body into a temporary file under uploads/.

    Refused before a byte is read when the declared length is over the size limit, the key's
    quota or the free disk, and while it streams when the bytes go past them or stop coming for
    ``upload_idle_timeout`` seconds; a refused upload's partial file is removed."""
    limit = settings.max_upload_bytes
    length = request.headers.get("content-length")
    declared = max(int(length) - SLACK, 0) if length is not None and length.isdigit() else 0
    if declared > limit:
        raise _too_large(limit)
    if quota is not None:
        quota.check(declared)
    tmp_dir = settings.uploads_dir / "tmp"
    ensure_room(tmp_dir, declared, settings.min_free_bytes, "this upload")
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise InputError("send the file as multipart/form-data in a field named 'file'")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    got = Received()
    sink = _Sink(got, tmp_dir, limit, quota, settings.min_free_bytes)
    parser = MultipartParser(params[b"boundary"], {
        "on_header_field": sink.on_header_field, "on_header_value": sink.on_header_value,
        "on_header_end": sink.on_header_end, "on_part_data": sink.on_part_data,
        "on_part_end": sink.on_part_end, "on_end": sink.on_end})
    try:
        try:
            async for chunk in _stalling_after(request, settings.upload_idle_timeout):
                parser.write(chunk)
            parser.finalize()
        except ParseError as exc:  # a client's broken body, not a server error
            raise InputError(f"the multipart body is malformed ({str(exc)[:200]}); send the "
                             "file as multipart/form-data in a field named 'file'") from None
        if got.path is None:
            raise InputError("the multipart body has no part named 'file'")
        if not got.complete:  # a client that stopped early: the file may be cut anywhere
            raise InputError(f"{got.filename}: the multipart body ended before its closing "
                             "boundary, so the file may be incomplete; send it again",
                             details={"filename": got.filename})
        if got.size == 0:
            raise InputError(f"{got.filename}: the file is empty (0 bytes); upload the model "
                             "file itself", details={"filename": got.filename})
    except BaseException:
        sink.on_part_end()
        got.discard()
        raise
    got.sha256 = got._hash.hexdigest()
    return got


async def _stalling_after(request: Request, idle: float) -> AsyncIterator[bytes]:
    """The body's chunks; RequestTimeoutError when none comes for ``idle`` seconds (a client
    that stalls, slow-loris style, would otherwise hold its connection and partial file)."""
    chunks = request.stream()
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeoutError(
                f"the upload sent no data for {idle:g} s and was dropped; send the body without "
                "pauses and retry", details={"idle_timeout": idle}) from None
        yield chunk


class _Sink:
    """Multipart callbacks: the ``file`` part goes to a temporary file, counted and hashed."""

    def __init__(self, got: Received, tmp_dir: Path, limit: int, quota: StoredBytes | None,
                 min_free: int) -> None:
        self.got, self.tmp_dir, self.limit = got, tmp_dir, limit
        self.quota, self.min_free = quota, min_free
        self.field, self.value = b"", b""
        self.out: IO[bytes] | None = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        if self.field.lower() == b"content-disposition":
            _kind, opts = parse_options_header(self.value)
            if opts.get(b"name") == b"file" and self.got.path is None:
                raw = opts.get(b"filename", b"upload").decode("utf-8", "replace")
                self.got.filename = safe_name(raw)
                private = Path(tempfile.mkdtemp(dir=self.tmp_dir))
                self.got.path = private / self.got.filename
                self.out = open(self.got.path, "xb")  # noqa: SIM115 - closed at the part's end
        self.field, self.value = b"", b""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.out is None:
            return  # another field: ignored
        chunk = data[start:end]
        self.got.size += len(chunk)
        if self.got.size > self.limit:
            raise _too_large(self.limit)
        if self.quota is not None:
            self.quota.check(self.got.size)
        if self.got.size % ROOM_EVERY < len(chunk):
            ensure_room(self.tmp_dir, 0, self.min_free, "this upload")
        self.got._hash.update(chunk)
        self.out.write(chunk)

    def on_part_end(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None

    def on_end(self) -> None:
        self.got.complete = True


def store(db: Database, settings: Settings, owner: str, got: Received) -> Upload:
    """Keep the file (once per sha256), unpack archives, record the upload (once per owner)."""
    assert got.path is not None
    with db.session() as s:
        existing = s.scalars(select(Upload).where(Upload.owner == owner,
                                                  Upload.sha256 == got.sha256)).first()
    if existing is not None:
        got.discard()
        return existing
    folder = settings.uploads_dir / got.sha256
    try:
        kind, rel = _place(settings, folder, got)
    except MergeShieldError as exc:
        raise upload_checks.without_server_paths(exc, settings.uploads_dir / "tmp") from None
    finally:
        got.discard()
    row = Upload(owner=owner, filename=got.filename, kind=kind, size=got.size,
                 sha256=got.sha256, path=rel)
    try:
        with db.session() as s:
            s.add(row)
    except IntegrityError:  # the same owner uploaded the same bytes concurrently
        with db.session() as s:
            return s.scalars(select(Upload).where(Upload.owner == owner,
                                                  Upload.sha256 == got.sha256)).one()
    return row


def _place(settings: Settings, folder: Path, got: Received) -> tuple[str, str]:
    assert got.path is not None
    name = got.filename.lower()
    data_dir = settings.data_dir
    if name.endswith(ARCHIVE_SUFFIXES) or archives.is_archive(got.path):
        unpacked = folder / "unpacked"
        if not unpacked.is_dir():  # someone else's upload of the same bytes unpacked it already
            staging = Path(tempfile.mkdtemp(dir=settings.uploads_dir / "tmp"))
            try:
                root = upload_checks.unpack(
                    got.path, got.filename, staging / "x", archives.ArchiveLimits(
                        settings.max_unpacked_bytes, settings.max_archive_files,
                        settings.min_free_bytes))
                upload_checks.check_weights(got.filename, root)
                folder.mkdir(parents=True, exist_ok=True)
                (staging / "x").rename(unpacked)
                rel_root = root.relative_to(staging / "x")
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            (folder / "root").write_text(str(rel_root))
        got.path.unlink(missing_ok=True)
        rel_root = Path((folder / "root").read_text())
        return "archive", str((unpacked / rel_root).relative_to(data_dir))
    if name.endswith(REFUSED_SUFFIXES):  # the same refusal the library gives, not "wrong type"
        raise UnsafeFormatError(f"{got.filename}: refused, a raw pickle can run arbitrary code "
                                "when loaded; export the weights as safetensors",
                                details={"filename": got.filename})
    if not name.endswith(WEIGHT_SUFFIXES):
        raise InputError(f"{got.filename}: upload a .safetensors or .bin file, or a zip/tar of a "
                         "Hugging Face model folder", details={"filename": got.filename})
    if name.endswith(".safetensors"):
        read_header(got.path)  # a malformed header is refused now, not in a worker
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / got.filename
    if target.exists():
        got.path.unlink(missing_ok=True)
    else:
        got.path.rename(target)
    kind = "safetensors" if name.endswith(".safetensors") else "bin"
    return kind, str(target.relative_to(data_dir))


_UNSAFE = re.compile(r"[^A-Za-z0-9._\-]")


def safe_name(name: str) -> str:
    """A file name without folders or odd characters (what a browser sends may be a path)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE.sub("_", base).lstrip(".") or "upload"
    return base[:200]


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"the upload is larger than the limit of {limit} bytes "
                                "(MERGESHIELD_MAX_UPLOAD_BYTES)", details={"limit": limit})

