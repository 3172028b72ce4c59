"""worker/callbacks.py: result callbacks on a real database (SQLite and PostgreSQL), posted to a
real receiver on loopback that checks the Standard Webhooks signature itself."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import update

from mergeshield.errors import CallbackUrlError
from mergeshield.settings import Settings
from tests.support.receiver import Receiver
from worker import callbacks
from worker.db import CallbackEndpoint, Database, Delivery, Scan, now

FAST = {"callback_backoff": 0.05, "callback_backoff_max": 1.0, "callback_max_attempts": 3,
        "callback_timeout": 5.0, "callback_allow_private": True}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rx = Receiver().start()
    try:
        yield rx
    finally:
        rx.stop()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(follow_redirects=False) as c:
        yield c


def settings(**values: object) -> Settings:
    return Settings.model_validate({**FAST, **values})


def finished_scan_with_callback(db: Database, make_scan: Callable[..., Scan],
                                url: str) -> tuple[Scan, Delivery, CallbackEndpoint]:
    endpoint = callbacks.endpoint_for(db, "alice", url, allow_private=True)
    scan = make_scan(db, state="succeeded", finished_at=now(), verdict="backdoor_suspected",
                     severity="HIGH", summary={"findings": 2})
    with db.session() as s:
        delivery = callbacks.waiting_delivery(scan, endpoint)
        s.add(delivery)
    return scan, delivery, endpoint


def state_of(db: Database, delivery_id: str) -> Delivery:
    with db.session() as s:
        row = s.get(Delivery, delivery_id)
    assert row is not None
    return row


def drive(db: Database, cfg: Settings, client: httpx.Client, delivery_id: str,
          until: tuple[str, ...], timeout: float = 10) -> Delivery:
    """Run sender passes (as the API's loop does) until the delivery reaches ``until``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        callbacks.dispatch(db, cfg, client)
        if (row := state_of(db, delivery_id)).state in until:
            return row
        time.sleep(0.02)
    raise AssertionError(f"delivery {delivery_id} still {state_of(db, delivery_id).state}")


def test_a_finished_scan_is_posted_signed_after_retries(
        db: Database, make_scan: Callable[..., Scan], receiver: Receiver,
        client: httpx.Client) -> None:
    url = receiver.expect("ci", secrets=[], fail_first=2)
    scan, delivery, endpoint = finished_scan_with_callback(db, make_scan, url)
    receiver.routes["/ci"].secrets = endpoint.secrets
    done = drive(db, settings(), client, delivery.id, ("delivered", "dead"))
    assert done.state == "delivered" and done.attempts == 3 and done.response_status == 204
    got = receiver.delivered("ci")
    assert len(got) == 1 and [r.verdict for r in receiver.received] == [
        "failing on purpose", "failing on purpose", "ok"]
    assert {r.headers["webhook-id"] for r in receiver.received} == {f"msg_{delivery.id}"}
    body = json.loads(got[0].body)
    assert body["type"] == "scan.succeeded" and body["data"]["id"] == scan.id
    assert body["data"]["verdict"] == "backdoor_suspected"
    assert body["data"]["links"]["report"] == f"/v1/scans/{scan.id}/report"


def test_a_running_scan_waits_and_a_failed_one_reports_its_error(
        db: Database, make_scan: Callable[..., Scan], receiver: Receiver,
        client: httpx.Client) -> None:
    url = receiver.expect("ci", secrets=[])
    endpoint = callbacks.endpoint_for(db, "alice", url, allow_private=True)
    receiver.routes["/ci"].secrets = endpoint.secrets
    scan = make_scan(db, state="running")
    with db.session() as s:
        delivery = callbacks.waiting_delivery(scan, endpoint)
        s.add(delivery)
    assert callbacks.dispatch(db, settings(), client).promoted == []
    assert state_of(db, delivery.id).state == "waiting" and receiver.received == []
    with db.session() as s:
        s.execute(update(Scan).where(Scan.id == scan.id).values(
            state="failed", finished_at=now(), error_code="source_not_found",
            error_message="no such repo"))
    done = drive(db, settings(), client, delivery.id, ("delivered",))
    assert done.event == "scan.failed"
    data = json.loads(receiver.delivered("ci")[0].body)["data"]
    assert data["error"] == {"code": "source_not_found", "message": "no such repo"}


def test_last_failure_is_dead_then_redeliver_sends_it_again(
        db: Database, make_scan: Callable[..., Scan], receiver: Receiver,
        client: httpx.Client) -> None:
    url = receiver.expect("down", secrets=[], fail_always=True)
    _scan, delivery, endpoint = finished_scan_with_callback(db, make_scan, url)
    receiver.routes["/down"].secrets = endpoint.secrets
    dead = drive(db, settings(), client, delivery.id, ("dead",))
    assert dead.attempts == 3 and dead.response_status == 500 and dead.next_attempt_at is None
    assert "answered 500" in (dead.reason or "")
    assert callbacks.dispatch(db, settings(), client).delivered == []  # dead stays dead
    receiver.routes["/down"].fail_always = False
    assert callbacks.redeliver(db, delivery.id)
    done = drive(db, settings(), client, delivery.id, ("delivered",))
    assert done.attempts == 1 and len(receiver.delivered("down")) == 1
    assert not callbacks.redeliver(db, "0" * 32)


def test_attempts_survive_a_restart_of_the_sender(
        db: Database, make_scan: Callable[..., Scan], receiver: Receiver,
        client: httpx.Client) -> None:
    """Everything is in the database: a new process (a new engine) takes over the schedule."""
    url = receiver.expect("ci", secrets=[], fail_first=1)
    _scan, delivery, endpoint = finished_scan_with_callback(db, make_scan, url)
    receiver.routes["/ci"].secrets = endpoint.secrets
    callbacks.dispatch(db, settings(callback_backoff=30.0, callback_backoff_max=60.0), client)
    first = state_of(db, delivery.id)
    assert first.state == "pending" and first.attempts == 1 and first.next_attempt_at is not None
    assert first.next_attempt_at > now() + timedelta(seconds=20)  # backoff is persisted
    restarted = Database(db.url)
    try:
        assert callbacks.dispatch(restarted, settings(), client).delivered == []  # not yet due
        with restarted.session() as s:  # time passes
            s.execute(update(Delivery).where(Delivery.id == delivery.id)
                      .values(next_attempt_at=now()))
        done = drive(restarted, settings(), client, delivery.id, ("delivered",))
        assert done.attempts == 2
    finally:
        restarted.dispose()


def test_a_due_delivery_is_claimed_once(db: Database,
                                        make_scan: Callable[..., Scan]) -> None:
    _scan, delivery, _endpoint = finished_scan_with_callback(db, make_scan, "http://127.0.0.1:9")
    callbacks.promote(db)
    assert callbacks.claim(db, delivery.id, lease=60) is not None
    assert callbacks.claim(db, delivery.id, lease=60) is None  # leased to the first sender


def test_a_rotated_endpoint_signs_with_both_secrets(
        db: Database, make_scan: Callable[..., Scan], receiver: Receiver,
        client: httpx.Client) -> None:
    url = receiver.expect("old", secrets=[])
    _scan, delivery, endpoint = finished_scan_with_callback(db, make_scan, url)
    old = endpoint.secrets[0]
    new = "whsec_" + "QUJD" * 8
    with db.session() as s:
        s.execute(update(CallbackEndpoint).where(CallbackEndpoint.id == endpoint.id)
                  .values(secrets=[new, old]))
    receiver.routes["/old"].secrets = [old]  # a receiver that has not switched yet
    drive(db, settings(), client, delivery.id, ("delivered",))
    signatures = receiver.delivered("old")[0].headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    receiver.routes["/old"].secrets = [new]  # ...and one that has
    assert callbacks.redeliver(db, delivery.id)
    drive(db, settings(), client, delivery.id, ("delivered",))
    assert len(receiver.delivered("old")) == 2


def test_a_replayed_delivery_is_refused_by_the_receiver(
        db: Database, make_scan: Callable[..., Scan], receiver: Receiver,
        client: httpx.Client) -> None:
    url = receiver.expect("ci", secrets=[])
    _scan, delivery, endpoint = finished_scan_with_callback(db, make_scan, url)
    receiver.routes["/ci"].secrets = endpoint.secrets
    drive(db, settings(), client, delivery.id, ("delivered",))
    captured = receiver.delivered("ci")[0]
    signed = {k: v for k, v in captured.headers.items() if k.startswith("webhook-")}
    receiver.skew = 301  # the same bytes, sent again five minutes later
    again = client.post(url, content=captured.body, headers=signed)
    assert again.status_code == 400 and receiver.received[-1].verdict == "replay"
    receiver.skew = 0
    forged = client.post(url, content=captured.body + b" ", headers=signed)
    assert forged.status_code == 401 and receiver.received[-1].verdict == "bad signature"


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [callbacks.backoff(n, 10, 60) for n in range(1, 6)] == [10, 20, 40, 60, 60]


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "http:///path",
                                 "http://127.0.0.1:8000/x", "http://localhost/x",
                                 "http://10.1.2.3/x", "http://169.254.169.254/latest/meta-data",
                                 "http://[::1]/x", "https://no-such-host.invalid/x"])
def test_callback_urls_off_the_public_internet_are_refused(url: str) -> None:
    with pytest.raises(CallbackUrlError):
        callbacks.check_url(url, allow_private=False)


def test_private_addresses_are_allowed_only_by_the_setting() -> None:
    callbacks.check_url("http://127.0.0.1:8000/x", allow_private=True)
    with pytest.raises(CallbackUrlError, match="http"):
        callbacks.check_url("gopher://127.0.0.1/x", allow_private=True)


def test_a_url_resolving_to_a_private_address_at_send_time_is_not_posted(
        db: Database, make_scan: Callable[..., Scan], client: httpx.Client) -> None:
    """The check runs again before each attempt: a DNS answer may have changed since."""
    _scan, delivery, _endpoint = finished_scan_with_callback(db, make_scan,
                                                             "http://127.0.0.1:9/x")
    done = drive(db, settings(callback_allow_private=False, callback_max_attempts=1), client,
                 delivery.id, ("dead",))
    assert done.response_status is None and "non-public address" in (done.reason or "")
