"""One scan's life in the database, as a worker lives it: claim, heartbeat, progress, finish.

Every transition is a conditional UPDATE, so two deliveries of one scan (a resend by the
reconciler, a message Redis gives back) never run it twice: the second finds it claimed. A merge
plan is a job of the same kind (``worker/merge_jobs.py`` runs it): it shares all of this but
``run``.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError
from sqlalchemy import or_, select, update

from mergeshield import cancellation, pipeline
from mergeshield.errors import (
    ConfigError,
    InternalError,
    SourceNotFoundError,
    as_mergeshield_error,
)
from mergeshield.pipeline import ScanContext, ScanRequest, percent
from mergeshield.report import ScanReport
from mergeshield.report.io import load_report
from mergeshield.settings import Settings
from worker.bv_guard import BvGuard
from worker.db import DB_AWAY, Database, Scan, Upload, now, retrying
from worker.limits import StageClock, guard_device

log = logging.getLogger("mergeshield.worker")
FINISH_PATIENCE = 300.0  # seconds a finished scan waits for the database to record it


CANCEL_POLL = 1.0  # seconds between two looks at the scan's state from inside the work


class ScanCancelled(Exception):  # noqa: N818 - a signal to stop, not an error of the scan
    """Raised inside the work when the scan is no longer this worker's to run: cancelled in
    the database (DELETE), or re-queued to another worker. Deliberately no MergeShieldError,
    so nothing in the library mistakes it for a scan's failure."""


@dataclass
class Job:
    """A claimed scan: its row as read at claim time and the database to report to."""

    db: Database
    scan: Scan
    worker: str
    clock: StageClock | None = None  # per-stage time limits, checked at every report
    stage: str = "queued-for-worker"  # the last stage reported (named by internal errors)
    _checked: float = 0.0
    _polled: float = 0.0

    def progress(self, stage: str, fraction: float) -> None:
        """The library's progress callback: store stage and percent; stop if cancelled or if
        the stage ran past its time limit."""
        self.report(stage, percent(stage, fraction), urgent=fraction in (0.0, 1.0))

    def report(self, stage: str, pct: float | None, urgent: bool = True) -> None:
        """Store ``stage`` and the job's percent (None: unchanged), at most two writes a second
        unless ``urgent`` or a new stage; stop if cancelled or past the stage's time limit."""
        new_stage, self.stage = stage != self.stage, stage
        if self.clock is not None:
            self.clock.observe(stage)
        if time.monotonic() - self._checked < 0.5 and not (urgent or new_stage):
            return
        self._checked = time.monotonic()
        values: dict[str, Any] = {"stage": stage, "heartbeat_at": now()}
        if pct is not None:
            values["percent"] = pct
        try:
            with self.db.session() as s:
                done = s.execute(update(Scan).where(
                    Scan.id == self.scan.id, Scan.state == "running", Scan.worker == self.worker)
                    .values(**values))
        except DB_AWAY:  # the scan goes on; a later step writes its progress
            log.warning("database unreachable; progress not stored")
            return
        if done.rowcount == 0:  # type: ignore[attr-defined]
            raise ScanCancelled(self.scan.id)
        self._polled = self._checked

    def check_cancelled(self) -> None:
        """The library's cancellation check (``mergeshield.cancellation``), called between
        two steps of its loops: at most once a ``CANCEL_POLL``, read whether the scan is still
        this worker's, and stop it with ``ScanCancelled`` if not."""
        if time.monotonic() - self._polled < CANCEL_POLL:
            return
        self._polled = time.monotonic()
        try:
            with self.db.session() as s:
                row = s.execute(select(Scan.state, Scan.worker).where(
                    Scan.id == self.scan.id)).first()
        except DB_AWAY:  # the scan goes on; a later look tells
            return
        if row is None or tuple(row) != ("running", self.worker):
            raise ScanCancelled(self.scan.id)

    def cancelled(self) -> bool:
        """Whether the scan was cancelled (not merely handed to another worker)."""
        with self.db.session() as s:
            return s.scalar(select(Scan.state).where(Scan.id == self.scan.id)) == "cancelled"

    def succeed(self, report: ScanReport, result_dir: str, cache_key: str | None,
                cached_from: str | None = None) -> None:
        summary = {"verdict": report.verdict.model_dump(mode="json"),
                   "findings": len(report.findings),
                   "incomplete": [r.code for r in report.incomplete],
                   "chosen_lambda": report.sweep.chosen_lambda if report.sweep else None}
        self.finish("succeeded", verdict=report.verdict.status,
                    severity=report.verdict.severity, result_dir=result_dir,
                    cache_key=cache_key, cached_from=cached_from, summary=summary, percent=100.0)

    def fail(self, code: str, message: str) -> None:
        self.finish("failed", error_code=code, error_message=message)

    def finish(self, state: str, **values: Any) -> None:
        """Record the job's end (``state`` and the row's other ``values``), if it is still this
        worker's, however long the database is away (up to ``FINISH_PATIENCE``)."""
        def write() -> None:
            with self.db.session() as s:
                s.execute(update(Scan).where(Scan.id == self.scan.id, Scan.state == "running",
                                             Scan.worker == self.worker)
                          .values(state=state, finished_at=now(), heartbeat_at=now(), **values))

        retrying(write, seconds=FINISH_PATIENCE)


def claim(db: Database, scan_id: str, worker: str, stale_after: float) -> Job | None:
    """Take ``scan_id`` if it is queued (or running under a worker that stopped beating)."""
    stale = now() - timedelta(seconds=stale_after)
    with db.session() as s:
        done = s.execute(
            update(Scan)
            .where(Scan.id == scan_id,
                   or_(Scan.state == "queued",
                       (Scan.state == "running") & (Scan.heartbeat_at < stale)))
            .values(state="running", worker=worker, attempts=Scan.attempts + 1,
                    started_at=now(), heartbeat_at=now(), stage="queued-for-worker",
                    error_code=None, error_message=None)
        )
        if done.rowcount == 0:  # type: ignore[attr-defined]
            return None
        scan = s.scalars(select(Scan).where(Scan.id == scan_id)).one()
    return Job(db, scan, worker)


@contextmanager
def heartbeat(job: Job, interval: float) -> Iterator[None]:
    """Beat every ``interval`` seconds while the body runs (training steps may be slow)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                with job.db.session() as s:
                    s.execute(update(Scan).where(Scan.id == job.scan.id, Scan.worker == job.worker,
                                                 Scan.state == "running")
                              .values(heartbeat_at=now()))
            except Exception:  # a database hiccup must not kill the scan; the next beat retries
                log.exception("heartbeat failed")

    thread = threading.Thread(target=beat, name=f"heartbeat-{job.scan.id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def earlier_result(db: Database, scan: Scan, key: str) -> Scan | None:
    """A succeeded scan of the same owner with the same cache key, if any."""
    with db.session() as s:
        return s.scalars(select(Scan).where(Scan.cache_key == key, Scan.owner == scan.owner,
                                            Scan.state == "succeeded", Scan.id != scan.id,
                                            Scan.cached_from.is_(None),
                                            Scan.artifacts_expired_at.is_(None))
                         .order_by(Scan.finished_at.desc()).limit(1)).first()


def result_dir(scans_dir: Path, scan_id: str) -> Path:
    """Where a scan writes: named by its id, so a retry overwrites its own output."""
    return scans_dir / scan_id


@contextmanager
def working(job: Job, settings: Settings) -> Iterator[None]:
    """The job's work: its stages timed (``StageClock``, disarmed however it ends) and the
    library's loops looking for a cancel between two steps."""
    job.clock = StageClock(settings.stage_time_limit, settings.stage_time_limits)
    with job.clock, cancellation.checked_by(job.check_cancelled):
        yield


@contextmanager
def recorded(job: Job, settings: Settings, out: Path) -> Iterator[None]:
    """However the body ends is the job's outcome: cancelled (its partial ``out`` removed), the
    database away (raised again: the reconciler queues the job again), or ``failed`` with a
    stable code (a time limit, an input's error, a bug); the worker stays alive."""
    kind, job_id = job.scan.kind, job.scan.id
    try:
        yield
    except ScanCancelled:
        if retrying(job.cancelled, seconds=FINISH_PATIENCE):  # not another worker's now
            shutil.rmtree(out, ignore_errors=True)  # its partial outputs
        log.info("%s stopped: cancelled, or taken over by another worker", kind,
                 extra={"stage": job.stage})
    except DB_AWAY:  # not the job's fault: stop beating, and the reconciler queues it again
        log.exception("database unreachable; the %s will be retried", kind)
        raise
    except SoftTimeLimitExceeded:
        job.fail("time_limit", f"the {kind} ran longer than its limit of "
                               f"{settings.scan_soft_time_limit} s and was stopped")
        log.warning("%s exceeded its time limit", kind)
    except Exception as exc:  # one mapping to a stable code; the worker stays alive
        error = as_mergeshield_error(exc)
        if isinstance(error, InternalError):  # a bug, not bad input: logged with its traceback
            log.exception("%s crashed", kind, extra={"stage": job.stage})
            job.fail(error.code, f"an internal error occurred in stage {job.stage!r} of {kind} "
                                 f"{job_id}; it was logged and is a bug of MergeShield, not of "
                                 f"the inputs: report it with the {kind} id")
        else:
            job.fail(error.code, error.message)
            log.info("%s failed", kind, extra={"code": error.code, "stage": job.stage})


def run(job: Job, settings: Settings, bv_guard: BvGuard | None = None) -> None:
    """Scan (or reuse an earlier result), then record the outcome; errors become ``failed``."""
    scan = job.scan
    out = result_dir(settings.scans_dir, scan.id)
    with recorded(job, settings, out):
        with working(job, settings):
            request, labels = library_request(job.db, scan, settings.data_dir)
            device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
            ctx = ScanContext(
                out_dir=out, formats=("json", "sarif", "html"), token=settings.token(),
                endpoint=settings.hf_endpoint, cache_dir=settings.cache_dir, device=device,
                scan_id=scan.id, progress=job.progress, allowed_roots=(settings.uploads_dir,),
                bv_guard=bv_guard, min_free_bytes=settings.min_free_bytes,
                labels={**labels, "output": f"scan {scan.id}"})  # never a server path
            job.progress("resolve", 0.0)
            inputs = pipeline.resolve_inputs(request, ctx)  # hashed once: key and report
            key = pipeline.cache_key(request, inputs)
            earlier = None if scan.force else earlier_result(job.db, scan, key)
            if earlier is not None and earlier.result_dir and (
                    report_path := settings.data_dir / earlier.result_dir / "report.json"
            ).is_file():  # (a result the retention cleanup just removed is scanned again)
                job.succeed(load_report(report_path), earlier.result_dir, key,
                            cached_from=earlier.id)
                log.info("cache hit", extra={"cached_from": earlier.id})
                return
            ctx.device = guard_device(device, scan.request.get("device", "auto"),
                                      _checkpoint_bytes(inputs), settings.gpu_memory_factor)
            if ctx.device != device:
                log.warning("too little free GPU memory: the scan runs on the CPU")
            if out.exists():  # a retry overwrites its own output, nothing else
                shutil.rmtree(out)
            report = pipeline.scan(request, ctx, inputs)
        job.succeed(report, str(out.relative_to(settings.data_dir)), key)
        log.info("scan succeeded", extra={"verdict": report.verdict.status})


def _checkpoint_bytes(inputs: pipeline.Inputs) -> int:
    """Bytes of the tensors both checkpoints hold (what the GPU guard weighs)."""
    return sum(path.stat().st_size for src in inputs for path in src.tensor_files)


def library_request(db: Database, scan: Scan, data_dir: Path
                    ) -> tuple[ScanRequest, dict[str, str]]:
    """The stored request as the library's ``ScanRequest``, uploads replaced by their paths,
    and how the scan's outputs name those uploads (``ScanContext.labels``), not by the paths."""
    fields = dict(scan.request["scan"])
    labels: dict[str, str] = {}
    with db.session() as s:
        for role in ("suspect", "base"):
            upload_id = scan.request.get(f"{role}_upload")
            if upload_id is None:
                continue
            upload = s.get(Upload, upload_id)
            if upload is None:
                raise SourceNotFoundError(f"the {role}'s upload {upload_id} no longer exists; "
                                          "upload it again", details={"upload": upload_id})
            fields[role] = str(data_dir / upload.path)
            labels[role] = upload_label(upload)
    try:
        return ScanRequest.model_validate(fields), labels
    except ValidationError as exc:  # stored before today's bounds: refused, not a crash
        bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"the scan's options are out of bounds ({bad[:300]}); submit it again "
                          "with valid options", details={"scan": scan.id}) from None


def upload_label(upload: Upload) -> str:
    """An upload as reports, ``__metadata__`` and the BV cache name it: file name, id, sha256."""
    return f"upload:{upload.filename} ({upload.id}, sha256 {upload.sha256})"
