"""``/v1/webhooks``: the Hugging Face Hub's webhook in, and every delivery both ways.

    POST /v1/webhooks/huggingface                 the Hub's event (X-Webhook-Secret, no API key)
    GET  /v1/webhooks/deliveries                  inbound and outbound, newest first, paged
    GET  /v1/webhooks/deliveries/{id}             one, with its headers and payload
    POST /v1/webhooks/deliveries/{id}/redeliver   send a callback again / act on an event again

The Hub's delivery is answered at once: scans are queued, never run, in the request.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import select, update
from starlette.concurrency import run_in_threadpool

from mergeshield.errors import (
    ConflictError,
    InputError,
    MergeShieldError,
    NotFoundError,
    PayloadTooLargeError,
)
from service import hub_events
from service.auth import Principal, verified_caller
from service.paging import Limit, Offset, page
from service.routes.scans import NO_NUL
from service.schemas import DeliveryOut, DeliveryPage
from worker import callbacks
from worker.db import Database, Delivery, Watch, now

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
Caller = Annotated[Principal, Depends(verified_caller)]
MAX_EVENT_BYTES = 1024 * 1024  # the Hub's payloads are a few kB


@router.post("/huggingface", status_code=200, response_model=DeliveryOut,
             responses={202: {"model": DeliveryOut, "description": "scans queued"}})
async def huggingface(request: Request, response: Response) -> DeliveryOut:
    """The Hub's webhook: a new commit on ``main`` of a watched model repo queues its scans
    (202); anything else is recorded and ignored (200). A wrong or missing ``X-Webhook-Secret``
    is refused (401 ``invalid_webhook_secret``), as is everything when no secret is configured
    (403 ``webhooks_disabled``)."""
    raw = b""
    async for chunk in request.stream():  # read up to the limit, never the whole of a flood
        raw += chunk
        if len(raw) > MAX_EVENT_BYTES:
            raise PayloadTooLargeError("a Hub webhook payload is a few kB; this one is too big")
    return await run_in_threadpool(receive, request, response, raw)


def receive(request: Request, response: Response, raw: bytes) -> DeliveryOut:
    """The blocking part (database and broker), run in the thread pool."""
    state = request.app.state
    delivery = Delivery(direction="inbound", state="refused", url=request.url.path,
                        headers=hub_events.recorded_headers(dict(request.headers)))
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        payload = None
    delivery.payload = payload
    delivery.repo = hub_events.repo_name(payload)
    if isinstance(payload, dict) and isinstance(payload.get("event"), dict):
        delivery.event = str(payload["event"].get("scope")).replace("\x00", "")[:64]
    try:
        watches = hub_events.authorize(state, hub_events.matching_watches(state, delivery.repo),
                                       request.headers.get("x-webhook-secret"))
        if payload is None:
            raise InputError("the body is not JSON")
    except MergeShieldError as exc:
        delivery.reason = exc.message
        _save(state.db, delivery)
        raise
    outcome = hub_events.act(state, payload, watches)
    _apply(delivery, outcome, payload)
    _save(state.db, delivery)
    response.status_code = 202 if outcome.state == "accepted" else 200
    return out(delivery, detail=False)


@router.get("/deliveries", response_model=DeliveryPage)
def list_deliveries(request: Request, caller: Caller,
                    direction: Literal["inbound", "outbound"] | None = None,
                    state: str | None = Query(default=None, max_length=16, pattern=NO_NUL),
                    scan: str | None = Query(default=None, max_length=32, pattern=NO_NUL),
                    limit: Limit = 50, offset: Offset = 0) -> DeliveryPage:
    """Newest first; filter by direction, state and scan id. Headers and payloads are left out
    (``GET /v1/webhooks/deliveries/{id}`` has them)."""
    db: Database = request.app.state.db
    where = [] if caller.admin else [Delivery.owner == caller.id]
    if direction:
        where.append(Delivery.direction == direction)
    if state:
        where.append(Delivery.state == state)
    if scan:
        where.append(Delivery.scan_id == scan)
    total, rows = page(db, Delivery, where, Delivery.created_at, limit, offset)
    return DeliveryPage(items=[out(r, detail=False) for r in rows], total=total, limit=limit,
                        offset=offset)


@router.get("/deliveries/{delivery_id}", response_model=DeliveryOut)
def get_delivery(delivery_id: str, request: Request, caller: Caller) -> DeliveryOut:
    return out(_owned(request, caller, delivery_id))


@router.post("/deliveries/{delivery_id}/redeliver", status_code=202, response_model=DeliveryOut)
def redeliver(delivery_id: str, request: Request, caller: Caller) -> DeliveryOut:
    """Outbound (``delivered`` or ``dead``): send the same message (same ``webhook-id``) again,
    from a fresh series of attempts. Inbound (not ``refused``): act on the stored event again
    with the watches it was for (de-duplication still applies)."""
    delivery = _owned(request, caller, delivery_id)
    state = request.app.state
    if delivery.direction == "outbound":
        if not callbacks.redeliver(state.db, delivery.id):
            raise ConflictError(f"delivery {delivery.id} is {delivery.state}: only delivered or "
                                "dead callbacks are sent again", details={"state": delivery.state})
        return out(_owned(request, caller, delivery_id))
    if delivery.state == "refused":
        raise ConflictError("a refused delivery was never authenticated; it is not acted on",
                            details={"state": delivery.state})
    with state.db.session() as s:
        watches = list(s.scalars(select(Watch).where(Watch.id.in_(delivery.watch_ids))).all())
    outcome = hub_events.act(state, delivery.payload, watches)
    _apply(delivery, outcome, delivery.payload)
    with state.db.session() as s:
        s.execute(update(Delivery).where(Delivery.id == delivery.id).values(
            state=delivery.state, reason=delivery.reason, scan_ids=delivery.scan_ids,
            scan_id=delivery.scan_id, attempts=Delivery.attempts + 1, updated_at=now()))
    return out(_owned(request, caller, delivery_id))


# --- helpers

def _apply(delivery: Delivery, outcome: hub_events.Outcome, payload: object) -> None:
    commit = hub_events.commit_of(payload)
    delivery.revision = None if isinstance(commit, str) else commit.sha
    delivery.state, delivery.reason = outcome.state, outcome.reason
    delivery.scan_ids, delivery.watch_ids = outcome.scan_ids, outcome.watch_ids
    delivery.scan_id = outcome.scan_ids[0] if len(outcome.scan_ids) == 1 else None
    delivery.owner = outcome.owner


def _save(db: Database, delivery: Delivery) -> None:
    with db.session() as s:
        s.add(delivery)


def _owned(request: Request, caller: Principal, delivery_id: str) -> Delivery:
    """The delivery, if the caller may see it; 404 otherwise."""
    db: Database = request.app.state.db
    with db.session() as s:  # a NUL never names a row, and PostgreSQL refuses it in a query
        row = None if "\x00" in delivery_id else s.get(Delivery, delivery_id)
    if row is None or not (caller.admin or row.owner == caller.id):
        raise NotFoundError(f"no delivery {delivery_id!r}", details={"delivery": delivery_id})
    return row


def out(row: Delivery, detail: bool = True) -> DeliveryOut:
    links = {"self": f"/v1/webhooks/deliveries/{row.id}"}
    if (row.direction == "outbound" and row.state in ("delivered", "dead")) or \
            (row.direction == "inbound" and row.state != "refused"):
        links["redeliver"] = f"/v1/webhooks/deliveries/{row.id}/redeliver"
    if row.scan_id:  # a merge's callback: "merge:<id>" (worker.callbacks.waiting_delivery)
        kind = "merge" if (row.dedup_key or "").startswith("merge:") else "scan"
        links[kind] = f"/v1/{kind}s/{row.scan_id}"
    return DeliveryOut(
        id=row.id, direction=row.direction, state=row.state,  # type: ignore[arg-type]
        event=row.event, url=row.url, repo=row.repo, revision=row.revision, scan_id=row.scan_id,
        scan_ids=list(row.scan_ids or []), watch_ids=list(row.watch_ids or []),
        endpoint_id=row.endpoint_id, reason=row.reason, attempts=row.attempts,
        next_attempt_at=row.next_attempt_at, last_attempt_at=row.last_attempt_at,
        response_status=row.response_status, created_at=row.created_at,
        updated_at=row.updated_at, headers=dict(row.headers or {}) if detail else None,
        payload=row.payload if detail else None, links=links)
