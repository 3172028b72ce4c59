"""The queue's one task: a view that claims a scan, runs it through the library and records it.

The scan id is the task id and names the output folder, so a redelivered message either finds
the scan claimed (and does nothing) or reruns it into its own folder. A merge plan is a job of the
same table and task: it runs through ``merge_jobs`` instead.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

import torch
from celery import Task
from celery.signals import worker_ready, worker_shutdown
from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite

from mergeshield.settings import Settings
from worker import jobs, merge_jobs
from worker.app import SCAN_TASK, app
from worker.bv_guard import db_guard
from worker.db import Database, Worker, now
from worker.logs import scan_context

log = logging.getLogger("mergeshield.worker")
_runtime: dict[int, tuple[Settings, Database]] = {}


def runtime() -> tuple[Settings, Database]:
    """Settings and a database engine for this process (engines must not cross a fork)."""
    pid = os.getpid()
    if pid not in _runtime:
        settings = Settings()
        _runtime[pid] = (settings, Database(settings.database()))
    return _runtime[pid]


@app.task(name=SCAN_TASK, bind=True)
def scan(self: Task[Any, Any], scan_id: str) -> str:
    settings, db = runtime()
    worker = self.request.hostname or socket.gethostname()
    with scan_context(scan_id):
        job = jobs.claim(db, scan_id, worker, settings.stale_after)
        if job is None:
            log.info("not claimed: finished, cancelled or running elsewhere")
            return "skipped"
        with jobs.heartbeat(job, settings.heartbeat_interval):
            guard = db_guard(db, worker, scan_id, settings.stale_after)
            if job.scan.kind == "merge":
                merge_jobs.run(job, settings, bv_guard=guard)
            else:
                jobs.run(job, settings, bv_guard=guard)
    return "done"


# --- the worker registry: /readyz and /metrics count workers seen recently

_stop = threading.Event()


@worker_ready.connect
def _announce(sender: Any = None, **_: Any) -> None:
    settings, db = runtime()
    name = getattr(sender, "hostname", None) or socket.gethostname()
    queues = ",".join(sorted(q.name for q in app.amqp.queues.consume_from.values())) \
        if app.amqp.queues.consume_from else "cpu,gpu"
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def beat() -> None:
        while True:
            try:
                _upsert(db, name, queues, device)
            except Exception:  # the database may be restarting: try again next beat
                log.exception("worker heartbeat failed")
            if _stop.wait(settings.heartbeat_interval):
                return

    threading.Thread(target=beat, name="worker-registry", daemon=True).start()
    log.info("worker ready", extra={"worker": name, "queues": queues, "device": device})


@worker_shutdown.connect
def _retire(sender: Any = None, **_: Any) -> None:
    _stop.set()
    _settings, db = runtime()
    name = getattr(sender, "hostname", None) or socket.gethostname()
    with db.session() as s:
        s.execute(delete(Worker).where(Worker.name == name))


def _upsert(db: Database, name: str, queues: str, device: str) -> None:
    values = {"name": name, "queues": queues, "device": device, "last_seen": now()}
    dialect = db.engine.dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(Worker).values(started_at=now(), **values)
    stmt = stmt.on_conflict_do_update(index_elements=[Worker.name], set_=values)
    with db.session() as s:
        s.execute(stmt)
