"""Webhooks against real processes, on both backends: the Hub's webhook in (payloads as the Hub
documents them, https://huggingface.co/docs/hub/webhooks), result callbacks out to a receiver on
loopback that checks the Standard Webhooks signatures and replays itself."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.conftest import CLEAN, FAST, Published
from tests.support.hub_payloads import DOCS_PR_OPENED, DOCS_REFS, repo_content
from tests.support.receiver import Receiver
from tests.support.stack import BACKENDS, Stack
from tests.support.zoo import Zoo

SECRET = "hub-webhook-secret-0123456789"
# the end-to-end scan only has to succeed: few λ, a small evaluation, no probes
QUICK = {**FAST, "max_eval": 200, "lambdas": [0.0, 1.0], "probes": False}
WATCH_SECRET = "a-watch-of-its-own-secret-42"
@pytest.fixture(scope="module", params=BACKENDS)
def stack(request: pytest.FixtureRequest, published: Published, bv_cache_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp(f"webhooks-{request.param}"), request.param, redis_db=14,
               env=published.env(bv_cache_dir, MERGESHIELD_WEBHOOK_SECRET=SECRET,
                                  MERGESHIELD_CALLBACK_ALLOW_PRIVATE="true",
                                  MERGESHIELD_CALLBACK_BACKOFF="0.2",
                                  MERGESHIELD_CALLBACK_BACKOFF_MAX="1",
                                  MERGESHIELD_CALLBACK_MAX_ATTEMPTS="3",
                                  MERGESHIELD_CALLBACK_POLL_INTERVAL="0.2")) as s:
        yield s.up()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rx = Receiver().start()
    try:
        yield rx
    finally:
        rx.stop()


@pytest.fixture(scope="module")
def user(stack: Stack, admin: httpx.Client) -> Iterator[httpx.Client]:
    key = admin.post("/v1/keys", json={"name": "registry"}).json()["key"]
    with stack.client(key) as c:
        yield c


def deliver(stack: Stack, payload: Any, secret: str | None = SECRET) -> httpx.Response:
    """POST as the Hub does: JSON, the secret in X-Webhook-Secret, no API key."""
    headers = {"X-Webhook-Secret": secret} if secret is not None else {}
    return httpx.post(f"{stack.url}/v1/webhooks/huggingface", json=payload, headers=headers,
                      timeout=30)


def watch(user: httpx.Client, repo: str, zoo: Zoo, **extra: Any) -> dict[str, Any]:
    r = user.post("/v1/watches", json={
        "repo": repo, "scan": {"base": {"hub": f"zoo/{zoo.model(CLEAN)['base']}"},
                               "options": FAST}, **extra})
    assert r.status_code == 201, r.text
    return dict(r.json())


def endpoint(user: httpx.Client, receiver: Receiver, name: str, **route: Any) -> dict[str, Any]:
    """A callback endpoint at the receiver's route ``name``, which trusts its secrets."""
    url = receiver.expect(name, secrets=[], **route)
    r = user.post("/v1/webhooks/endpoints", json={"url": url})
    assert r.status_code == 201, r.text
    receiver.routes[f"/{name}"].secrets = r.json()["secrets"]
    return dict(r.json())


def test_a_push_to_a_watched_model_is_scanned_and_its_result_called_back_signed(
        stack: Stack, user: httpx.Client, receiver: Receiver, zoo: Zoo,
        published: Published) -> None:
    repo = f"zoo/{CLEAN}"
    sha = published.hub.repos[("model", repo)].branches["main"]
    hook = endpoint(user, receiver, f"e2e-{stack.backend}", fail_first=1)
    w = watch(user, repo[:-3], zoo, prefix=True, callback_url=hook["url"], open_discussion=True,
              scan={"base": {"hub": f"zoo/{zoo.model(CLEAN)['base']}"},
                    "evaluation": published.dataset, "options": QUICK})
    r = deliver(stack, repo_content(repo, sha))
    assert r.status_code == 202, r.text
    inbound = r.json()
    assert inbound["state"] == "accepted" and inbound["revision"] == sha
    assert inbound["watch_ids"] == [w["id"]] and len(inbound["scan_ids"]) == 1
    done = stack.wait_for(user, inbound["scan_ids"][0])
    assert done["state"] == "succeeded" and done["verdict"], done
    report = user.get(f"/v1/scans/{done['id']}/report").json()
    assert report["suspect"]["revision"] == sha
    got = receiver.wait_for(f"e2e-{stack.backend}")
    body = json.loads(got[0].body)
    assert body["type"] == "scan.succeeded" and body["data"]["id"] == done["id"]
    assert body["data"]["suspect_revision"] == sha and body["data"]["verdict"] == done["verdict"]
    callback = _wait_delivery(user, done["id"], "delivered", kind=hook["url"])
    assert callback["attempts"] == 2 and callback["endpoint_id"] == hook["id"]
    opened = _wait_delivery(user, done["id"], "delivered", kind="hf-discussion:")
    assert opened["url"] == f"hf-discussion:{repo}"
    discussion = next(d for d in published.hub.discussions[repo] if done["id"] in d["description"])
    assert done["verdict"] in discussion["title"] and sha in discussion["description"]
    recorded = user.get(f"/v1/webhooks/deliveries/{inbound['id']}").json()
    assert recorded["payload"] == repo_content(repo, sha)
    assert "x-webhook-secret" not in recorded["headers"] and SECRET not in json.dumps(recorded)
    assert user.delete(f"/v1/watches/{w['id']}").status_code == 204


def test_the_same_delivery_twice_gives_the_same_scan(stack: Stack, user: httpx.Client,
                                                     zoo: Zoo) -> None:
    w = watch(user, "zoo/dup-model", zoo)
    payload = repo_content("zoo/dup-model")
    first = deliver(stack, payload)
    second = deliver(stack, payload)
    assert first.status_code == 202 and second.status_code == 200
    assert second.json()["state"] == "duplicate"
    assert second.json()["scan_ids"] == first.json()["scan_ids"]
    again = user.post(f"/v1/webhooks/deliveries/{first.json()['id']}/redeliver")
    assert again.status_code == 202 and again.json()["scan_ids"] == first.json()["scan_ids"]
    assert user.get("/v1/scans", params={"suspect": "zoo/dup-model"}).json()["total"] == 1
    user.delete(f"/v1/watches/{w['id']}")


def test_a_watch_is_rate_limited(stack: Stack, user: httpx.Client, zoo: Zoo) -> None:
    w = watch(user, "zoo/busy-model", zoo, rate_limit=1, rate_window=3600)
    first = deliver(stack, repo_content("zoo/busy-model", "1" * 40))
    limited = deliver(stack, repo_content("zoo/busy-model", "2" * 40))
    assert first.json()["state"] == "accepted"
    assert limited.status_code == 200 and limited.json()["state"] == "rate_limited"
    assert limited.json()["scan_ids"] == []
    assert user.get("/v1/scans", params={"suspect": "zoo/busy-model"}).json()["total"] == 1
    user.delete(f"/v1/watches/{w['id']}")


def test_a_watch_that_cannot_queue_fails_alone_and_the_hub_gets_a_2xx(
        stack: Stack, user: httpx.Client, zoo: Zoo) -> None:
    broken = watch(user, "zoo/shared-model", zoo, scan={"base": {"upload": "f" * 32}})
    fine = watch(user, "zoo/shared-model", zoo)
    r = deliver(stack, repo_content("zoo/shared-model"))
    assert r.status_code == 202 and r.json()["state"] == "accepted"
    assert len(r.json()["scan_ids"]) == 1
    assert f"watch {broken['id']}: not_found" in r.json()["reason"]
    user.delete(f"/v1/watches/{fine['id']}")
    alone = deliver(stack, repo_content("zoo/shared-model", "3" * 40))
    assert alone.status_code == 200 and alone.json()["state"] == "failed"
    user.delete(f"/v1/watches/{broken['id']}")


def test_deletions_and_events_other_than_a_push_to_main_are_ignored(
        stack: Stack, user: httpx.Client, zoo: Zoo) -> None:
    name = "zoo/quiet-model"
    w = watch(user, name, zoo)
    pr_opened = copy.deepcopy(DOCS_PR_OPENED)
    pr_opened["repo"]["name"] = name
    branch_deleted = repo_content(name, refs=[{"ref": "refs/heads/main", "oldSha": "a" * 40,
                                               "newSha": None}])
    zeros = repo_content(name, refs=[{"ref": "refs/heads/main", "oldSha": "a" * 40,
                                      "newSha": "0" * 40}])
    tag_only = repo_content(name, refs=DOCS_REFS[1:])
    repo_deleted = {**repo_content(name), "event": {"action": "delete", "scope": "repo"}}
    dataset = repo_content(name, repo_type="dataset")
    for payload, why in [(pr_opened, "scope 'discussion'"), (branch_deleted, "main was deleted"),
                         (zeros, "main was deleted"), (tag_only, "no new commit on main"),
                         (repo_deleted, "scope 'repo'"), (dataset, "'dataset' repo")]:
        r = deliver(stack, payload)
        assert r.status_code == 200 and r.json()["state"] == "ignored", r.text
        assert why in r.json()["reason"] and r.json()["scan_ids"] == []
    assert user.get("/v1/scans", params={"suspect": name}).json()["total"] == 0
    user.delete(f"/v1/watches/{w['id']}")


def test_a_wrong_or_missing_secret_is_refused_and_recorded(stack: Stack, user: httpx.Client,
                                                           admin: httpx.Client, zoo: Zoo) -> None:
    own = watch(user, "zoo/own-model", zoo, secret=WATCH_SECRET)
    for secret in (None, "", "not-the-secret"):
        r = deliver(stack, repo_content("zoo/own-model"), secret)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_webhook_secret"
    ok = deliver(stack, repo_content("zoo/own-model"), WATCH_SECRET)  # the watch's own secret
    assert ok.status_code == 202 and ok.json()["watch_ids"] == [own["id"]]
    other = deliver(stack, repo_content("zoo/dup-model"), WATCH_SECRET)  # not its repo
    assert other.status_code == 401
    refused = admin.get("/v1/webhooks/deliveries", params={"direction": "inbound",
                                                           "state": "refused"}).json()
    assert refused["total"] >= 4
    detail = admin.get(f"/v1/webhooks/deliveries/{refused['items'][0]['id']}").json()
    assert "x-webhook-secret" not in detail["headers"] and "not-the-secret" not in json.dumps(
        refused) + json.dumps(detail)
    assert admin.post(f"/v1/webhooks/deliveries/{detail['id']}/redeliver").status_code == 409
    user.delete(f"/v1/watches/{own['id']}")


def test_a_body_that_is_not_json_or_too_big_is_refused(stack: Stack) -> None:
    url, secret = f"{stack.url}/v1/webhooks/huggingface", {"X-Webhook-Secret": SECRET}
    garbled = httpx.post(url, content=b"{not json", headers=secret)
    assert garbled.status_code == 400 and garbled.json()["error"]["code"] == "invalid_input"
    flood = httpx.post(url, content=b" " * (1024 * 1024 + 1), headers=secret)
    assert flood.status_code == 413 and flood.json()["error"]["code"] == "payload_too_large"


def test_odd_ids_filters_and_payloads_are_client_errors(stack: Stack, user: httpx.Client) -> None:
    """PostgreSQL refuses NUL in text and SQLite integers stop at 2**63: neither is a 500."""
    for path in ("/v1/webhooks/deliveries/a%00b", "/v1/webhooks/endpoints/a%00b",
                 "/v1/watches/a%00b"):
        assert user.get(path).status_code == 404
    for params in ({"state": "a\x00b"}, {"scan": "a\x00b"}, {"offset": 2**63}):
        assert user.get("/v1/webhooks/deliveries", params=params).status_code == 422
    payload = repo_content("zoo/any-model")
    payload["repo"]["name"] = "zoo/nul\x00model"
    payload["event"]["scope"] = "repo.content\x00"
    r = deliver(stack, payload)
    assert r.status_code == 200 and r.json()["state"] == "ignored", r.text


def test_a_dead_callback_is_redelivered(stack: Stack, user: httpx.Client, receiver: Receiver,
                                        zoo: Zoo) -> None:
    name = f"down-{stack.backend}"
    hook = endpoint(user, receiver, name, fail_always=True)
    r = user.post("/v1/scans", json={"suspect": {"hub": "zoo/no-such-model"},
                                     "base": {"hub": f"zoo/{zoo.model(CLEAN)['base']}"},
                                     "callback_url": hook["url"]})
    scan = stack.wait_for(user, r.json()["id"])
    assert scan["state"] == "failed"
    dead = _wait_delivery(user, scan["id"], "dead")
    assert dead["attempts"] == 3 and dead["response_status"] == 500
    assert dead["links"]["redeliver"].endswith("/redeliver")
    listed = user.get("/v1/webhooks/deliveries", params={"state": "dead"}).json()["items"]
    assert dead["id"] in {d["id"] for d in listed}
    receiver.routes[f"/{name}"].fail_always = False
    again = user.post(dead["links"]["redeliver"])
    assert again.status_code == 202 and again.json()["state"] == "pending"
    done = _wait_delivery(user, scan["id"], "delivered")
    body = json.loads(receiver.wait_for(name)[0].body)
    assert done["attempts"] == 1 and body["type"] == "scan.failed"
    assert body["data"]["error"]["code"] == "source_not_found"


def test_rotation_signs_with_both_secrets_until_the_next(stack: Stack, user: httpx.Client,
                                                         receiver: Receiver, zoo: Zoo) -> None:
    name = f"rotating-{stack.backend}"
    hook = endpoint(user, receiver, name)
    old = hook["secrets"]
    rotated = user.post(f"/v1/webhooks/endpoints/{hook['id']}/rotate").json()
    assert len(rotated["secrets"]) == 2 and rotated["secrets"][1] == old[0]
    assert all(e["secrets"] is None for e in user.get("/v1/webhooks/endpoints").json())
    receiver.routes[f"/{name}"].secrets = rotated["secrets"][:1]  # knows only the new one
    r = user.post("/v1/scans", json={"suspect": {"hub": "zoo/also-missing"},
                                     "base": {"hub": "zoo/also-missing-base"},
                                     "callback_url": hook["url"]})
    got = receiver.wait_for(name)
    assert len(got[0].headers["webhook-signature"].split(" ")) == 2
    assert json.loads(got[0].body)["data"]["id"] == r.json()["id"]
    only_new = user.post(f"/v1/webhooks/endpoints/{hook['id']}/rotate",
                         json={"keep_previous": False}).json()
    assert len(only_new["secrets"]) == 1 and old[0] not in only_new["secrets"]
    # a rescan goes the same way in: its result is called back to the same endpoint
    stack.wait_for(user, r.json()["id"])
    receiver.routes[f"/{name}"].secrets = only_new["secrets"]
    again = user.post(f"/v1/scans/{r.json()['id']}/rescan")
    assert again.status_code == 202, again.text
    got = receiver.wait_for(name, count=2)
    assert json.loads(got[1].body)["data"]["id"] == again.json()["id"]


def test_deliveries_endpoints_and_watches_belong_to_their_key(
        stack: Stack, user: httpx.Client, admin: httpx.Client, zoo: Zoo) -> None:
    mine = user.get("/v1/webhooks/deliveries").json()
    assert mine["total"] >= 1
    other_key = admin.post("/v1/keys", json={"name": "someone-else"}).json()["key"]
    with stack.client(other_key) as other:
        assert other.get("/v1/webhooks/deliveries").json()["total"] == 0
        assert other.get(f"/v1/webhooks/deliveries/{mine['items'][0]['id']}").status_code == 404
        assert other.get("/v1/webhooks/endpoints").json() == []
        w = watch(user, "zoo/private-watch", zoo)
        assert other.get(f"/v1/watches/{w['id']}").status_code == 404
        assert other.delete(f"/v1/watches/{w['id']}").status_code == 404
    assert admin.get("/v1/webhooks/deliveries").json()["total"] >= mine["total"]
    assert admin.get(f"/v1/watches/{w['id']}").json()["has_secret"] is False
    assert user.delete(f"/v1/watches/{w['id']}").status_code == 204
    assert user.get(f"/v1/watches/{w['id']}").status_code == 404
    with stack.client(None) as anonymous:
        assert anonymous.get("/v1/webhooks/deliveries").status_code == 401


def test_bad_watches_and_callback_urls_are_refused(user: httpx.Client, zoo: Zoo) -> None:
    base = {"base": {"hub": f"zoo/{zoo.model(CLEAN)['base']}"}}
    bad_repo = user.post("/v1/watches", json={"repo": "../etc", "scan": base})
    assert bad_repo.status_code == 422 and bad_repo.json()["error"]["code"] == "invalid_config"
    short_secret = user.post("/v1/watches", json={"repo": "a/b", "scan": base, "secret": "x"})
    assert short_secret.status_code == 422
    for url in ("ftp://example.com/hook", "file:///etc/passwd", "not a url"):
        r = user.post("/v1/watches", json={"repo": "a/b", "scan": base, "callback_url": url})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_callback_url"
        scan = user.post("/v1/scans", json={"suspect": {"hub": "a/b"}, **base,
                                            "callback_url": url})
        assert scan.status_code == 400 and scan.json()["error"]["code"] == "invalid_callback_url"
    assert user.get("/v1/scans", params={"suspect": "a/b"}).json()["total"] == 0


def test_with_no_secret_configured_every_delivery_is_refused(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    s = Stack(tmp_path_factory.mktemp("webhooks-off"), "sqlite-filesystem")
    try:
        s.start_api().wait_up()
        for secret in (None, SECRET):
            r = deliver(s, repo_content("zoo/anything"), secret)
            assert r.status_code == 403 and r.json()["error"]["code"] == "webhooks_disabled"
        with s.client() as admin:
            listed = admin.get("/v1/webhooks/deliveries").json()
        assert listed["total"] == 2 and {d["state"] for d in listed["items"]} == {"refused"}
    finally:
        s.close()


def _wait_delivery(client: httpx.Client, scan_id: str, state: str, kind: str = "http",
                   timeout: float = 60) -> dict[str, Any]:
    """The scan's outbound delivery whose url starts with ``kind``, once it is in ``state``."""
    deadline = time.monotonic() + timeout
    items: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        items = [d for d in client.get("/v1/webhooks/deliveries", params={
            "direction": "outbound", "scan": scan_id}).json()["items"]
            if d["url"].startswith(kind)]
        if items and items[0]["state"] == state:
            return items[0]
        time.sleep(0.2)
    raise AssertionError(f"the {kind} delivery of {scan_id} is not {state}: {items}")
