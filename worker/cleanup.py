"""Retention: remove what is past its time (settings ``artifact_retention``, ``upload_retention``).

* A finished scan's artifacts (its folder under ``scans/``: reports, cleaned checkpoint, zip) go
  ``artifact_retention`` seconds after it finished. Its row stays, with verdict and summary, and
  says when its artifacts expired (``artifacts_expired_at``); the API answers 410 for its files.
* An upload goes ``upload_retention`` seconds after it was made: its row, and its file once no
  other key's upload holds the same bytes. Partial uploads left in ``uploads/tmp`` go as well.

Never removed: anything of a queued or running scan or merge, an upload such a job reads, and a
result folder that a scan still kept was served from (a cache hit shares its source's folder).
Run by the API every ``cleanup_interval`` seconds and by ``mergeshield cleanup``; two runs at once
are harmless (folders are removed once, rows updated conditionally).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, func, or_, select, update

from mergeshield.settings import Settings
from worker.db import FINISHED, Database, Scan, Upload, now

log = logging.getLogger("mergeshield.cleanup")
BATCH = 500  # scans looked at per pass; the next pass goes on


@dataclass
class Cleaned:
    expired_scans: list[str] = field(default_factory=list)
    removed_uploads: list[str] = field(default_factory=list)
    freed_bytes: int = 0


def cleanup(db: Database, settings: Settings, at: datetime | None = None) -> Cleaned:
    """One pass: expire old scans' artifacts and remove old unused uploads."""
    at = at or now()
    done = Cleaned()
    if settings.artifact_retention > 0:
        _expire_scans(db, settings, at - timedelta(seconds=settings.artifact_retention), done)
    if settings.upload_retention > 0:
        _remove_uploads(db, settings, at - timedelta(seconds=settings.upload_retention), done)
    if done.expired_scans or done.removed_uploads:
        log.info("cleanup", extra={"expired_scans": len(done.expired_scans),
                                   "removed_uploads": len(done.removed_uploads),
                                   "freed_bytes": done.freed_bytes})
    return done


def _expire_scans(db: Database, settings: Settings, cutoff: datetime, done: Cleaned) -> None:
    with db.session() as s:
        old = s.scalars(select(Scan).where(
            Scan.state.in_(FINISHED), Scan.finished_at < cutoff,
            Scan.artifacts_expired_at.is_(None)).order_by(Scan.finished_at).limit(BATCH)).all()
        dirs = {scan.result_dir for scan in old if scan.result_dir}
        kept = set(s.scalars(select(Scan.result_dir).where(
            Scan.result_dir.in_(dirs),
            or_(Scan.state.not_in(FINISHED), Scan.finished_at >= cutoff)))) if dirs else set()
    for scan in old:
        if scan.result_dir in kept:
            continue  # a newer cache hit still serves this folder
        folder = settings.scans_dir / scan.id
        done.freed_bytes += _remove(folder) + _remove(folder.parent / f"{scan.id}.zip")
        with db.session() as s:
            s.execute(update(Scan).where(Scan.id == scan.id, Scan.state.in_(FINISHED),
                                         Scan.artifacts_expired_at.is_(None))
                      .values(artifacts_expired_at=now()))
        done.expired_scans.append(scan.id)


def _remove_uploads(db: Database, settings: Settings, cutoff: datetime, done: Cleaned) -> None:
    with db.session() as s:
        active = s.scalars(select(Scan.request).where(Scan.state.not_in(FINISHED))).all()
        old = s.scalars(select(Upload).where(Upload.created_at < cutoff)).all()
    used = {request.get(f"{role}_upload") for request in active for role in ("suspect", "base")}
    used.update(u for request in active for u in request.get("uploads", ()))  # merges' plans
    for upload in old:
        if upload.id in used:
            continue
        with db.session() as s:
            s.execute(delete(Upload).where(Upload.id == upload.id))
            shared = s.scalar(select(func.count()).select_from(Upload).where(
                Upload.sha256 == upload.sha256)) or 0
        if not shared:  # the bytes are stored once per sha256, for every key that sent them
            done.freed_bytes += _remove(settings.uploads_dir / upload.sha256)
        done.removed_uploads.append(upload.id)
    tmp = settings.uploads_dir / "tmp"
    for partial in tmp.iterdir() if tmp.is_dir() else ():
        try:
            stale = partial.lstat().st_mtime < cutoff.timestamp()  # an upload never finished
        except FileNotFoundError:  # it just finished (renamed) or was refused (removed)
            continue
        if stale:
            done.freed_bytes += _remove(partial)


def _remove(path: Path) -> int:
    """Remove a file or folder (links are removed, never followed); the bytes freed."""
    if path.is_symlink() or path.is_file():
        size = path.lstat().st_size
        path.unlink(missing_ok=True)
        return size
    if not path.is_dir():
        return 0
    size = sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    shutil.rmtree(path, ignore_errors=True)
    return size
