"""The dashboard's pages. Each one calls the function behind a REST route (so the pages and the
API can never disagree about who may see what) and renders the answer; forms post here and are
answered with a redirect. Authentication: see ``service.auth`` and docs/decisions.md."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from mergeshield.data import bundled_names
from mergeshield.errors import (
    AuthenticationError,
    ConflictError,
    IdempotencyKeyReusedError,
    InputError,
    NotFoundError,
)
from mergeshield.report.html import sections
from service.auth import COOKIE, Principal, authenticate, check_origin, principal
from service.dashboard import forms
from service.routes import bv_cache, scans, uploads, webhooks
from worker.db import new_id

HERE = Path(__file__).parent
PER_PAGE = 20
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
VERDICTS = ("backdoor_suspected", "no_backdoor_found", "inconclusive")
# scripts and styles only from here; report images are data: URIs; no framing, no other forms
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
NOTICES = {"cancelled": "The scan was cancelled.", "finished": "The scan had already finished.",
           "redelivered": "Delivery queued again.", "not-redeliverable":
           "That delivery cannot be sent again in its current state.",
           "merge-cancelled": "The merge was cancelled.",
           "merge-finished": "The merge had already finished."}

router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["when"] = lambda d: (d.strftime("%Y-%m-%d %H:%M:%S UTC")
                                           if isinstance(d, datetime) else d or "—")


def install(app: FastAPI) -> None:
    """Mount the pages and their static files; ``/`` leads to the scan list."""
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.include_router(router)

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/ui/", 307)


# --- helpers

def _viewer(request: Request) -> Principal | None:
    try:
        return principal(request)
    except AuthenticationError:
        return None


def _signin(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse("/ui/signin?" + urlencode({"next": target}), 303)


def _page(request: Request, name: str, caller: Principal | None, status: int = 200,
          **context: Any) -> HTMLResponse:
    notice = NOTICES.get(request.query_params.get("notice", ""))
    response = templates.TemplateResponse(request, name, {
        "caller": caller, "auth": not request.app.state.settings.auth_disabled,
        "notice": notice, **context}, status_code=status)
    response.headers.update({"Content-Security-Policy": CSP, "Cache-Control": "no-store",
                             "X-Content-Type-Options": "nosniff",
                             "Referrer-Policy": "same-origin"})
    return response


def _back(url: str, **query: str) -> RedirectResponse:
    return RedirectResponse(url + (f"?{urlencode(query)}" if query else ""), 303)


def _names(request: Request, caller: Principal, labels: list[str]) -> dict[str, str]:
    """Upload labels (``upload:<id>``) → the uploaded file's name, for the caller's uploads."""
    out = {}
    for label in set(labels):
        if label.startswith("upload:"):
            try:
                out[label] = uploads.get_upload(label[len("upload:"):], request, caller).filename
            except NotFoundError:  # another key's upload (the admin sees every scan): keep the id
                pass
    return out


def _pages(total: int, offset: int) -> dict[str, int]:
    return {"page": offset // PER_PAGE + 1, "pages": max(1, math.ceil(total / PER_PAGE)),
            "per_page": PER_PAGE}


def _offset(page: str | None) -> int:
    return (max(int(page), 1) - 1) * PER_PAGE if page and page.isdigit() else 0


# --- signing in

@router.get("/signin", response_model=None)
def signin_form(request: Request, next: str = "/ui/") -> Response:
    if request.app.state.settings.auth_disabled:
        return RedirectResponse("/ui/", 303)
    return _page(request, "signin.html", None, next=next)


@router.post("/signin", response_model=None)
def signin(request: Request, key: Annotated[str, Form(max_length=200)],
           next: Annotated[str, Form(max_length=2000)] = "/ui/") -> Response:
    check_origin(request)
    try:
        authenticate(request, key.strip())
    except AuthenticationError as exc:
        return _page(request, "signin.html", None, 401, next=next, error=exc.message)
    safe_next = next if next.startswith("/ui/") and not next.startswith("//") else "/ui/"
    response = RedirectResponse(safe_next, 303)
    response.set_cookie(COOKIE, key.strip(), httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return response


@router.post("/signout")
def signout(request: Request) -> RedirectResponse:
    check_origin(request)
    response = RedirectResponse("/ui/signin", 303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


# --- scans

@router.get("/", response_model=None)
def scan_list(request: Request, state: str = "", verdict: str = "", suspect: str = "",
              page: str | None = None) -> Response:
    caller = _viewer(request)
    if caller is None:
        return _signin(request)
    filters = {"state": state if state in STATES else None,
               "verdict": verdict if verdict in VERDICTS else None,
               "suspect": suspect.strip()[:300] or None}
    offset = _offset(page)
    found = scans.list_scans(request, caller, state=filters["state"],  # type: ignore[arg-type]
                             verdict=filters["verdict"], suspect=filters["suspect"],
                             limit=PER_PAGE, offset=offset)
    query = {k: v for k, v in filters.items() if v}
    names = _names(request, caller, [x for s in found.items for x in (s.suspect, s.base)])
    return _page(request, "scans.html", caller, scans=found.items, total=found.total, names=names,
                 filters=filters, states=STATES, verdicts=VERDICTS,
                 api_query=urlencode({**query, "limit": PER_PAGE, "offset": offset}),
                 page_query=urlencode(query), **_pages(found.total, offset))


@router.get("/scans/new", response_model=None)
def new_scan(request: Request) -> Response:
    caller = _viewer(request)
    if caller is None:
        return _signin(request)
    return _new_scan_page(request, caller, forms.defaults())


def _new_scan_page(request: Request, caller: Principal, values: dict[str, str],
                   errors: list[str] | None = None, status: int = 200) -> HTMLResponse:
    return _page(request, "new_scan.html", caller, status, values=values, errors=errors or [],
                 datasets=bundled_names(), idempotency_key=new_id())


@router.post("/scans", response_model=None)
async def create_scan(request: Request) -> Response:
    caller = principal(request)  # a form post without a valid sign-in is an API error
    check_origin(request)
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    try:
        body = forms.scan_create(form)
    except ValidationError as exc:
        return _new_scan_page(request, caller, form, forms.errors_of(exc), 422)
    try:
        scan, _new = scans.queue_scan(request.app.state, caller, body,
                                      form.get("idempotency_key") or None)
    except (InputError, NotFoundError, IdempotencyKeyReusedError) as exc:  # a refused
        # callback URL, someone else's upload, a form sent again after an edit
        return _new_scan_page(request, caller, form, [exc.message], 422)
    return _back(f"/ui/scans/{scan.id}")


@router.get("/scans/{scan_id}", response_model=None)
def scan_page(scan_id: str, request: Request) -> Response:
    caller = _viewer(request)
    if caller is None:
        return _signin(request)
    try:
        scan = scans.scan_status(request.app.state.db, caller, scan_id)
    except NotFoundError as exc:
        return _page(request, "error.html", caller, 404, message=exc.message)
    report = scans.scan_report(request, caller, scan_id) \
        if scan.state == "succeeded" and scan.artifacts_expired_at is None else None
    return _page(request, "scan.html", caller, scan=scan, report=report,
                 names=_names(request, caller, [scan.suspect, scan.base]),
                 parts=sections(report) if report else {})


@router.post("/scans/{scan_id}/cancel")
def cancel_scan(scan_id: str, request: Request) -> RedirectResponse:
    caller = principal(request)
    check_origin(request)
    try:
        scans.cancel(scan_id, request, Response(), caller)
    except ConflictError:
        return _back(f"/ui/scans/{scan_id}", notice="finished")
    return _back(f"/ui/scans/{scan_id}", notice="cancelled")


@router.post("/scans/{scan_id}/rescan")
def rescan(scan_id: str, request: Request) -> RedirectResponse:
    caller = principal(request)
    check_origin(request)
    again = scans.rescan(scan_id, request, Response(), caller)
    return _back(f"/ui/scans/{again.id}")


# --- the injection-BV cache and webhook deliveries

@router.get("/bv-cache", response_model=None)
def cache_page(request: Request) -> Response:
    caller = _viewer(request)
    if caller is None:
        return _signin(request)
    entries = bv_cache.entries(request) if caller.admin else []
    return _page(request, "bv_cache.html", caller, entries=entries)


@router.get("/webhooks", response_model=None)
def deliveries_page(request: Request, direction: str = "", state: str = "",
                    page: str | None = None) -> Response:
    caller = _viewer(request)
    if caller is None:
        return _signin(request)
    chosen = direction if direction in ("inbound", "outbound") else None
    offset = _offset(page)
    found = webhooks.list_deliveries(request, caller, direction=chosen,  # type: ignore[arg-type]
                                     state=state.strip()[:16] or None, scan=None,
                                     limit=PER_PAGE, offset=offset)
    query = {k: v for k, v in (("direction", chosen), ("state", state.strip()[:16])) if v}
    return _page(request, "webhooks.html", caller, deliveries=found.items, total=found.total,
                 direction=chosen or "", state=state.strip()[:16], page_query=urlencode(query),
                 **_pages(found.total, offset))


@router.post("/webhooks/{delivery_id}/redeliver")
def redeliver(delivery_id: str, request: Request) -> RedirectResponse:
    caller = principal(request)
    check_origin(request)
    try:
        webhooks.redeliver(delivery_id, request, caller)
    except ConflictError:
        return _back("/ui/webhooks", notice="not-redeliverable")
    return _back("/ui/webhooks", notice="redelivered")
