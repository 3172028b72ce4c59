"""``/v1/webhooks/endpoints``: where result callbacks go, and the secrets that sign them.

A scan's ``callback_url`` makes its endpoint on first use; register it here first to learn the
secret before the first callback arrives. Rotation without downtime: ``rotate`` puts a new
secret first and keeps the previous one, and every callback carries a signature by each, so a
receiver verifies with either while it moves to the new one; the next rotation (or
``keep_previous: false``) drops the old one.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select

from mergeshield.errors import NotFoundError
from service.auth import Principal, verified_caller
from service.schemas import EndpointCreate, EndpointOut, EndpointRotate
from worker import callbacks, signing
from worker.db import CallbackEndpoint, Database, now

router = APIRouter(prefix="/v1/webhooks/endpoints", tags=["webhooks"])
Caller = Annotated[Principal, Depends(verified_caller)]


@router.post("", status_code=201, response_model=EndpointOut)
def create(body: EndpointCreate, request: Request, caller: Caller) -> EndpointOut:
    """Register a callback URL (the same URL again returns its endpoint), with its secrets."""
    settings = request.app.state.settings
    row = callbacks.endpoint_for(request.app.state.db, caller.id, body.url,
                                 settings.callback_allow_private)
    return _out(row, secrets=True)


@router.get("", response_model=list[EndpointOut])
def list_endpoints(request: Request, caller: Caller) -> list[EndpointOut]:
    db: Database = request.app.state.db
    where = [] if caller.admin else [CallbackEndpoint.owner == caller.id]
    with db.session() as s:
        rows = s.scalars(select(CallbackEndpoint).where(*where)
                         .order_by(CallbackEndpoint.created_at)).all()
    return [_out(r) for r in rows]


@router.get("/{endpoint_id}", response_model=EndpointOut)
def get_endpoint(endpoint_id: str, request: Request, caller: Caller) -> EndpointOut:
    return _out(_owned(request, caller, endpoint_id), secrets=True)


@router.post("/{endpoint_id}/rotate", response_model=EndpointOut)
def rotate(endpoint_id: str, request: Request, caller: Caller,
           body: EndpointRotate | None = None) -> EndpointOut:
    """A new secret signs from now on; the previous one too, unless ``keep_previous`` is false."""
    row = _owned(request, caller, endpoint_id)
    keep = (body or EndpointRotate()).keep_previous
    fresh = [signing.new_secret(), *row.secrets[:1]] if keep else [signing.new_secret()]
    db: Database = request.app.state.db
    with db.session() as s:
        current = s.get(CallbackEndpoint, row.id)
        assert current is not None
        current.secrets, current.rotated_at = fresh, now()
    return _out(_owned(request, caller, endpoint_id), secrets=True)


def _owned(request: Request, caller: Principal, endpoint_id: str) -> CallbackEndpoint:
    db: Database = request.app.state.db
    with db.session() as s:  # a NUL never names a row, and PostgreSQL refuses it in a query
        row = None if "\x00" in endpoint_id else s.get(CallbackEndpoint, endpoint_id)
    if row is None or not (caller.admin or row.owner == caller.id):
        raise NotFoundError(f"no callback endpoint {endpoint_id!r}",
                            details={"endpoint": endpoint_id})
    return row


def _out(row: CallbackEndpoint, secrets: bool = False) -> EndpointOut:
    return EndpointOut(id=row.id, url=row.url, created_at=row.created_at,
                       rotated_at=row.rotated_at, secrets=list(row.secrets) if secrets else None)
