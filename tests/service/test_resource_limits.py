"""Limits and isolation, against real processes: per-key quotas, the free-disk check, stalled
uploads, per-stage time limits and artifact retention (issue 6).

Two stacks: ``edge`` (the API alone, on both databases: nothing it queues runs, so what is
queued stays queued) and ``scanning`` (API + worker on SQLite, sharing the session's BV_inj
cache, so no scan here builds one)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save

from tests.service.conftest import CLEAN, FAST, SUSPECT, Published, zipped
from tests.support.stack import ADMIN_KEY, BACKENDS, Stack
from tests.support.zoo import Zoo

QUOTA_BYTES = 6000  # one small upload fits, two do not
# a scan that writes a cleaned checkpoint at the least cost, building its own tiny BV_inj when
# the session has none cached yet (run alone, or before test_api)
CHEAP = {"inversion": False, "probes": False, "max_eval": 100, "lambdas": [0.0, 1.0],
         "recipe": {"epochs": 1, "max_train": 128}}
IDLE = 2  # seconds a stalled upload is given


def _weights(seed: int) -> bytes:
    """A valid ~4 KB .safetensors file, different for each seed."""
    return save({"w": torch.full((1000,), float(seed))})


def _hub_scan(n: int) -> dict[str, object]:
    return {"suspect": {"hub": f"zoo/model-{n}"}, "base": {"hub": "zoo/base"}}


@pytest.fixture(scope="module", params=BACKENDS)
def edge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp(f"edge-{request.param}"), request.param, redis_db=12, env={
        "MERGESHIELD_KEY_MAX_ACTIVE_SCANS": "1",
        "MERGESHIELD_KEY_MAX_STORED_BYTES": str(QUOTA_BYTES),
        "MERGESHIELD_UPLOAD_IDLE_TIMEOUT": str(IDLE)})
    try:
        yield s.start_api().wait_up(timeout=900)
    finally:
        s.close()


@pytest.fixture(scope="module")
def edge_user(edge: Stack) -> Iterator[httpx.Client]:
    with edge.client() as admin:
        key = admin.post("/v1/keys", json={"name": "tenant"}).json()["key"]
    with edge.client(key) as c:
        yield c


def _partials(stack: Stack) -> list[Path]:
    """Files of uploads still arriving (each in a private folder, under the sender's name)."""
    return [p for p in (stack.root / "data" / "uploads" / "tmp").rglob("*") if p.is_file()]


def test_concurrent_scans_are_limited_per_key(edge: Stack, edge_user: httpx.Client) -> None:
    first = edge_user.post("/v1/scans", json=_hub_scan(1))
    assert first.status_code == 202, first.text
    over = edge_user.post("/v1/scans", json=_hub_scan(2))
    assert over.status_code == 429 and over.headers["retry-after"]
    error = over.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert "concurrent scans" in error["message"] and "1 scans queued or running" in error[
        "message"] and "may have 1" in error["message"]
    assert error["details"] == {"quota": "active_scans", "limit": 1, "used": 1}
    usage = edge_user.get("/v1/usage").json()
    assert (usage["active_scans"], usage["max_active_scans"], usage["admin"]) == (1, 1, False)
    edge_user.delete(f"/v1/scans/{first.json()['id']}")  # a finished scan frees its place
    assert edge_user.post("/v1/scans", json=_hub_scan(3)).status_code == 202
    with edge.client() as admin:  # the admin key is exempt
        assert [admin.post("/v1/scans", json=_hub_scan(n)).status_code
                for n in (4, 5)] == [202, 202]
        assert admin.get("/v1/usage").json()["max_active_scans"] is None


def test_stored_bytes_are_limited_per_key(edge: Stack, edge_user: httpx.Client) -> None:
    one = edge_user.post("/v1/uploads", files={"file": ("a.safetensors", _weights(1))})
    assert one.status_code == 201, one.text
    size = one.json()["size"]
    two = edge_user.post("/v1/uploads", files={"file": ("b.safetensors", _weights(2))})
    assert two.status_code == 413
    error = two.json()["error"]
    assert error["code"] == "quota_exceeded" and "stored bytes" in error["message"]
    assert f"stores {size} bytes" in error["message"] and str(QUOTA_BYTES) in error["message"]
    assert error["details"]["quota"] == "stored_bytes" and error["details"]["used"] == size
    assert _partials(edge) == []  # refused while it streamed in: its partial file is gone
    assert [u["id"] for u in edge_user.get("/v1/uploads").json()] == [one.json()["id"]]
    usage = edge_user.get("/v1/usage").json()
    assert (usage["stored_bytes"], usage["uploads"], usage["max_stored_bytes"]) == (
        size, 1, QUOTA_BYTES)


def test_a_stalled_upload_is_dropped_with_408_and_its_partial_file_removed(edge: Stack) -> None:
    head = (b'--XX\r\nContent-Disposition: form-data; name="file"; filename="m.safetensors"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n")
    with socket.create_connection(("127.0.0.1", edge.port), timeout=300) as sock:
        sock.sendall(b"POST /v1/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Bearer " + ADMIN_KEY.encode() + b"\r\n"
                     b"Content-Type: multipart/form-data; boundary=XX\r\n"
                     b"Content-Length: 100000\r\n\r\n" + head + b"\0" * 1000)
        deadline = time.monotonic() + 300
        while not _partials(edge) and time.monotonic() < deadline:
            time.sleep(0.05)  # the first bytes reached the disk ...
        assert _partials(edge), "the upload never started"
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)  # ... then nothing more is sent
            if not chunk:
                break
            answer += chunk
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 408"), answer
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout" and f"{IDLE} s" in body["error"]["message"]
    assert _partials(edge) == []
    assert httpx.get(f"{edge.url}/healthz").status_code == 200


def test_an_upload_that_would_fill_the_disk_is_refused_with_507(edge: Stack) -> None:
    edge.kill("api")  # the same API, told to keep more free disk than there is
    edge.env["MERGESHIELD_MIN_FREE_BYTES"] = str(10**18)
    edge.start_api().wait_up(timeout=900)  # generous: a starved machine starts slowly
    with edge.client() as admin:
        before = admin.get("/v1/uploads").json()
        r = admin.post("/v1/uploads", files={"file": ("c.safetensors", _weights(3))})
        assert r.status_code == 507, r.text
        error = r.json()["error"]
        assert error["code"] == "insufficient_storage" and "free disk" in error["message"]
        assert error["details"]["min_free"] == 10**18
        assert admin.get("/v1/uploads").json() == before
    assert _partials(edge) == []


# --- with a worker ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scanning(published: Published, bv_cache_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("scanning"), "sqlite-filesystem", redis_db=13,
              env={"HF_ENDPOINT": published.hub.url, "MERGESHIELD_CACHE_DIR": str(bv_cache_dir)})
    worker_env = {  # trigger inversion alone has a limit; hub downloads find no room
        "MERGESHIELD_STAGE_TIME_LIMITS": json.dumps({"invert_triggers": 0.001}),
        "MERGESHIELD_MIN_FREE_BYTES": str(10**18)}
    try:
        yield s.start_api().start_worker(env=worker_env).wait_ready(timeout=900)
    finally:
        s.close()


@pytest.fixture(scope="module")
def zoo_uploads(scanning: Stack, zoo: Zoo) -> dict[str, str]:
    with scanning.client() as c:
        return {name: c.post("/v1/uploads", files={"file": (f"{name}.zip", zipped(
            zoo.path(name)))}).json()["id"] for name in (SUSPECT, zoo.model(SUSPECT)["base"])}


def _upload_scan(c: httpx.Client, zoo: Zoo, ids: dict[str, str], published: Published,
                 options: dict[str, object]) -> str:
    r = c.post("/v1/scans", json={"suspect": {"upload": ids[SUSPECT]},
                                  "base": {"upload": ids[zoo.model(SUSPECT)["base"]]},
                                  "evaluation": published.dataset, "options": options,
                                  "force": True})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_a_stage_over_its_limit_fails_the_scan_naming_the_stage(
        scanning: Stack, zoo: Zoo, zoo_uploads: dict[str, str], published: Published) -> None:
    with scanning.client() as c:
        scan_id = _upload_scan(c, zoo, zoo_uploads, published,
                               {**CHEAP, "inversion": True, "inversion_steps": 5})
        done = scanning.wait_for(c, scan_id, timeout=900)
    assert done["state"] == "failed" and done["error"]["code"] == "stage_time_limit", done
    assert "'invert_triggers'" in done["error"]["message"]
    assert "0.001 s" in done["error"]["message"]
    assert httpx.get(f"{scanning.url}/readyz").status_code == 200  # the worker lives on


def test_a_hub_download_without_room_fails_the_scan(scanning: Stack, zoo: Zoo,
                                                    published: Published) -> None:
    with scanning.client() as c:
        r = c.post("/v1/scans", json={"suspect": {"hub": f"zoo/{CLEAN}"},
                                      "base": {"hub": f"zoo/{zoo.model(CLEAN)['base']}"},
                                      "evaluation": published.dataset, "options": FAST})
        done = scanning.wait_for(c, r.json()["id"], timeout=900)
    assert done["state"] == "failed", done
    assert done["error"]["code"] == "insufficient_storage", done
    assert f"downloading 'zoo/{CLEAN}'" in done["error"]["message"]


def _cleanup(stack: Stack) -> dict[str, object]:
    """``mergeshield cleanup`` with everything finished or unused already past retention."""
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "cleanup"], cwd=stack.root, check=True,
        capture_output=True, text=True, timeout=900,
        env={**stack.env, "MERGESHIELD_ARTIFACT_RETENTION": "0.001",
             "MERGESHIELD_UPLOAD_RETENTION": "0.001"})
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_retention_expires_artifacts_and_uploads_but_not_what_a_queued_scan_needs(
        scanning: Stack, zoo: Zoo, zoo_uploads: dict[str, str], published: Published) -> None:
    with scanning.client() as c:
        done = scanning.wait_for(c, _upload_scan(c, zoo, zoo_uploads, published, CHEAP),
                                 timeout=900)
        assert done["state"] == "succeeded", done
        assert c.get(f"/v1/scans/{done['id']}/checkpoint").status_code == 200
        spare = c.post("/v1/uploads", files={"file": ("s.safetensors", _weights(4))}).json()
        scanning.kill("worker")  # what is submitted now stays queued
        queued = _upload_scan(c, zoo, zoo_uploads, published, CHEAP)

        cleaned = _cleanup(scanning)
        assert done["id"] in cleaned["expired_scans"]  # type: ignore[operator]
        assert cleaned["removed_uploads"] == [spare["id"]]
        after = c.get(f"/v1/scans/{done['id']}").json()
        assert after["artifacts_expired_at"] and "checkpoint" not in after["links"]
        assert (after["state"], after["verdict"], after["summary"]) == (
            "succeeded", done["verdict"], done["summary"])
        for path in ("checkpoint", "report"):
            gone = c.get(f"/v1/scans/{done['id']}/{path}")
            assert gone.status_code == 410 and gone.json()["error"]["code"] == (
                "artifacts_expired"), gone.text
        assert not (scanning.root / "data" / "scans" / done["id"]).exists()
        assert c.get(f"/v1/uploads/{spare['id']}").status_code == 404
        for upload_id in zoo_uploads.values():  # the queued scan reads them
            assert c.get(f"/v1/uploads/{upload_id}").status_code == 200
        assert c.get(f"/v1/scans/{queued}").json()["state"] == "queued"

        # the API's own loop does the same once the queued scan is gone
        c.delete(f"/v1/scans/{queued}")
        scanning.kill("api")
        scanning.env.update({"MERGESHIELD_CLEANUP_INTERVAL": "0.5",
                             "MERGESHIELD_UPLOAD_RETENTION": "0.001"})
        scanning.start_api().wait_up(timeout=900)
        deadline = time.monotonic() + 600
        while c.get("/v1/uploads").json() and time.monotonic() < deadline:
            time.sleep(0.25)
        assert c.get("/v1/uploads").json() == []
        assert c.get("/v1/usage").json()["stored_bytes"] == 0
