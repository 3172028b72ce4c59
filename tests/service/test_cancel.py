"""A cancelled running scan stops within seconds and its worker takes the next one (issue 13):
a real ``mergeshield serve`` (API + one worker process, one scan at a time)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.service.conftest import SUSPECT, Published, zipped
from tests.support.stack import Stack
from tests.support.zoo import Zoo

CANCEL_WITHIN = 10.0  # seconds from DELETE to the worker running the next scan


@pytest.fixture(scope="module")
def stack(published: Published, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("cancel"), "sqlite-filesystem",
              env={"HF_ENDPOINT": published.hub.url, "HF_TOKEN": published.hub.token})
    try:
        yield s.serve()
    finally:
        s.close()


def test_a_running_scan_stops_soon_after_delete_and_the_worker_moves_on(
        stack: Stack, zoo: Zoo, published: Published) -> None:
    with stack.client() as client:
        ids = {}
        for name in (SUSPECT, zoo.model(SUSPECT)["base"]):
            r = client.post("/v1/uploads", files={"file": (f"{name}.zip", zipped(zoo.path(name)))})
            assert r.status_code == 201, r.text
            ids[name] = r.json()["id"]
        models = {"suspect": {"upload": ids[SUSPECT]},
                  "base": {"upload": ids[zoo.model(SUSPECT)["base"]]}}
        # a trigger inversion of many minutes, a stage that reports no progress of its own: only
        # the cancellation check between its steps can stop it
        long = client.post("/v1/scans", json={
            **models, "evaluation": published.dataset,
            "options": {"inversion": True, "inversion_steps": 10_000, "probes": False,
                        "max_eval": 200}}).json()
        stack.wait_for(client, long["id"], stage="invert_triggers", timeout=300)
        started = time.monotonic()
        cancelled = client.delete(f"/v1/scans/{long['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        nxt = client.post("/v1/scans", json=models).json()  # no evaluation: a short scan
        moved_on = stack.wait_for(client, nxt["id"], states=("running", "succeeded", "failed"),
                                  timeout=120)
        waited = time.monotonic() - started
        assert waited < CANCEL_WITHIN, f"the worker took the next scan after {waited:.1f} s"
        assert moved_on["state"] in ("running", "succeeded"), moved_on
        assert stack.wait_for(client, nxt["id"])["state"] == "succeeded"
        row = stack.rows()[long["id"]]
        assert (row["state"], row["error_code"]) == ("cancelled", "cancelled")
        assert not (stack.root / "data" / "scans" / long["id"]).exists()  # no partial output
        assert "scan stopped" in stack.logs()
