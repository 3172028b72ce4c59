"""The reconciler makes a real broker agree with the database (Redis, and the filesystem transport).

No worker runs here: on the filesystem transport each ``broker_task_ids`` call waits about 2 s
for inspect replies that never come (Redis lists what workers took, so it asks none).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery

from mergeshield.settings import Settings
from tests.worker.conftest import REDIS_URL
from worker.app import create_celery, send_scan
from worker.db import Database, Scan, now
from worker.migrate import upgrade
from worker.reconcile import broker_task_ids, reconcile

MakeScan = Callable[..., Scan]


def long_ago() -> datetime:
    return now() - timedelta(seconds=30)  # well past stale_after=1


def row(db: Database, scan_id: str) -> Scan:
    with db.session() as s:
        return s.get_one(Scan, scan_id)


def in_redis(client: redis.Redis, queue: str) -> list[str]:
    """Task ids of the messages waiting in ``queue``'s Redis list, in order."""
    return [json.loads(m)["headers"]["id"] for m in client.lrange(queue, 0, -1)]


def stack(tmp_path: Path, redis_url: str | None) -> tuple[Settings, Database, Celery]:
    settings = Settings(redis_url=redis_url, database_url=f"sqlite:///{tmp_path / 'ms.db'}",
                        data_dir=tmp_path, stale_after=1, max_attempts=2)
    db = Database(settings.database())
    upgrade(db)
    return settings, db, create_celery(settings)


@pytest.fixture
def on_redis(tmp_path: Path, redis_client: redis.Redis
             ) -> Iterator[tuple[Settings, Database, Celery]]:
    settings, db, app = stack(tmp_path, REDIS_URL)
    assert settings.redis_url == REDIS_URL  # constructor kwargs by field name are honoured
    try:
        yield settings, db, app
    finally:
        app.close()
        db.dispose()


def test_settings_take_field_names(tmp_path: Path) -> None:
    settings = Settings(redis_url=REDIS_URL, database_url="sqlite:///x.db", data_dir=tmp_path,
                        stale_after=1, max_attempts=2)
    assert (settings.redis_url, settings.database(), settings.data_dir) == (
        REDIS_URL, "sqlite:///x.db", tmp_path)
    assert (settings.stale_after, settings.max_attempts) == (1.0, 2)


def test_a_lost_queued_scan_is_resent(on_redis: tuple[Settings, Database, Celery],
                                      make_scan: MakeScan, redis_client: redis.Redis) -> None:
    settings, db, app = on_redis
    lost = make_scan(db, queue="gpu", enqueued_at=long_ago())
    fresh = make_scan(db, queue="cpu", enqueued_at=now())  # may still be in flight: left alone
    done = reconcile(db, app, settings)
    assert (done.resent, done.requeued, done.failed) == ([lost.id], [], [])
    assert in_redis(redis_client, "gpu") == [lost.id]
    assert in_redis(redis_client, "cpu") == []
    assert lost.id in broker_task_ids(app, settings)
    resent_at = row(db, lost.id).enqueued_at
    assert resent_at is not None and resent_at > now() - timedelta(seconds=10)
    assert row(db, fresh.id).state == "queued"


def test_a_queued_scan_in_the_broker_is_not_resent(on_redis: tuple[Settings, Database, Celery],
                                                   make_scan: MakeScan, redis_client: redis.Redis
                                                   ) -> None:
    settings, db, app = on_redis
    scan = make_scan(db, queue="cpu", enqueued_at=long_ago())
    send_scan(app, scan.id, "cpu")
    assert reconcile(db, app, settings).resent == []
    assert in_redis(redis_client, "cpu") == [scan.id]


def test_a_scan_taken_but_never_started_is_resent(on_redis: tuple[Settings, Database, Celery],
                                                  make_scan: MakeScan) -> None:
    """A worker took the message (unacked, late acks) and never claimed the scan: a worker
    stuck after a broker reconnect. Left alone for ``stale_after`` (1 s), then sent again."""
    settings, db, app = on_redis
    scan = make_scan(db, queue="cpu", enqueued_at=long_ago())
    send_scan(app, scan.id, "cpu")
    with app.connection_for_read() as conn, conn.SimpleQueue("cpu") as queue:
        taken = queue.get(timeout=10)  # not acked: Redis keeps it in "unacked"
        assert taken.headers["id"] == scan.id
        assert reconcile(db, app, settings).resent == []  # just taken: it may start any moment
        time.sleep(1.5)
        assert reconcile(db, app, settings).resent == [scan.id]


def test_a_dead_workers_scan_is_queued_again(on_redis: tuple[Settings, Database, Celery],
                                            make_scan: MakeScan, redis_client: redis.Redis
                                            ) -> None:
    settings, db, app = on_redis
    scan = make_scan(db, queue="gpu", state="running", worker="dead@host", attempts=1,
                     heartbeat_at=long_ago(), enqueued_at=long_ago())
    done = reconcile(db, app, settings)
    assert (done.requeued, done.resent, done.failed) == ([scan.id], [], [])
    stored = row(db, scan.id)
    assert (stored.state, stored.stage, stored.worker) == ("queued", "requeued", None)
    assert in_redis(redis_client, "gpu") == [scan.id]


def test_a_scan_out_of_attempts_fails(on_redis: tuple[Settings, Database, Celery],
                                      make_scan: MakeScan, redis_client: redis.Redis) -> None:
    settings, db, app = on_redis
    scan = make_scan(db, queue="cpu", state="running", worker="dead@host", attempts=2,
                     heartbeat_at=long_ago(), enqueued_at=long_ago())
    alive = make_scan(db, queue="cpu", state="running", worker="w@host", attempts=2,
                      heartbeat_at=now(), enqueued_at=long_ago())
    done = reconcile(db, app, settings)
    assert (done.failed, done.requeued, done.resent) == ([scan.id], [], [])
    stored = row(db, scan.id)
    assert (stored.state, stored.error_code) == ("failed", "worker_lost")
    assert stored.error_message and "2 times" in stored.error_message
    assert stored.finished_at is not None
    assert row(db, alive.id).state == "running"
    assert in_redis(redis_client, "cpu") == []


def test_filesystem_transport_resends_a_lost_scan(tmp_path: Path, make_scan: MakeScan,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "MERGESHIELD_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    settings, db, app = stack(tmp_path, None)
    try:
        assert settings.broker() == "filesystem://"
        lost = make_scan(db, queue="cpu", enqueued_at=long_ago())
        queue = tmp_path / "broker" / "queue"
        assert list(queue.glob("*.msg")) == []
        assert reconcile(db, app, settings).resent == [lost.id]
        files = list(queue.glob("*.cpu.msg"))
        assert len(files) == 1
        assert json.loads(files[0].read_bytes())["headers"]["id"] == lost.id
    finally:
        app.close()
        db.dispose()
