"""Result callbacks: when a scan ends, POST its summary to the scan's callback URL, signed per
Standard Webhooks (``worker.signing``), retried with exponential backoff until it is delivered
or, after ``callback_max_attempts`` tries, ``dead`` (and redeliverable). A watch's discussion on
the scanned repo (``worker.discussions``) rides the same rows and schedule.

Everything lives in the ``deliveries`` table, so a restart loses nothing: the API's sender loop
(``dispatch``, every ``callback_poll_interval``) turns ``waiting`` rows whose scan finished into
``pending`` ones, then claims each due row with a conditional UPDATE that moves its
``next_attempt_at`` forward (a lease), posts it, and records the outcome. Two API processes
never post the same attempt; a process killed mid-post leaves the row due again after the lease.

SSRF: a callback URL must be http(s), and unless ``callback_allow_private`` every address its
host resolves to must be public. The check runs when the URL is registered and again before
each attempt (a DNS answer can change), and redirects are never followed.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from mergeshield import __version__
from mergeshield.errors import CallbackUrlError
from mergeshield.settings import Settings
from worker import discussions, signing
from worker.db import FINISHED, CallbackEndpoint, Database, Delivery, Scan, now

log = logging.getLogger("mergeshield.callbacks")


def check_url(url: str, allow_private: bool) -> None:
    """Refuse a URL that is not http(s), or whose host resolves to a non-public address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackUrlError("a callback URL must be an http:// or https:// URL with a host",
                               details={"url": url})
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise CallbackUrlError(f"cannot resolve the callback host {parts.hostname!r}: {exc}",
                               details={"url": url}) from exc
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_global:
            raise CallbackUrlError(
                f"the callback host resolves to the non-public address {address}; callbacks "
                "to private networks are off (setting callback_allow_private)",
                details={"url": url, "address": str(address)})


def endpoint_for(db: Database, owner: str, url: str, allow_private: bool) -> CallbackEndpoint:
    """The owner's endpoint for ``url``, made with a fresh secret on first use."""
    check_url(url, allow_private)
    with db.session() as s:
        found = s.scalars(select(CallbackEndpoint).where(CallbackEndpoint.owner == owner,
                                                         CallbackEndpoint.url == url)).first()
    if found is not None:
        return found
    row = CallbackEndpoint(owner=owner, url=url, secrets=[signing.new_secret()])
    try:
        with db.session() as s:
            s.add(row)
    except IntegrityError:  # made by a concurrent request a moment ago
        with db.session() as s:
            return s.scalars(select(CallbackEndpoint).where(
                CallbackEndpoint.owner == owner, CallbackEndpoint.url == url)).one()
    return row


def waiting_delivery(scan: Scan, endpoint: CallbackEndpoint) -> Delivery:
    """The outbound row a scan's (or a merge's) callback starts as; add it with the job."""
    return Delivery(owner=scan.owner, direction="outbound", state="waiting", url=endpoint.url,
                    endpoint_id=endpoint.id, scan_id=scan.id, dedup_key=f"{scan.kind}:{scan.id}")


def scan_event(scan: Scan) -> dict[str, Any]:
    """The callback body: Standard Webhooks' ``{type, timestamp, data}`` with the scan's summary
    (a merge's: ``merge.succeeded`` ..., with its base, models and summary)."""
    where = f"/v1/{scan.kind}s/{scan.id}"
    links = {"self": where}
    if scan.state == "succeeded":
        links |= {"report": f"{where}/report", "checkpoint": f"{where}/checkpoint"}
    error = {"code": scan.error_code, "message": scan.error_message} if scan.error_code else None
    if scan.kind == "merge":
        plan = scan.request.get("plan", {})
        return {"type": f"merge.{scan.state}",
                "timestamp": (scan.finished_at or now()).isoformat(),
                "data": {"id": scan.id, "state": scan.state, "base": plan.get("base_model"),
                         "models": [m.get("model") for m in plan.get("models", [])],
                         "verdict": scan.verdict, "summary": scan.summary, "error": error,
                         "links": links}}
    scan_request = scan.request.get("scan", {})
    return {
        "type": f"scan.{scan.state}",
        "timestamp": (scan.finished_at or now()).isoformat(),
        "data": {"id": scan.id, "state": scan.state, "suspect": scan.suspect, "base": scan.base,
                 "suspect_revision": scan_request.get("suspect_revision"),
                 "base_revision": scan_request.get("base_revision"),
                 "verdict": scan.verdict, "severity": scan.severity, "summary": scan.summary,
                 "cached_from": scan.cached_from, "error": error, "links": links},
    }


def backoff(attempts: int, base: float, cap: float) -> float:
    """Seconds to wait after the ``attempts``-th failed try: base, 2 base, 4 base... <= cap."""
    return float(min(cap, base * 2 ** max(0, attempts - 1)))


@dataclass
class Pass:
    promoted: list[str] = field(default_factory=list)
    delivered: list[str] = field(default_factory=list)
    retrying: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)


def dispatch(db: Database, settings: Settings, client: httpx.Client, limit: int = 50) -> Pass:
    """One pass: schedule the callbacks of finished scans, then send every due one."""
    result = Pass(promoted=promote(db))
    t = now()
    with db.session() as s:
        due = s.scalars(select(Delivery.id).where(
            Delivery.direction == "outbound", Delivery.state == "pending",
            Delivery.next_attempt_at <= t).order_by(Delivery.next_attempt_at).limit(limit)).all()
    for delivery_id in due:
        delivery = claim(db, delivery_id, settings.callback_timeout + 30)
        if delivery is None:
            continue
        state = attempt(db, delivery, settings, client)
        {"delivered": result.delivered, "pending": result.retrying,
         "dead": result.dead}[state].append(delivery_id)
    if result.dead or result.retrying:
        log.warning("callbacks failed", extra={"retrying": result.retrying, "dead": result.dead})
    return result


def promote(db: Database) -> list[str]:
    """``waiting`` callbacks whose scan has finished become ``pending``, their body fixed."""
    done: list[str] = []
    with db.session() as s:
        rows = s.execute(select(Delivery, Scan).join(Scan, Scan.id == Delivery.scan_id).where(
            Delivery.state == "waiting", Scan.state.in_(FINISHED))).all()
        for delivery, scan in rows:
            payload = scan_event(scan)
            values: dict[str, Any] = {"state": "pending", "next_attempt_at": now()}
            if discussions.is_discussion(delivery) and scan.state != "succeeded":
                values = {"state": "skipped", "reason": f"the scan {scan.state}: no discussion"}
            changed = s.execute(update(Delivery).where(Delivery.id == delivery.id,
                                                       Delivery.state == "waiting")
                                .values(event=payload["type"], payload=payload, updated_at=now(),
                                        **values))
            if changed.rowcount:  # type: ignore[attr-defined]
                done.append(delivery.id)
    return done


def claim(db: Database, delivery_id: str, lease: float) -> Delivery | None:
    """Take a due delivery for one attempt: its ``next_attempt_at`` moves ``lease`` s ahead."""
    t = now()
    with db.session() as s:
        changed = s.execute(update(Delivery).where(
            Delivery.id == delivery_id, Delivery.state == "pending",
            Delivery.next_attempt_at <= t).values(next_attempt_at=t + timedelta(seconds=lease)))
        if not changed.rowcount:  # type: ignore[attr-defined]
            return None
        return s.get(Delivery, delivery_id)


def attempt(db: Database, delivery: Delivery, settings: Settings, client: httpx.Client) -> str:
    """Post once and record it; returns the new state (delivered, pending or dead)."""
    if discussions.is_discussion(delivery):
        try:
            discussions.post(delivery, settings)
            error = None
        except Exception as exc:  # any refusal or outage of the Hub: retried like a callback
            error = f"{type(exc).__name__}: {exc}"[:1000]
        return _record(db, delivery, settings, None, error)
    with db.session() as s:
        endpoint = s.get(CallbackEndpoint, delivery.endpoint_id)
    body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
    status: int | None = None
    try:
        if endpoint is None:
            raise CallbackUrlError("the callback endpoint was deleted")
        check_url(endpoint.url, settings.callback_allow_private)
        headers = signing.headers(endpoint.secrets, f"msg_{delivery.id}", int(time.time()), body)
        response = client.post(endpoint.url, content=body, timeout=settings.callback_timeout,
                               headers={**headers, "content-type": "application/json",
                                        "user-agent": f"MergeShield/{__version__}"})
        status = response.status_code
        error = None if 200 <= status < 300 else f"the receiver answered {status}"
    except (httpx.HTTPError, CallbackUrlError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:1000]
    return _record(db, delivery, settings, status, error)


def _record(db: Database, delivery: Delivery, settings: Settings, status: int | None,
            error: str | None) -> str:
    """Store one attempt's outcome and schedule the next; returns the new state."""
    attempts = delivery.attempts + 1
    values: dict[str, Any] = {"attempts": attempts, "last_attempt_at": now(), "updated_at": now(),
                              "response_status": status, "reason": error}
    if error is None:
        values |= {"state": "delivered", "next_attempt_at": None}
    elif attempts >= settings.callback_max_attempts:
        values |= {"state": "dead", "next_attempt_at": None}
    else:
        wait = backoff(attempts, settings.callback_backoff, settings.callback_backoff_max)
        values |= {"state": "pending", "next_attempt_at": now() + timedelta(seconds=wait)}
    with db.session() as s:
        s.execute(update(Delivery).where(Delivery.id == delivery.id).values(**values))
    return str(values["state"])


def redeliver(db: Database, delivery_id: str) -> bool:
    """Send an outbound delivery again from its first attempt (delivered or dead ones)."""
    with db.session() as s:
        changed = s.execute(update(Delivery).where(
            Delivery.id == delivery_id, Delivery.direction == "outbound",
            Delivery.state.in_(("delivered", "dead")))
            .values(state="pending", attempts=0, next_attempt_at=now(), updated_at=now(),
                    reason=None))
    return bool(changed.rowcount)  # type: ignore[attr-defined]
