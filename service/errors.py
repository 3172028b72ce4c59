"""HTTP mapping of the one error tree, done once: every error leaves as
``{"error": {"code", "message", "details"}}`` with a status chosen here, never in a route."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException

from mergeshield import errors
from worker.db import DB_AWAY

log = logging.getLogger("mergeshield.api")

# most specific first: the first class an error is an instance of decides its status
STATUS: list[tuple[type[errors.MergeShieldError], int]] = [
    (errors.AuthenticationError, 401),
    (errors.PermissionDeniedError, 403),
    (errors.NotFoundError, 404),
    (errors.ConflictError, 409),
    (errors.IdempotencyKeyReusedError, 422),
    (errors.PayloadTooLargeError, 413),
    (errors.StorageQuotaError, 413),
    (errors.QuotaExceededError, 429),
    (errors.ArtifactsExpiredError, 410),
    (errors.RequestTimeoutError, 408),
    (errors.ConfigError, 422),
    (errors.InputError, 400),
    (errors.ServiceError, 400),  # a service refusal no class above names: the request's fault
    (errors.HubError, 502),
    (errors.StorageFullError, 507),  # insufficient_storage (under min_free_bytes) included
    (errors.ModelTooLargeError, 413),  # the model is over this server's parameter limit
    (errors.StageTimeLimitError, 504),  # the work ran past its time limit here
    (errors.LimitError, 503),  # too little (GPU) memory on this server for the request now
    (errors.InternalError, 500),  # a bug of ours, the only deliberate 500
    (errors.MergeShieldError, 500),  # a class added to the tree without a status: a test fails
]

# headers that go with a status: how to authenticate, when to try again, that the body was cut
HEADERS: list[tuple[type[errors.MergeShieldError], dict[str, str]]] = [
    (errors.AuthenticationError, {"WWW-Authenticate": "Bearer"}),
    (errors.StorageQuotaError, {}),  # waiting does not free stored bytes: no Retry-After
    (errors.QuotaExceededError, {"Retry-After": "30"}),  # a running scan may finish by then
    (errors.RequestTimeoutError, {"Connection": "close"}),
]


def status_of(exc: errors.MergeShieldError) -> int:
    return next(code for cls, code in STATUS if isinstance(exc, cls))


def body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.MergeShieldError)
    async def _ours(_request: Request, exc: errors.MergeShieldError) -> JSONResponse:
        headers = next((h for cls, h in HEADERS if isinstance(exc, cls)), None)
        return JSONResponse(body(exc.code, exc.message, exc.details), status_of(exc),
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
                   for e in exc.errors()]
        return JSONResponse(body("invalid_request", "the request body or parameters are "
                                 "invalid: see details", details), 422)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error")  # 400: a body FastAPI cannot parse (bad or deep JSON)
        return JSONResponse(body(code, str(exc.detail)), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(DataError)
    async def _unstorable(_request: Request, exc: DataError) -> JSONResponse:
        # a request value the database refuses (PostgreSQL: a NUL in text), whatever route
        log.warning("database refused a request value: %s", str(exc.orig)[:200])
        return JSONResponse(body("invalid_request", "a value in the request cannot be used "
                                 f"({str(exc.orig)[:120]}); remove control characters"), 400)

    async def _db_away(_request: Request, exc: Exception) -> JSONResponse:
        # the database restarts or fails over: say so, and when to try again; not a bug
        log.warning("database unreachable: %s", str(getattr(exc, "orig", exc))[:200])
        return JSONResponse(body("database_unavailable", "the database is unreachable right "
                                 "now; retry in a few seconds"), 503, headers={"Retry-After": "5"})

    for away in DB_AWAY:
        app.add_exception_handler(away, _db_away)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(body("internal_error", "an internal error occurred; it was logged"),
                            500)
