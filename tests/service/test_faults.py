"""Faults, with real processes: nothing a crash, a restart or a forgetful broker does loses a
scan. The database is the truth; the reconciler makes the broker agree with it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.service.conftest import FAST, SUSPECT, Published, zipped
from tests.support.stack import BACKENDS, Stack
from tests.support.zoo import Zoo

SLOW = {"inversion": True, "inversion_steps": 120, "max_eval": 1000}  # long enough to kill


@pytest.fixture(params=BACKENDS)
def stack(request: pytest.FixtureRequest, published: Published, bv_cache_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp(request.param), request.param, redis_db=10,
              env={"HF_ENDPOINT": published.hub.url, "MERGESHIELD_CACHE_DIR": str(bv_cache_dir)})
    try:
        yield s.start_api().wait_up()
    finally:
        s.close()


def _submit(client: httpx.Client, zoo: Zoo, published: Published, options: dict[str, object],
            ) -> str:
    ids = [client.post("/v1/uploads", files={"file": (f"{n}.zip", zipped(zoo.path(n)))}).json()
           ["id"] for n in (SUSPECT, zoo.model(SUSPECT)["base"])]
    r = client.post("/v1/scans", json={"suspect": {"upload": ids[0]}, "base": {"upload": ids[1]},
                                       "evaluation": published.dataset, "options": options,
                                       "force": True})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_killed_worker_scan_finishes_after_a_restart(stack: Stack, zoo: Zoo,
                                                     published: Published) -> None:
    stack.start_worker("w1").wait_ready()
    with stack.client() as c:
        scan_id = _submit(c, zoo, published, SLOW)
        stack.wait_for(c, scan_id, stage="invert_triggers", timeout=120)
        stack.kill("w1")  # kill -9 of the worker and its pool, mid-scan
        assert c.get(f"/v1/scans/{scan_id}").json()["state"] == "running"
        stack.start_worker("w2")
        # run alone (no BV_inj cached by test_api yet) w2 also builds BV_inj: minutes under load
        done = stack.wait_for(c, scan_id, timeout=600)
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 2 and done["verdict"] == "backdoor_suspected"


def test_api_restart_keeps_history(stack: Stack, zoo: Zoo, published: Published) -> None:
    stack.start_worker().wait_ready()
    with stack.client() as c:
        scan_id = _submit(c, zoo, published, FAST)
        done = stack.wait_for(c, scan_id)
        before = c.get("/v1/scans").json()
    stack.kill("api")
    stack.start_api().wait_ready()
    with stack.client() as c:
        assert c.get("/v1/scans").json() == before
        assert c.get(f"/v1/scans/{scan_id}").json() == done
        assert c.get(f"/v1/scans/{scan_id}/report").json()["scan_id"] == scan_id


@pytest.mark.parametrize("stack", ["sqlite-filesystem"], indirect=True)  # Celery's own limit
def test_scan_over_its_time_limit_fails_with_the_reason(stack: Stack, zoo: Zoo,
                                                        published: Published) -> None:
    stack.start_worker(env={"MERGESHIELD_SCAN_SOFT_TIME_LIMIT": "3",
                            "MERGESHIELD_SCAN_HARD_TIME_LIMIT": "60"}).wait_ready()
    with stack.client() as c:
        done = stack.wait_for(c, _submit(c, zoo, published, SLOW))
        assert done["state"] == "failed" and done["error"]["code"] == "time_limit", done
        assert "3 s" in done["error"]["message"]
        assert httpx.get(f"{stack.url}/readyz").status_code == 200  # the worker lives on


def test_flushed_redis_scan_is_reenqueued(published: Published, zoo: Zoo,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    stack = Stack(tmp_path_factory.mktemp("flush"), "postgres-redis", redis_db=10,
                  env={"HF_ENDPOINT": published.hub.url})
    try:
        stack.start_api().wait_up()
        with stack.client() as c:
            scan_id = _submit(c, zoo, published, FAST)  # no worker yet: it waits in Redis
            r = redis.Redis.from_url(stack.redis_url or "")
            assert any(r.llen(q) for q in ("gpu", "cpu"))
            r.flushdb()  # Redis restarted, keeping nothing
            stack.start_worker()
            done = stack.wait_for(c, scan_id, timeout=240)
        assert done["state"] == "succeeded", done
        assert '"resent": ["' + scan_id in stack.logs()
    finally:
        stack.close()
