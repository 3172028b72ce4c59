"""The reconciler: the database says what should be queued; make the broker agree.

A broker can lose messages (Redis here keeps nothing on disk; a filesystem message taken by a
worker that was then killed is gone). Every ``reconcile_interval`` the API runs one pass:
- a ``queued`` scan whose id is in no queue, no unacked set and no worker is sent again;
- a ``running`` scan whose worker stopped beating is queued again, or failed after
  ``max_attempts`` tries, with the reason.
A duplicate message is harmless: ``jobs.claim`` lets only one delivery run a scan.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import select, update

from mergeshield.settings import Settings
from worker.app import QUEUES, send_scan
from worker.db import Database, Scan, now

log = logging.getLogger("mergeshield.reconcile")


@dataclass
class Pass:
    resent: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def reconcile(db: Database, app: Celery, settings: Settings, *,
              judge_running: bool = True) -> Pass:
    """One pass. A scan sent less than ``stale_after`` ago is left alone: it may be in flight.
    ``judge_running=False`` leaves running scans alone (see ``Reconciler``)."""
    result = Pass()
    t = now()
    stale = t - timedelta(seconds=settings.stale_after)
    with db.session() as s:
        dead = s.scalars(select(Scan).where(Scan.state == "running",
                                            Scan.heartbeat_at < stale)).all() \
            if judge_running else []
        for scan in dead:
            if scan.attempts >= settings.max_attempts:
                s.execute(update(Scan).where(Scan.id == scan.id, Scan.state == "running",
                                             Scan.heartbeat_at < stale)
                          .values(state="failed", finished_at=t, error_code="worker_lost",
                                  error_message=f"the worker running this scan stopped "
                                                f"{scan.attempts} times (crash, kill or time "
                                                "limit); not retried again"))
                result.failed.append(scan.id)
            else:
                s.execute(update(Scan).where(Scan.id == scan.id, Scan.state == "running",
                                             Scan.heartbeat_at < stale)
                          .values(state="queued", stage="requeued", worker=None, enqueued_at=t))
                result.requeued.append(scan.id)
                send_scan(app, scan.id, scan.queue)
        waiting = s.scalars(select(Scan).where(
            Scan.state == "queued", Scan.enqueued_at < stale,
            Scan.id.not_in(result.requeued))).all()
    pending = broker_task_ids(app, settings, {s.id for s in waiting}) if waiting else set()
    for scan in waiting:
        if scan.id not in pending:
            send_scan(app, scan.id, scan.queue)
            result.resent.append(scan.id)
            with db.session() as s:
                s.execute(update(Scan).where(Scan.id == scan.id).values(enqueued_at=now()))
    if result.resent or result.requeued or result.failed:
        log.warning("reconciled", extra={"resent": result.resent, "requeued": result.requeued,
                                         "failed": result.failed})
    return result


class Reconciler:
    """Passes of ``reconcile`` that judge running scans only once the database has been
    reachable for ``stale_after``: while it was away no worker could write its heartbeat, so a
    silent heartbeat says nothing about the worker (requeueing would run the scan twice)."""

    def __init__(self, db: Database, app: Celery, settings: Settings) -> None:
        self.db, self.app, self.settings = db, app, settings
        self.reachable_since: float | None = None

    def __call__(self) -> Pass:
        try:
            self.db.ping()
        except Exception:
            self.reachable_since = None
            raise
        if self.reachable_since is None:
            self.reachable_since = time.monotonic()
        settled = time.monotonic() - self.reachable_since >= self.settings.stale_after
        return reconcile(self.db, self.app, self.settings, judge_running=settled)


def broker_task_ids(app: Celery, settings: Settings, wanted: set[str] | None = None) -> set[str]:
    """Ids of scan tasks the broker or a worker holds: queued, unacked, reserved or active.

    Redis lists every message a worker took but has not acked (late acks), with when it was
    taken; one taken more than ``stale_after`` ago whose scan is still queued sits in a stuck
    worker (a Celery worker may stop dispatching after a broker reconnect: celery/celery#10302),
    so it is not counted and the scan is sent again. The filesystem transport forgets a taken
    message: the workers are asked, which costs a broadcast and a second of waiting, skipped
    when the queue folder already holds every id in ``wanted``."""
    ids: set[str] = set()
    if settings.redis_url is not None:
        with app.connection_for_read() as conn:
            client: Any = conn.default_channel.client
            for queue in QUEUES:
                for key in client.scan_iter(match=f"{queue}*"):
                    if client.type(key) in (b"list", "list"):
                        ids.update(_ids(m) for m in client.lrange(key, 0, -1))
            taken_since = time.time() - settings.stale_after
            for tag, value in client.hgetall("unacked").items():
                if (client.zscore("unacked_index", tag) or 0) >= taken_since:
                    ids.add(_ids(json.loads(value)[0]))
        return ids
    for path in (Path(settings.broker_dir) / "queue").glob("*.msg"):
        try:
            ids.add(_ids(path.read_bytes()))
        except (OSError, ValueError):  # taken by a worker while we read
            continue
    if wanted is not None and wanted <= ids:
        return ids
    inspect = app.control.inspect(timeout=1.0)
    for reply in (inspect.active() or {}, inspect.reserved() or {}):
        for tasks in reply.values():
            ids.update(str(t.get("id")) for t in tasks)
    ids.discard("")
    return ids


def _ids(message: Any) -> str:
    if isinstance(message, bytes | str):
        message = json.loads(message)
    return str(message.get("headers", {}).get("id", ""))
