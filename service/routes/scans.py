"""``/v1/scans``: submit, follow, list, cancel; fetch the report and the cleaned checkpoint.

Routes are thin: validate, persist, enqueue, answer. No tensor is touched here.
"""

from __future__ import annotations

import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import FileResponse
from sqlalchemy import Row, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from starlette.datastructures import State

from mergeshield.errors import (
    ArtifactsExpiredError,
    ConflictError,
    NotFoundError,
)
from mergeshield.pipeline import ScanRequest
from mergeshield.report import LayerStat, ScanReport, load_report
from service import quotas, reads
from service.auth import Principal, verified_caller
from service.idempotency import body_sha256, by_idempotency
from service.paging import Limit, Offset, page
from service.schemas import ModelRef, ScanCreate, ScanOut, ScanPage
from worker import callbacks
from worker.app import choose_queue, send_scan
from worker.db import (
    FINISHED,
    CallbackEndpoint,
    Database,
    Delivery,
    Scan,
    Upload,
    Worker,
    new_id,
    now,
)

router = APIRouter(prefix="/v1/scans", tags=["scans"])
NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL: a filter with one is a 422, not a 500
Caller = Annotated[Principal, Depends(verified_caller)]
REPORT_FILES = {"json": ("report.json", "application/json"),
                "sarif": ("report.sarif", "application/sarif+json"),
                "html": ("report.html", "text/html; charset=utf-8")}


@router.post("", status_code=202, response_model=ScanOut)
def submit(body: ScanCreate, request: Request, response: Response, caller: Caller,
           idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> ScanOut:
    """Queue a scan. A retried POST with the same ``Idempotency-Key`` and body returns the same
    scan; the key sent with another body is refused (422 ``idempotency_key_reused``). Options
    out of their bounds and unknown dataset names are a 422 before anything is queued."""
    scan, _created = queue_scan(request.app.state, caller, body, idempotency_key)
    return _out(scan, response)


def queue_scan(state: State, caller: Principal, body: ScanCreate,
               idempotency_key: str | None = None) -> tuple[Scan, bool]:
    """Persist and enqueue one scan (the one way in: this route and the Hub's webhook).
    Returns the scan and whether it is new (False: the ``idempotency_key`` names an earlier
    one). A ``callback_url`` gets its endpoint and a waiting callback with the scan."""
    db: Database = state.db
    settings = state.settings
    fingerprint = body_sha256(body)
    if idempotency_key and (same := by_idempotency(db, caller, idempotency_key,
                                                   fingerprint)) is not None:
        return same, False
    quotas.check_scans(db, settings, caller)
    sizes = [_upload_size(db, caller, ref) for ref in (body.suspect, body.base)]
    lib = ScanRequest(
        suspect=body.suspect.label(), base=body.base.label(),
        suspect_revision=body.suspect.revision, base_revision=body.base.revision,
        evaluation=body.evaluation, evaluation_revision=body.evaluation_revision,
        injection_data=body.injection_data, **body.options.model_dump())
    endpoint = None if body.callback_url is None else callbacks.endpoint_for(
        db, caller.id, body.callback_url, settings.callback_allow_private)
    scan = Scan(owner=caller.id, request={"scan": lib.model_dump(mode="json"),
                                          "suspect_upload": body.suspect.upload,
                                          "base_upload": body.base.upload,
                                          "device": body.device, "body_sha256": fingerprint},
                suspect=body.suspect.label(), base=body.base.label(), force=body.force,
                queue=choose_queue(body.device, sizes, settings.gpu_route_min_bytes,
                                   lambda: gpu_workers(db, settings.stale_after)),
                idempotency_key=idempotency_key, enqueued_at=now(), id=new_id())
    return persist_once(state, scan, endpoint, caller, idempotency_key, fingerprint)


def persist_once(state: State, job: Scan, endpoint: CallbackEndpoint | None, caller: Principal,
                 idempotency_key: str | None, fingerprint: str) -> tuple[Scan, bool]:
    """Store and enqueue ``job`` (True); when the same Idempotency-Key raced in twice, the job
    stored first instead (False)."""
    try:
        persist_and_send(state, job, endpoint)
    except IntegrityError:
        same = by_idempotency(state.db, caller, idempotency_key or "", fingerprint)
        if same is None:
            raise
        return same, False
    return job, True


def gpu_workers(db: Database, stale_after: float) -> bool:
    """Whether a worker that consumes the ``gpu`` queue beat lately (asked only for big or hub
    models under device "auto")."""
    with db.session() as s:
        return bool(s.scalar(select(func.count()).select_from(Worker).where(
            Worker.queues.contains("gpu"),
            Worker.last_seen > now() - timedelta(seconds=stale_after))))


def persist_and_send(state: State, scan: Scan, endpoint: CallbackEndpoint | None) -> None:
    """Store the scan or merge (with a waiting callback to ``endpoint``), then hand its id to
    the broker."""
    with state.db.session() as s:
        s.add(scan)
        if endpoint is not None:
            s.flush()  # the scan's row first: the callback refers to it
            s.add(callbacks.waiting_delivery(scan, endpoint))
    try:
        send_scan(state.celery, scan.id, scan.queue)
    except Exception:  # broker down: the scan is safe in the database; the reconciler sends it
        state.log.exception("could not enqueue; the reconciler will retry")


@router.get("", response_model=ScanPage)
def list_scans(request: Request, caller: Caller,
               state: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None
               = None,
               verdict: str | None = Query(default=None, max_length=40, pattern=NO_NUL),
               suspect: str | None = Query(default=None, max_length=300, pattern=NO_NUL),
               limit: Limit = 50, offset: Offset = 0) -> ScanPage:
    """Newest first; filter by state, verdict and suspect (exact hub id or upload label)."""
    db: Database = request.app.state.db
    where = [Scan.kind == "scan"] + ([] if caller.admin else [Scan.owner == caller.id])
    if state:
        where.append(Scan.state == state)
    if verdict:
        where.append(Scan.verdict == verdict)
    if suspect:
        where.append(Scan.suspect == suspect)
    total, rows = page(db, Scan, where, Scan.created_at, limit, offset)
    return ScanPage(items=[_out(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{scan_id}", response_model=ScanOut)
async def get_scan(scan_id: str, request: Request, response: Response, caller: Caller
                   ) -> ScanOut:
    """A scan's state, stage and outcome (the status poll: one query on the read threads, the
    rest in the event loop)."""
    row = await reads.read(request, job_status, request.app.state.db, caller, scan_id, "scan")
    return _out(row, response)


@router.delete("/{scan_id}", response_model=ScanOut)
def cancel(scan_id: str, request: Request, response: Response, caller: Caller) -> ScanOut:
    """Cancel a queued or running scan. A running one stops within seconds (its worker looks
    between two steps of the work), its partial output is removed, and the worker moves on."""
    cancel_job(request.app.state, _owned(request, caller, scan_id))
    return _out(_owned(request, caller, scan_id), response)


def cancel_job(state: State, job: Scan) -> None:
    """Cancel a queued or running scan or merge (409 once it has finished)."""
    db: Database = state.db
    with db.session() as s:
        done = s.execute(update(Scan).where(Scan.id == job.id, Scan.state.not_in(FINISHED))
                         .values(state="cancelled", finished_at=now(),
                                 error_code="cancelled", error_message="cancelled by the user"))
    if done.rowcount == 0:  # type: ignore[attr-defined]
        raise ConflictError(f"{job.kind} {job.id} already {job.state}; nothing to cancel",
                            details={"state": job.state})
    try:
        state.celery.control.revoke(job.id)  # a queued message is dropped unrun
    except Exception:
        state.log.warning("revoke failed; the worker will skip the job anyway")


@router.post("/{scan_id}/rescan", status_code=202, response_model=ScanOut)
def rescan(scan_id: str, request: Request, response: Response, caller: Caller) -> ScanOut:
    """Queue the same scan again (same inputs and options, same owner, whose uploads it reads),
    bypassing the result cache."""
    old = _owned(request, caller, scan_id)
    quotas.check_scans(request.app.state.db, request.app.state.settings, caller)
    scan = Scan(owner=old.owner, request=old.request, suspect=old.suspect, base=old.base,
                force=True, queue=old.queue, enqueued_at=now(), id=new_id())
    with request.app.state.db.session() as s:  # the old scan's callback endpoint, if it had one
        endpoint = s.scalar(select(CallbackEndpoint).join(
            Delivery, Delivery.endpoint_id == CallbackEndpoint.id).where(
            Delivery.scan_id == old.id, Delivery.direction == "outbound"))
        if endpoint is not None:
            s.expunge(endpoint)
    persist_and_send(request.app.state, scan, endpoint)
    return _out(scan, response)


@router.get("/{scan_id}/layers", response_model=list[LayerStat])
def layers(scan_id: str, request: Request, caller: Caller) -> list[LayerStat]:
    """The suspect's task-vector norm per layer (empty for reports older than this field)."""
    tv = scan_report(request, caller, scan_id).task_vector
    return tv.per_layer if tv else []


@router.get("/{scan_id}/report", response_class=FileResponse,
            responses={200: {"content": {t: {} for _n, t in REPORT_FILES.values()}}})
def report(scan_id: str, request: Request, caller: Caller,
           format: Literal["json", "sarif", "html"] | None = None) -> FileResponse:
    """The report as JSON (default), SARIF 2.1.0 or HTML (also chosen by ``Accept: text/html``)."""
    fmt = format or ("html" if "text/html" in request.headers.get("accept", "") else "json")
    name, media = REPORT_FILES[fmt]
    path = _result_dir(request, _finished(request, caller, scan_id)) / name
    return FileResponse(path, media_type=media, filename=f"{scan_id}-{name}",
                        content_disposition_type="inline")


@router.get("/{scan_id}/checkpoint", response_class=FileResponse)
def checkpoint(scan_id: str, request: Request, caller: Caller,
               layout: Literal["zip", "file"] = "zip") -> FileResponse:
    """The cleaned model: a zip of the HF-layout folder, or (``layout=file``) its one
    ``.safetensors`` file when it has a single one."""
    folder = _result_dir(request, _finished(request, caller, scan_id))
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise NotFoundError("this scan wrote no cleaned checkpoint (see the report's "
                            "'incomplete' reasons)", details={"scan": scan_id})
    if layout == "file":
        if len(weights) != 1:
            raise ConflictError("the cleaned model is sharded: download layout=zip",
                                details={"files": [w.name for w in weights]})
        return FileResponse(weights[0], media_type="application/octet-stream",
                            filename=f"{scan_id}-{weights[0].name}")
    return FileResponse(zipped(folder), media_type="application/zip",
                        filename=f"{scan_id}-cleaned.zip")


# --- helpers

def _owned(request: Request, caller: Principal, scan_id: str) -> Scan:
    return owned_job(request.app.state.db, caller, scan_id, "scan")


def owned_job(db: Database, caller: Principal, job_id: str, kind: str) -> Scan:
    """The scan or merge (``kind``), if the caller may see it; 404 otherwise (other keys' jobs
    do not exist)."""
    with db.session() as s:  # a NUL never names a row, and PostgreSQL refuses it in a query
        job = None if "\x00" in job_id else s.get(Scan, job_id)
    if job is None or job.kind != kind or not (caller.admin or job.owner == caller.id):
        raise NotFoundError(f"no {kind} {job_id!r}", details={kind: job_id})
    return job


# what a job's answer shows (``_out``): every column but the request it was made with. Built
# once, from the table's own columns: ORM attributes in a Core select make SQLAlchemy match each
# result column against the statement on every execution (half of a status read's time)
_SCANS = Scan.__table__.c
STATUS_QUERY = select(*(_SCANS[name] for name in (
    "id", "owner", "kind", "state", "stage", "percent", "suspect", "base", "queue", "attempts",
    "created_at", "started_at", "finished_at", "verdict", "severity", "cached_from",
    "error_code", "error_message", "summary", "artifacts_expired_at"))).where(
    _SCANS.id == bindparam("job_id"))


def job_status(db: Database, caller: Principal, job_id: str, kind: str) -> Row[Any]:
    """``owned_job`` for a status read: the columns ``_out`` shows, in one statement, without
    an ORM session or the request's JSON (a fifth of ``owned_job``'s time on SQLite)."""
    with db.reading() as conn:  # a NUL never names a row, and PostgreSQL refuses it
        job = None if "\x00" in job_id else conn.execute(
            STATUS_QUERY, {"job_id": job_id}).first()
    if job is None or job.kind != kind or not (caller.admin or job.owner == caller.id):
        raise NotFoundError(f"no {kind} {job_id!r}", details={kind: job_id})
    return job


def scan_status(db: Database, caller: Principal, scan_id: str) -> ScanOut:
    """A scan as ``GET /v1/scans/{id}`` shows it (the dashboard's scan page)."""
    return _out(job_status(db, caller, scan_id, "scan"))


def scan_report(request: Request, caller: Principal, scan_id: str) -> ScanReport:
    """A succeeded scan's report (404/409 like the report route)."""
    return load_report(_result_dir(request, _finished(request, caller, scan_id)) / "report.json")


def _finished(request: Request, caller: Principal, scan_id: str) -> Scan:
    return finished_job(request.app.state.db, caller, scan_id, "scan",
                        "report files and cleaned checkpoint",
                        "its verdict and summary remain in GET /v1/scans/{id}; rescan to get "
                        "them again")


def finished_job(db: Database, caller: Principal, job_id: str, kind: str, outputs: str,
                 again: str) -> Scan:
    """The caller's succeeded job whose ``outputs`` are still kept (409 before it succeeded,
    410 once retention removed them, saying ``again``: how to get them back)."""
    job = owned_job(db, caller, job_id, kind)
    if job.state != "succeeded" or job.result_dir is None:
        raise ConflictError(f"{kind} {job_id} is {job.state}: results exist once it succeeded",
                            details={"state": job.state})
    if job.artifacts_expired_at is not None:
        raise ArtifactsExpiredError(
            f"{kind} {job_id}'s {outputs} were removed on {job.artifacts_expired_at:%Y-%m-%d} "
            f"after the retention period; {again}",
            details={kind: job_id, "artifacts_expired_at": job.artifacts_expired_at.isoformat()})
    return job


def _result_dir(request: Request, scan: Scan) -> Path:
    return job_dir(request.app.state, scan)


def job_dir(state: State, job: Scan) -> Path:
    """Where a succeeded job's outputs are."""
    assert job.result_dir is not None
    return Path(state.settings.data_dir) / job.result_dir


def zipped(folder: Path, reports: tuple[str, ...] = ("report.",)) -> Path:
    """The folder's files but its ``reports`` (name prefixes) as a stored (uncompressed: weights
    do not compress) zip, built once."""
    target = folder.parent / f"{folder.name}.zip"
    if not target.exists():
        tmp = target.with_suffix(".zip.part")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for path in sorted(folder.iterdir()):
                if path.is_file() and not path.name.startswith(reports):
                    zf.write(path, path.name)
        tmp.replace(target)
    return target


def _upload_size(db: Database, caller: Principal, ref: ModelRef) -> int | None:
    """The upload's size (routing), checking it exists and is the caller's; None for hub."""
    if ref.upload is None:
        return None
    with db.session() as s:
        row = s.get(Upload, ref.upload)
    if row is None or row.owner != caller.id:
        raise NotFoundError(f"no upload {ref.upload!r}", details={"upload": ref.upload})
    return row.size


def _out(scan: Scan | Row[Any], response: Response | None = None) -> ScanOut:
    """A scan, or its ``job_status`` columns, as the API shows it."""
    if response is not None:
        response.headers["Location"] = f"/v1/scans/{scan.id}"
        if scan.state not in FINISHED:
            response.headers["Retry-After"] = "2"
    links = {"self": f"/v1/scans/{scan.id}"}
    if scan.state == "succeeded" and scan.artifacts_expired_at is None:
        links |= {"report": f"/v1/scans/{scan.id}/report",
                  "checkpoint": f"/v1/scans/{scan.id}/checkpoint"}
    error = {"code": scan.error_code, "message": scan.error_message} if scan.error_code else None
    return ScanOut(
        id=scan.id, state=scan.state, stage=scan.stage, percent=scan.percent,  # type: ignore[arg-type]
        suspect=scan.suspect, base=scan.base, queue=scan.queue, attempts=scan.attempts,
        created_at=scan.created_at, started_at=scan.started_at, finished_at=scan.finished_at,
        verdict=scan.verdict, severity=scan.severity, cached_from=scan.cached_from,
        error=error, summary=scan.summary, artifacts_expired_at=scan.artifacts_expired_at,
        links=links)
