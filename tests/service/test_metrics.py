"""``/metrics`` over real HTTP (service/metrics.py): every job metric carries its kind, so a
merge is counted apart from a scan while it waits, runs, succeeds, fails or is cancelled, and its
run time lands in its own histogram. One backend (the embedded default): the counts are SQL that
test_api.py's operations test already reads on both."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.service.conftest import Published
from tests.support.stack import Stack
from tests.support.zoo import Zoo

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
FINISHED = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def stack(published: Published, bv_cache_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("metrics"), "sqlite-filesystem",
               env=published.env(bv_cache_dir)) as s:
        yield s.up()


def scrape(stack: Stack) -> Samples:
    text = httpx.get(f"{stack.url}/metrics", timeout=30).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def wait(client: httpx.Client, url: str, stack: Stack,
         until: Callable[[dict[str, Any]], bool], timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = client.get(url).json()
        if until(body):
            return body
        time.sleep(0.25)
    raise AssertionError(f"{url} still {body} after {timeout} s\n{stack.logs(4000)}")


def finished(body: dict[str, Any]) -> bool:
    return body.get("state") in FINISHED


def test_merges_are_counted_and_timed_apart_from_scans(
        stack: Stack, admin: httpx.Client, plan: dict[str, Any], zoo: Zoo) -> None:
    # a trigger inversion of many minutes holds the one worker while the others queue behind it
    slow = {**plan, "mergeshield": {**plan["mergeshield"], "scan": {
        "inversion": True, "inversion_steps": 10_000, "probes": False, "max_eval": 200}}}
    running = admin.post("/v1/merges", json={"plan": slow}).json()["id"]
    wait(admin, f"/v1/merges/{running}", stack,
         lambda b: "invert_triggers" in (b.get("stage") or ""))
    queued = admin.post("/v1/merges", json={"plan": plan}).json()
    scan = admin.post("/v1/scans", json={"suspect": {"hub": "zoo/no-such-model"},
                                         "base": {"hub": plan["base_model"]}}).json()
    busy = scrape(stack)
    for kind, state, n in (("merge", "running", 1), ("merge", "queued", 1),
                           ("scan", "queued", 1), ("scan", "running", 0),
                           ("merge", "succeeded", 0)):
        assert value(busy, "mergeshield_scans", kind=kind, state=state) == n, (kind, state)
    assert value(busy, "mergeshield_queue_depth", kind="merge", queue=queued["queue"]) == 1
    assert value(busy, "mergeshield_queue_depth", kind="scan", queue=scan["queue"]) == 1

    assert admin.post(f"/v1/merges/{running}/cancel").json()["state"] == "cancelled"
    done = wait(admin, f"/v1/merges/{queued['id']}", stack, finished)
    assert done["state"] == "succeeded", done
    assert wait(admin, f"/v1/scans/{scan['id']}", stack, finished)["state"] == "failed"
    missing = {**plan, "models": [{"model": "zoo/no-such-model"}], "mergeshield": {}}
    failed = admin.post("/v1/merges", json={"plan": missing}).json()["id"]
    assert wait(admin, f"/v1/merges/{failed}", stack, finished)["state"] == "failed"

    after = scrape(stack)
    for kind, counts in (("merge", {"succeeded": 1, "failed": 1, "cancelled": 1}),
                         ("scan", {"failed": 1})):
        for state in ("queued", "running", *FINISHED):
            assert value(after, "mergeshield_scans", kind=kind, state=state) == \
                counts.get(state, 0), (kind, state)
        for queue in ("gpu", "cpu"):
            assert value(after, "mergeshield_queue_depth", kind=kind, queue=queue) == 0
    hist = "mergeshield_scan_duration_seconds"
    for kind, state, n in (("merge", "succeeded", 1), ("merge", "failed", 1),
                           ("scan", "succeeded", 0), ("scan", "failed", 1)):
        assert value(after, f"{hist}_count", kind=kind, state=state) == n, (kind, state)
        assert value(after, f"{hist}_bucket", kind=kind, state=state, le="+Inf") == n
    # the merge's own run time, to the database's precision; a cancelled job is not timed
    took = (datetime.fromisoformat(done["finished_at"])
            - datetime.fromisoformat(done["started_at"])).total_seconds()
    assert value(after, f"{hist}_sum", kind="merge", state="succeeded") == pytest.approx(
        took, abs=1e-3)
    assert not any(labels == frozenset({("kind", "merge"), ("state", "cancelled")})
                   for name, labels in after if name == f"{hist}_count")


def test_requests_are_timed_by_route_template_and_status(in_process: TestClient) -> None:
    """``RequestTimer``: one observation per request, under the route's template (not the
    path, so ids do not make series), its method and the status it answered with."""
    registry = in_process.app.state.registry

    def count(method: str, route: str, status: str) -> float:
        return registry.get_sample_value("mergeshield_http_request_seconds_count",
                                         {"method": method, "route": route,
                                          "status": status}) or 0.0

    before = {k: count(*k) for k in (("GET", "/healthz", "200"),
                                      ("GET", "/v1/scans/{scan_id}", "404"),
                                      ("GET", "unmatched", "404"),
                                      ("GET", "/v1/scans", "401"))}
    for _ in range(3):
        assert in_process.get("/healthz").status_code == 200
    assert in_process.get("/v1/scans/0123").status_code == 404
    assert in_process.get("/v1/scans/4567").status_code == 404
    assert in_process.get("/no/such/page").status_code == 404
    assert in_process.get("/v1/scans", headers={"Authorization": "Bearer nope"}
                          ).status_code == 401
    assert {k: count(*k) - v for k, v in before.items()} == {
        ("GET", "/healthz", "200"): 3, ("GET", "/v1/scans/{scan_id}", "404"): 2,
        ("GET", "unmatched", "404"): 1, ("GET", "/v1/scans", "401"): 1}
