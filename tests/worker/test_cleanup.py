"""cleanup.py on real SQLite and PostgreSQL: what is past its retention goes, and nothing a queued
or running scan needs, nor a result folder a kept scan was served from."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from mergeshield.settings import Settings
from worker.cleanup import cleanup
from worker.db import Database, Scan, Upload, now

HOUR = 3600.0


def _folder(path: Path, size: int = 100) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"\0" * size)
    (path / "report.json").write_text("{}")
    return path


def _upload(db: Database, settings: Settings, owner: str, sha: str, age: float) -> Upload:
    if not (settings.uploads_dir / sha).exists():
        _folder(settings.uploads_dir / sha)
    row = Upload(owner=owner, filename="m.zip", kind="archive", size=100, sha256=sha,
                 path=f"uploads/{sha}/model.safetensors",
                 created_at=now() - timedelta(seconds=age))
    with db.session() as s:
        s.add(row)
    return row


def test_retention_removes_what_is_old_and_unused_and_keeps_the_rest(
        db: Database, make_scan: Callable[..., Scan], tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, artifact_retention=HOUR, upload_retention=HOUR)
    scans = settings.scans_dir
    old, recent = now() - timedelta(hours=2), now() - timedelta(minutes=1)

    def finished(scan_id: str, at: object, **values: object) -> Scan:
        return make_scan(db, id=scan_id, state="succeeded", finished_at=at,
                         result_dir=f"scans/{scan_id}", summary={"findings": 1}, **values)

    finished("expired", old, verdict="backdoor_suspected")
    _folder(scans / "expired")
    (scans / "expired.zip").write_bytes(b"z" * 50)
    finished("fresh", recent)
    _folder(scans / "fresh")
    finished("source", old)  # an old result a recent cache hit still serves
    _folder(scans / "source")
    make_scan(db, id="hit", state="succeeded", finished_at=recent, result_dir="scans/source",
              cached_from="source")
    make_scan(db, id="failed", state="failed", finished_at=old, error_code="internal_error")
    _folder(scans / "failed")  # a failed scan's partial output
    make_scan(db, id="running", state="running", started_at=old)
    _folder(scans / "running")

    unused = _upload(db, settings, "alice", "a" * 64, 2 * HOUR)
    used = _upload(db, settings, "alice", "b" * 64, 2 * HOUR)
    make_scan(db, id="queued", request={"scan": {}, "suspect_upload": used.id,
                                        "base_upload": None})
    young = _upload(db, settings, "alice", "c" * 64, 60)
    shared_old = _upload(db, settings, "alice", "d" * 64, 2 * HOUR)
    bobs = _upload(db, settings, "bob", "d" * 64, 60)  # the same bytes, lately, by bob
    partial = settings.uploads_dir / "tmp" / "x.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"p" * 10)
    os.utime(partial, (old.timestamp(), old.timestamp()))
    live_partial = partial.with_name("y.part")
    live_partial.write_bytes(b"p")

    done = cleanup(db, settings)

    assert sorted(done.expired_scans) == ["expired", "failed"]
    assert sorted(done.removed_uploads) == sorted([unused.id, shared_old.id])
    assert done.freed_bytes >= 100 + 50 + 100 + 100 + 10
    assert not (scans / "expired").exists() and not (scans / "expired.zip").exists()
    assert not (scans / "failed").exists()
    for kept in ("fresh", "source", "running"):
        assert (scans / kept / "model.safetensors").is_file(), kept
    with db.session() as s:
        rows = {r.id: r for r in s.scalars(select(Scan))}
        uploads = {u.id for u in s.scalars(select(Upload))}
    expired = rows["expired"]
    assert expired.artifacts_expired_at is not None and expired.state == "succeeded"
    assert expired.verdict == "backdoor_suspected" and expired.summary == {"findings": 1}
    assert all(rows[k].artifacts_expired_at is None for k in ("fresh", "source", "hit",
                                                               "running", "queued"))
    assert uploads == {used.id, young.id, bobs.id}
    assert not (settings.uploads_dir / ("a" * 64)).exists()
    for sha in ("b", "c", "d"):  # used, young, and bob's copy of d
        assert (settings.uploads_dir / (sha * 64)).is_dir(), sha
    assert not partial.exists() and live_partial.exists()

    again = cleanup(db, settings)  # a second pass finds nothing more
    assert again.expired_scans == [] and again.removed_uploads == []


def test_zero_retention_keeps_everything(db: Database, make_scan: Callable[..., Scan],
                                         tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, artifact_retention=0, upload_retention=0)
    make_scan(db, id="s", state="succeeded", finished_at=now() - timedelta(days=3650),
              result_dir="scans/s")
    _folder(settings.scans_dir / "s")
    _upload(db, settings, "alice", "e" * 64, 10**9)
    done = cleanup(db, settings)
    assert done.expired_scans == [] and done.removed_uploads == []
    assert (settings.scans_dir / "s").is_dir()
