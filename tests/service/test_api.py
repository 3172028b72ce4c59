"""The API end to end, against real processes: ``mergeshield serve --auth`` on the embedded
default (SQLite + filesystem broker), and ``api`` + ``worker`` on PostgreSQL + Redis. The same
tests run on both."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from html import escape
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.conftest import CLEAN, CLEANING, FAST, SUSPECT, Published, zipped
from tests.support.stack import BACKENDS, Stack
from tests.support.zoo import Zoo, independent_asr


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request: pytest.FixtureRequest, published: Published, bv_cache_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp(request.param), request.param,
               env=published.env(bv_cache_dir)) as s:
        yield s.up()


@pytest.fixture(scope="module")
def user(stack: Stack, admin: httpx.Client) -> Iterator[httpx.Client]:
    """A non-admin key made through the API."""
    key = admin.post("/v1/keys", json={"name": "ci"}).json()["key"]
    with stack.client(key) as c:
        yield c


def _upload(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return client.post("/v1/uploads", files={"file": (name, data)})


@pytest.fixture(scope="module")
def uploads(user: httpx.Client, zoo: Zoo) -> dict[str, str]:
    ids = {}
    for name in (SUSPECT, zoo.model(SUSPECT)["base"]):
        r = _upload(user, f"{name}.zip", zipped(zoo.path(name)))
        assert r.status_code == 201, r.text
        ids[name] = r.json()["id"]
    return ids


@pytest.fixture(scope="module")
def finished(stack: Stack, user: httpx.Client, uploads: dict[str, str], zoo: Zoo,
             published: Published) -> dict[str, Any]:
    """The round trip's scan: uploaded backdoored model + base, evaluated on hub data."""
    r = user.post("/v1/scans", json={
        "suspect": {"upload": uploads[SUSPECT]},
        "base": {"upload": uploads[zoo.model(SUSPECT)["base"]]},
        "evaluation": published.dataset, "options": CLEANING})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/scans/{r.json()['id']}"
    assert r.headers["retry-after"]
    return stack.wait_for(user, r.json()["id"])


def test_round_trip_upload_scan_download_lowers_the_backdoor(
        finished: dict[str, Any], user: httpx.Client, zoo: Zoo, tmp_path: Path) -> None:
    assert finished["state"] == "succeeded", finished
    assert finished["verdict"] == "backdoor_suspected" and finished["percent"] == 100.0
    report = user.get(f"/v1/scans/{finished['id']}/report").json()
    assert report["scan_id"] == finished["id"] and report["verdict"]["severity"] in (
        "HIGH", "CRITICAL")
    zipped_model = user.get(f"/v1/scans/{finished['id']}/checkpoint")
    assert zipped_model.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(zipped_model.content)) as zf:
        zf.extractall(tmp_path)  # our own file, from our own server
    assert {"model.safetensors", "config.json"} <= {p.name for p in tmp_path.iterdir()}
    before, _ = independent_asr(zoo.path(SUSPECT), zoo, SUSPECT)
    after, _ = independent_asr(tmp_path, zoo, SUSPECT)
    assert after < before - 0.2, (before, after)
    single = user.get(f"/v1/scans/{finished['id']}/checkpoint", params={"layout": "file"})
    assert single.content == (tmp_path / "model.safetensors").read_bytes()


def test_report_formats(finished: dict[str, Any], user: httpx.Client) -> None:
    sarif = user.get(f"/v1/scans/{finished['id']}/report", params={"format": "sarif"})
    assert sarif.json()["version"] == "2.1.0"
    html = user.get(f"/v1/scans/{finished['id']}/report", headers={"Accept": "text/html"})
    assert html.headers["content-type"].startswith("text/html") and "<html" in html.text


def test_provenance_names_uploads_never_server_paths(
        stack: Stack, finished: dict[str, Any], user: httpx.Client, admin: httpx.Client,
        uploads: dict[str, str], zoo: Zoo) -> None:
    """Issue 13: the report, the checkpoint's __metadata__, the dashboard's scan page and the
    BV-cache page name an upload by its file name, id and sha256, not where the server keeps it."""
    sid = finished["id"]
    label = {}
    for role, name in (("suspect", SUSPECT), ("base", zoo.model(SUSPECT)["base"])):
        up = user.get(f"/v1/uploads/{uploads[name]}").json()
        assert up["filename"] == f"{name}.zip"
        label[role] = f"upload:{up['filename']} ({up['id']}, sha256 {up['sha256']})"
    report_text = user.get(f"/v1/scans/{sid}/report").text
    report = json.loads(report_text)
    assert report["suspect"]["source"] == label["suspect"]
    assert report["base"]["source"] == label["base"]
    assert report["output"]["directory"] == f"scan {sid}"
    weights = user.get(f"/v1/scans/{sid}/checkpoint", params={"layout": "file"}).content
    header = json.loads(weights[8:8 + int.from_bytes(weights[:8], "little")])["__metadata__"]
    assert header == report["output"]["metadata"]
    assert (header["mergeshield.suspect"], header["mergeshield.base"]) == (
        label["suspect"], label["base"])
    page = user.get(f"/ui/scans/{sid}").text
    assert escape(label["suspect"]) in page and escape(label["base"]) in page
    cache_page = admin.get("/ui/bv-cache").text
    if not report["injection"]["cached"]:  # built by this scan: named by the base's upload
        built = {e["key"]: e for e in admin.get("/v1/bv-cache").json()}
        assert built[report["injection"]["recipe_hash"]]["base"] == label["base"]
        assert escape(label["base"]) in cache_page
    texts = {"report": report_text, "metadata": json.dumps(header), "scan page": page,
             "bv-cache page": cache_page,
             "sarif": user.get(f"/v1/scans/{sid}/report", params={"format": "sarif"}).text,
             "html": user.get(f"/v1/scans/{sid}/report", headers={"Accept": "text/html"}).text}
    for what, text in texts.items():
        for server in (str(stack.root), str(stack.root.resolve()), "unpacked", "uploads/"):
            assert server not in text, (what, server)


def test_same_scan_again_is_served_from_the_cache_unless_forced(
        stack: Stack, finished: dict[str, Any], user: httpx.Client, uploads: dict[str, str],
        zoo: Zoo, published: Published) -> None:
    body = {"suspect": {"upload": uploads[SUSPECT]},
            "base": {"upload": uploads[zoo.model(SUSPECT)["base"]]},
            "evaluation": published.dataset, "options": CLEANING}
    again = stack.wait_for(user, user.post("/v1/scans", json=body).json()["id"])
    assert again["state"] == "succeeded" and again["cached_from"] == finished["id"]
    assert user.get(f"/v1/scans/{again['id']}/report").json()["scan_id"] == finished["id"]
    other = user.post("/v1/scans", json={**body, "options": {**FAST, "seed": 1}}).json()
    forced = user.post("/v1/scans", json={**body, "force": True}).json()
    for scan_id in (other["id"], forced["id"]):
        done = stack.wait_for(user, scan_id)
        assert done["state"] == "succeeded" and done["cached_from"] is None


def test_hub_ids_through_the_loopback_hub(stack: Stack, user: httpx.Client, zoo: Zoo,
                                          published: Published) -> None:
    r = user.post("/v1/scans", json={
        "suspect": {"hub": f"zoo/{CLEAN}", "revision": "main"},
        "base": {"hub": f"zoo/{zoo.model(CLEAN)['base']}"},
        "evaluation": published.dataset, "options": FAST})
    done = stack.wait_for(user, r.json()["id"])
    assert done["state"] == "succeeded" and done["verdict"] == "no_backdoor_found", done
    report = user.get(f"/v1/scans/{done['id']}/report").json()
    assert report["suspect"]["revision_requested"] == "main"
    assert len(report["suspect"]["revision"]) == 40  # resolved to the commit sha
    # a hub source is named by its id beside that sha: report, __metadata__
    meta = report["output"]["metadata"]
    assert report["suspect"]["source"] == meta["mergeshield.suspect"] == f"zoo/{CLEAN}"
    assert meta["mergeshield.suspect_revision"] == report["suspect"]["revision"]


def test_private_repo_opens_with_the_token_which_is_never_written(
        stack: Stack, user: httpx.Client, zoo: Zoo, published: Published) -> None:
    r = user.post("/v1/scans", json={"suspect": {"hub": f"zoo/private-{CLEAN}"},
                                     "base": {"hub": f"zoo/{zoo.model(CLEAN)['base']}"},
                                     "evaluation": published.dataset, "options": FAST})
    done = stack.wait_for(user, r.json()["id"])
    assert done["state"] == "succeeded", done
    report = user.get(f"/v1/scans/{done['id']}/report").text
    assert published.hub.token not in report and published.hub.token not in stack.logs()
    assert published.hub.token not in json.dumps(user.get(f"/v1/scans/{done['id']}").json())


def test_missing_hub_repo_fails_the_scan_with_a_clear_code(stack: Stack, user: httpx.Client,
                                                           zoo: Zoo) -> None:
    r = user.post("/v1/scans", json={"suspect": {"hub": "zoo/no-such-model"},
                                     "base": {"hub": f"zoo/{zoo.model(CLEAN)['base']}"}})
    done = stack.wait_for(user, r.json()["id"])
    assert done["state"] == "failed" and done["error"]["code"] == "source_not_found", done


def test_hostile_pickle_fails_its_scan_and_the_worker_stays_healthy(
        stack: Stack, user: httpx.Client, uploads: dict[str, str], zoo: Zoo,
        tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    import pickle

    evil = _upload(user, "pytorch_model.bin", pickle.dumps({"w": Evil()}))
    assert evil.status_code == 201, evil.text
    r = user.post("/v1/scans", json={"suspect": {"upload": evil.json()["id"]},
                                     "base": {"upload": uploads[zoo.model(SUSPECT)["base"]]}})
    done = stack.wait_for(user, r.json()["id"])
    assert done["state"] == "failed" and done["error"]["code"] == "unsafe_format", done
    assert not marker.exists()
    assert httpx.get(f"{stack.url}/readyz").json()["checks"]["workers"]["alive"] >= 1


def test_uploads_are_hashed_and_deduplicated(user: httpx.Client, zoo: Zoo) -> None:
    data = (zoo.path(CLEAN) / "model.safetensors").read_bytes()
    first = _upload(user, "model.safetensors", data).json()
    second = _upload(user, "renamed.safetensors", data).json()
    assert first["id"] == second["id"] and first["size"] == len(data)
    import hashlib

    assert first["sha256"] == hashlib.sha256(data).hexdigest()
    assert user.get(f"/v1/uploads/{first['id']}").json() == first


def test_bad_uploads_are_refused(user: httpx.Client) -> None:
    big = _upload(user, "big.safetensors", b"\0" * (8 * 1024 * 1024 + 1))
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
    corrupt = _upload(user, "model.safetensors", b"\xff" * 64)
    assert corrupt.status_code == 400 and corrupt.json()["error"]["code"] == "corrupt_checkpoint"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../evil.txt", "x")
    escape = _upload(user, "model.zip", buf.getvalue())
    assert escape.status_code == 400 and escape.json()["error"]["code"] == "unsafe_archive"
    other = _upload(user, "notes.txt", b"hello")
    assert other.status_code == 400 and other.json()["error"]["code"] == "invalid_input"


def test_errors_have_one_shape(stack: Stack, user: httpx.Client) -> None:
    missing = user.get("/v1/scans/" + "0" * 32)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    malformed = user.post("/v1/scans", content=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert malformed.status_code == 422
    assert malformed.json()["error"]["code"] == "invalid_request"
    both = user.post("/v1/scans", json={"suspect": {"hub": "a/b", "upload": "0" * 32},
                                        "base": {"hub": "a/c"}})
    assert both.status_code == 422
    path = user.post("/v1/scans", json={"suspect": {"hub": "/etc/passwd"}, "base": {"hub": "a/c"}})
    assert path.status_code == 422
    unknown_upload = user.post("/v1/scans", json={"suspect": {"upload": "1" * 32},
                                                  "base": {"hub": "a/c"}})
    assert unknown_upload.status_code == 404


def test_keys_see_only_their_own_scans(stack: Stack, user: httpx.Client, admin: httpx.Client,
                                       finished: dict[str, Any]) -> None:
    with stack.client(None) as anonymous:
        r = anonymous.get("/v1/scans")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    with stack.client("msk_wrong") as wrong:
        assert wrong.get("/v1/scans").status_code == 401
    assert user.post("/v1/keys", json={"name": "x"}).status_code == 403
    other_key = admin.post("/v1/keys", json={"name": "other"}).json()
    with stack.client(other_key["key"]) as other:
        assert other.get(f"/v1/scans/{finished['id']}").status_code == 404
        assert other.get("/v1/scans").json()["total"] == 0
    assert admin.get(f"/v1/scans/{finished['id']}").status_code == 200
    admin.delete(f"/v1/keys/{other_key['id']}")
    with stack.client(other_key["key"]) as revoked:
        assert revoked.get("/v1/scans").status_code == 401
    listed = admin.get("/v1/keys").json()
    assert all("key" not in k or k["key"] is None for k in listed)


def test_listing_pages_and_filters(user: httpx.Client, finished: dict[str, Any]) -> None:
    page = user.get("/v1/scans", params={"limit": 1}).json()
    assert len(page["items"]) == 1 and page["total"] >= 2
    second = user.get("/v1/scans", params={"limit": 1, "offset": 1}).json()
    assert second["items"][0]["id"] != page["items"][0]["id"]
    failed = user.get("/v1/scans", params={"state": "failed"}).json()["items"]
    assert all(s["state"] == "failed" for s in failed)
    flagged = user.get("/v1/scans", params={"verdict": "backdoor_suspected"}).json()["items"]
    assert finished["id"] in {s["id"] for s in flagged}
    assert user.get("/v1/scans", params={"limit": 0}).status_code == 422


def test_idempotency_key_returns_the_same_scan(user: httpx.Client, uploads: dict[str, str],
                                               zoo: Zoo) -> None:
    body = {"suspect": {"hub": "zoo/none"}, "base": {"hub": "zoo/none2"}}
    a = user.post("/v1/scans", json=body, headers={"Idempotency-Key": "abc-1"}).json()
    b = user.post("/v1/scans", json=body, headers={"Idempotency-Key": "abc-1"}).json()
    assert a["id"] == b["id"]


def test_cancel(stack: Stack, user: httpx.Client, uploads: dict[str, str], zoo: Zoo,
                published: Published) -> None:
    r = user.post("/v1/scans", json={
        "suspect": {"upload": uploads[SUSPECT]},
        "base": {"upload": uploads[zoo.model(SUSPECT)["base"]]},
        "evaluation": published.dataset, "force": True})
    scan_id = r.json()["id"]
    cancelled = user.delete(f"/v1/scans/{scan_id}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = user.delete(f"/v1/scans/{scan_id}")
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    assert user.get(f"/v1/scans/{scan_id}/report").status_code == 409
    stack.wait_ready()  # the worker skips or stops it and stays up
    assert user.get(f"/v1/scans/{scan_id}").json()["state"] == "cancelled"


def test_operations_endpoints(stack: Stack, finished: dict[str, Any]) -> None:
    assert httpx.get(f"{stack.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.url}/readyz").json()
    assert ready["checks"]["database"]["ok"] and ready["checks"]["broker"]["ok"]
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert 'mergeshield_scans{kind="scan",state="succeeded"}' in metrics
    assert "mergeshield_queue_depth" in metrics and "mergeshield_scan_duration_seconds" in metrics
    assert "mergeshield_http_request_seconds" in metrics
    spec = httpx.get(f"{stack.url}/openapi.json").json()
    assert "/v1/scans" in spec["paths"] and "/v1/uploads" in spec["paths"]
    assert httpx.get(f"{stack.url}/docs").status_code == 200
    if stack.backend == "sqlite-filesystem":  # `serve` says where it is
        assert f"on {stack.url}" in stack.logs()


def test_logs_carry_the_scan_id_and_no_secrets(stack: Stack, finished: dict[str, Any]) -> None:
    text = stack.logs()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(line.get("scan_id") == finished["id"] for line in lines)
    assert "msk_test_admin_key" not in text
