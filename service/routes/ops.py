"""Operations: ``/healthz`` (process), ``/readyz`` (database, broker, a worker), ``/metrics``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select

from service.errors import body
from worker.db import Database, Worker, now

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers (in the event loop: nothing here blocks)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    checks = await run_in_threadpool(_checks, request)
    ok = all(c["ok"] for c in checks.values())
    if ok:
        return JSONResponse({"status": "ready", "checks": checks})
    failed = [k for k, c in checks.items() if not c["ok"]]
    payload = body("not_ready", f"not ready: {', '.join(failed)}", checks)
    return JSONResponse(payload, 503)


def _checks(request: Request) -> dict[str, dict[str, Any]]:
    state = request.app.state
    db: Database = state.db
    out: dict[str, dict[str, Any]] = {}
    try:
        db.ping()
        out["database"] = {"ok": True}
    except Exception as exc:
        out["database"] = {"ok": False, "error": type(exc).__name__}
    try:
        with state.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        out["broker"] = {"ok": True}
    except Exception as exc:
        out["broker"] = {"ok": False, "error": type(exc).__name__}
    try:
        since = now() - timedelta(seconds=state.settings.stale_after)
        with db.session() as s:
            alive = s.scalar(select(func.count()).select_from(Worker)
                             .where(Worker.last_seen > since)) or 0
        out["workers"] = {"ok": alive > 0, "alive": alive}
    except Exception as exc:
        out["workers"] = {"ok": False, "error": type(exc).__name__}
    return out


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
