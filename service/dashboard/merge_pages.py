"""The dashboard's merge pages (issue 17): the list, the new-merge form (a plan pasted as YAML or
JSON) and a merge's results: per task, the accuracy of the fine-tune alone, of the undefended
merge and of the defended one; per found trigger its ASR at the same three points; the policy and
the γ chosen; the downloads. They call the same functions as ``/v1/merges`` (``routes.merges``)."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError

from mergeshield.errors import (
    ConflictError,
    IdempotencyKeyReusedError,
    InputError,
    NotFoundError,
    QuotaExceededError,
)
from service.auth import Principal, check_origin, principal
from service.dashboard import forms
from service.dashboard.pages import (
    PER_PAGE,
    STATES,
    _back,
    _offset,
    _page,
    _pages,
    _signin,
    _viewer,
)
from service.routes import merges
from service.routes.scans import cancel_job
from worker.db import new_id

router = APIRouter(prefix="/ui/merges", include_in_schema=False)


@router.get("", response_model=None)
def merge_list(request: Request, state: str = "", page: str | None = None) -> Response:
    caller = _viewer(request)
    if caller is None:
        return _signin(request)
    chosen = state if state in STATES else None
    offset = _offset(page)
    found = merges.merges_page(request.app.state.db, caller, chosen, PER_PAGE, offset)
    query = {"state": chosen} if chosen else {}
    return _page(request, "merges.html", caller, merges=found.items, total=found.total,
                 state=chosen or "", states=STATES, page_query=urlencode(query),
                 api_query=urlencode({**query, "limit": PER_PAGE, "offset": offset}),
                 **_pages(found.total, offset))


@router.get("/new", response_model=None)
def new_merge(request: Request) -> Response:
    caller = _viewer(request)
    if caller is None:
        return _signin(request)
    return _new_merge_page(request, caller, {"device": "auto"})


def _new_merge_page(request: Request, caller: Principal, values: dict[str, str],
                    errors: list[str] | None = None, status: int = 200) -> HTMLResponse:
    return _page(request, "new_merge.html", caller, status, values=values, errors=errors or [],
                 idempotency_key=new_id())


@router.post("", response_model=None)
async def create_merge(request: Request) -> Response:
    caller = principal(request)  # a form post without a valid sign-in is an API error
    check_origin(request)
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    try:
        body = forms.merge_create(form)
    except ValidationError as exc:
        return _new_merge_page(request, caller, form, forms.errors_of(exc), 422)
    try:
        merge = merges.queue_merge(request.app.state, caller, body,
                                   form.get("idempotency_key") or None)
    except (InputError, NotFoundError, IdempotencyKeyReusedError, QuotaExceededError) as exc:
        # a plan the API refuses (invalid_config...), someone else's upload, a full quota
        return _new_merge_page(request, caller, form, [f"{exc.code}: {exc.message}"], 422)
    return _back(f"/ui/merges/{merge.id}")


@router.get("/{merge_id}", response_model=None)
def merge_page(merge_id: str, request: Request) -> Response:
    caller = _viewer(request)
    if caller is None:
        return _signin(request)
    try:
        row = merges.owned(request.app.state.db, caller, merge_id)
    except NotFoundError as exc:
        return _page(request, "error.html", caller, 404, message=exc.message)
    report = merges.plan_report(request.app.state, row)
    return _page(request, "merge.html", caller, merge=merges.merge_out(row, report=report),
                 report=report)


@router.post("/{merge_id}/cancel")
def cancel_merge(merge_id: str, request: Request) -> RedirectResponse:
    caller = principal(request)
    check_origin(request)
    try:
        cancel_job(request.app.state, merges.owned(request.app.state.db, caller, merge_id))
    except ConflictError:
        return _back(f"/ui/merges/{merge_id}", notice="merge-finished")
    return _back(f"/ui/merges/{merge_id}", notice="merge-cancelled")
