"""worker/discussions.py: a watch's report as a discussion on the scanned repo, opened through
huggingface_hub against the loopback hub, on the callbacks' schedule."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from mergeshield.settings import Settings
from tests.support.hub import LoopbackHub
from worker import callbacks, discussions
from worker.db import Database, Delivery, Scan, now

SUMMARY = {"verdict": {"status": "backdoor_suspected", "severity": "HIGH",
                       "reasons": ["ASR 0.97 on the white-square trigger drops to 0.08"]}}


@pytest.fixture
def published(hub: LoopbackHub, tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text("{}")
    hub.add_repo("org/suspect", tmp_path)
    return "org/suspect"


def settings(hub: LoopbackHub, token: str | None) -> Settings:
    return Settings.model_validate({"hf_endpoint": hub.url, "hf_token": token,
                                    "callback_backoff": 0.05, "callback_max_attempts": 2})


def scan_with_discussion(db: Database, make_scan: Callable[..., Scan], repo: str,
                         **values: object) -> Delivery:
    scan = make_scan(db, suspect=repo, finished_at=now(), **values)
    row = discussions.delivery(scan)
    with db.session() as s:
        s.add(row)
    return row


def settle(db: Database, cfg: Settings, delivery_id: str) -> Delivery:
    """Run sender passes until the delivery leaves waiting/pending."""
    with httpx.Client() as client:
        for _ in range(100):
            callbacks.dispatch(db, cfg, client)
            with db.session() as s:
                row = s.get(Delivery, delivery_id)
            assert row is not None
            if row.state not in ("waiting", "pending"):
                return row
            time.sleep(0.02)
    raise AssertionError(f"delivery {delivery_id} never settled")


def test_a_succeeded_scan_opens_a_discussion_with_its_verdict(
        db: Database, make_scan: Callable[..., Scan], hub: LoopbackHub, published: str) -> None:
    row = scan_with_discussion(db, make_scan, published, state="succeeded",
                               verdict="backdoor_suspected", severity="HIGH", summary=SUMMARY,
                               request={"scan": {"suspect_revision": "a" * 40}})
    done = settle(db, settings(hub, hub.token), row.id)
    assert done.state == "delivered" and done.attempts == 1
    [opened] = hub.discussions[published]
    assert opened["title"] == "MergeShield scan: backdoor_suspected (HIGH)"
    assert row.scan_id is not None and row.scan_id in opened["description"]
    assert "a" * 40 in opened["description"]
    assert SUMMARY["verdict"]["reasons"][0] in opened["description"]


def test_a_scan_that_did_not_succeed_opens_none(
        db: Database, make_scan: Callable[..., Scan], hub: LoopbackHub, published: str) -> None:
    row = scan_with_discussion(db, make_scan, published, state="failed",
                               error_code="source_not_found", error_message="gone")
    done = settle(db, settings(hub, hub.token), row.id)
    assert done.state == "skipped" and "failed" in (done.reason or "")
    assert published not in hub.discussions


def test_a_refusing_hub_is_retried_then_dead(
        db: Database, make_scan: Callable[..., Scan], hub: LoopbackHub, published: str) -> None:
    row = scan_with_discussion(db, make_scan, published, state="succeeded",
                               verdict="no_backdoor_found", severity="LOW", summary=SUMMARY)
    done = settle(db, settings(hub, None), row.id)  # no token: the hub answers 401
    assert done.state == "dead" and done.attempts == 2 and "401" in (done.reason or "")
    assert published not in hub.discussions
