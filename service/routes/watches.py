"""``/v1/watches``: which Hub repos the webhook scans, against which base, with which options.

Each key manages its own watches (the admin sees all). A watch's secret is stored as a sha256
digest and never shown again; its callback URL is checked like a scan's.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select

from mergeshield.errors import ConfigError, NotFoundError
from service.auth import Principal, principal
from service.hub_events import secret_hash
from service.schemas import HUB_ID, WatchCreate, WatchOut
from worker import callbacks
from worker.db import Database, Watch

router = APIRouter(prefix="/v1/watches", tags=["webhooks"])
Caller = Annotated[Principal, Depends(principal)]
PREFIX = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}(/[A-Za-z0-9_.\-]{0,96})?$"


@router.post("", status_code=201, response_model=WatchOut)
def create(body: WatchCreate, request: Request, caller: Caller) -> WatchOut:
    if not re.match(PREFIX if body.prefix else HUB_ID, body.repo):
        raise ConfigError(f"{body.repo!r} is not a hub repo id" +
                          (" prefix" if body.prefix else " (owner/name)"),
                          details={"repo": body.repo})
    if body.callback_url is not None:
        callbacks.check_url(body.callback_url, request.app.state.settings.callback_allow_private)
    row = Watch(owner=caller.id, repo=body.repo, prefix=body.prefix,
                scan=body.scan.model_dump(mode="json"),
                callback_url=body.callback_url, open_discussion=body.open_discussion,
                secret_hash=secret_hash(body.secret) if body.secret else None,
                rate_limit=body.rate_limit, rate_window=body.rate_window)
    db: Database = request.app.state.db
    with db.session() as s:
        s.add(row)
    return _out(row)


@router.get("", response_model=list[WatchOut])
def list_watches(request: Request, caller: Caller) -> list[WatchOut]:
    db: Database = request.app.state.db
    where = [] if caller.admin else [Watch.owner == caller.id]
    with db.session() as s:
        return [_out(r) for r in s.scalars(select(Watch).where(*where)
                                           .order_by(Watch.created_at)).all()]


@router.get("/{watch_id}", response_model=WatchOut)
def get_watch(watch_id: str, request: Request, caller: Caller) -> WatchOut:
    return _out(_owned(request, caller, watch_id))


@router.delete("/{watch_id}", status_code=204)
def delete(watch_id: str, request: Request, caller: Caller) -> None:
    row = _owned(request, caller, watch_id)
    db: Database = request.app.state.db
    with db.session() as s:
        current = s.get(Watch, row.id)
        if current is not None:
            s.delete(current)


def _owned(request: Request, caller: Principal, watch_id: str) -> Watch:
    db: Database = request.app.state.db
    with db.session() as s:  # a NUL never names a row, and PostgreSQL refuses it in a query
        row = None if "\x00" in watch_id else s.get(Watch, watch_id)
    if row is None or not (caller.admin or row.owner == caller.id):
        raise NotFoundError(f"no watch {watch_id!r}", details={"watch": watch_id})
    return row


def _out(row: Watch) -> WatchOut:
    return WatchOut(id=row.id, repo=row.repo, prefix=row.prefix, scan=row.scan,
                    callback_url=row.callback_url, open_discussion=row.open_discussion,
                    has_secret=row.secret_hash is not None,
                    rate_limit=row.rate_limit, rate_window=row.rate_window,
                    created_at=row.created_at)
