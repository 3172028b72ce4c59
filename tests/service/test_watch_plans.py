"""A watch that names a merge plan (issue 17): a signed Hub push of one of the plan's repos re-runs
the plan as a merge with that repo pinned at the pushed commit, once per commit, its result called
back as the watch says. One backend (the embedded default): the queue and the merge are
test_merges.py's and test_webhooks.py's on both; what is new here is the watch's part."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.service.conftest import CLEAN, SUSPECT, Published
from tests.support.hub_payloads import repo_content
from tests.support.receiver import Receiver
from tests.support.stack import Stack
from tests.support.zoo import Zoo

SECRET = "hub-webhook-secret-0123456789"


@pytest.fixture(scope="module")
def stack(published: Published, bv_cache_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("watch-plans"), "sqlite-filesystem", redis_db=11,
               env=published.env(bv_cache_dir, MERGESHIELD_WEBHOOK_SECRET=SECRET,
                                  MERGESHIELD_CALLBACK_ALLOW_PRIVATE="true",
                                  MERGESHIELD_CALLBACK_POLL_INTERVAL="0.2")) as s:
        yield s.up()


@pytest.fixture(scope="module")
def user(stack: Stack, admin: httpx.Client) -> Iterator[httpx.Client]:
    key = admin.post("/v1/keys", json={"name": "plan-watcher"}).json()["key"]
    with stack.client(key) as c:
        yield c


def deliver(stack: Stack, payload: Any) -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/webhooks/huggingface", json=payload,
                      headers={"X-Webhook-Secret": SECRET}, timeout=30)


def test_a_push_to_a_planned_model_reruns_the_plan_pinned_at_that_commit_once(
        stack: Stack, user: httpx.Client, plan: dict[str, Any], published: Published,
        zoo: Zoo) -> None:
    rx = Receiver().start()
    try:
        hook = rx.expect("plan", secrets=[])
        rx.routes["/plan"].secrets = user.post("/v1/webhooks/endpoints",
                                               json={"url": hook}).json()["secrets"]
        r = user.post("/v1/watches", json={"merge": yaml.safe_dump(plan), "callback_url": hook})
        assert r.status_code == 201, r.text
        w = r.json()
        base, model = f"zoo/{zoo.model(CLEAN)['base']}", f"zoo/{CLEAN}"
        assert w["repo"] == f"{base}, {model}" and w["scan"] is None
        assert w["merge"]["models"][0]["model"] == model
        sha = published.hub.repos[("model", model)].branches["main"]
        first = deliver(stack, repo_content(model, sha))
        assert first.status_code == 202, first.text
        assert first.json()["state"] == "accepted" and first.json()["watch_ids"] == [w["id"]]
        (merge_id,) = first.json()["scan_ids"]
        merge = user.get(f"/v1/merges/{merge_id}").json()
        assert merge["models"] == [f"{model}@{sha}"] and merge["base"] == base  # the rest as is
        assert merge["plan"]["mergeshield"]["evaluation"] == {f"{model}@{sha}": published.dataset}
        again = deliver(stack, repo_content(model, sha))
        assert again.status_code == 200, again.text
        assert (again.json()["state"], again.json()["scan_ids"]) == ("duplicate", [merge_id])
        done = _wait(user, merge_id, stack)
        assert done["state"] == "succeeded", done
        called = json.loads(rx.wait_for("plan")[0].body)
        assert (called["type"], called["data"]["id"]) == ("merge.succeeded", merge_id)
        assert user.get("/v1/merges").json()["total"] == 1
        assert user.delete(f"/v1/watches/{w['id']}").status_code == 204
    finally:
        rx.stop()


def test_a_push_to_a_repo_outside_the_plan_queues_nothing(
        stack: Stack, user: httpx.Client, plan: dict[str, Any]) -> None:
    w = user.post("/v1/watches", json={"merge": plan}).json()
    before = len(stack.rows())
    r = deliver(stack, repo_content(f"zoo/{SUSPECT}", "5" * 40))
    assert r.status_code == 200 and r.json()["state"] == "ignored", r.text
    assert r.json()["scan_ids"] == [] and "no watch matches" in r.json()["reason"]
    assert len(stack.rows()) == before
    user.delete(f"/v1/watches/{w['id']}")


def test_a_watched_plan_naming_an_upload_or_malformed_is_refused(
        stack: Stack, user: httpx.Client, plan: dict[str, Any]) -> None:
    upload = {**plan, "models": [{"model": "upload:" + "0" * 32}], "mergeshield": {}}
    for body in ({"merge": upload}, {"merge": "merge_method: [unclosed"},
                 {"merge": {**plan, "merge_method": "slerp"}},
                 {"merge": plan, "repo": "zoo/x"},  # a plan's watch matches the plan's repos
                 {"repo": "zoo/x"}):  # neither scan options nor a plan
        r = user.post("/v1/watches", json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_config"), (body, r.text)
    assert "upload" in user.post("/v1/watches", json={"merge": upload}).json()["error"]["message"]
    assert user.get("/v1/watches").json() == []


def test_one_repo_at_two_revisions_moves_only_the_entry_that_follows_main(
        stack: Stack, admin: httpx.Client, plan: dict[str, Any], published: Published) -> None:
    """``org/name`` follows each push; ``org/name@<sha>`` stays at its commit; neither the
    watch's repos, the pinning nor the one-merge-per-commit de-duplication collapses the two."""
    key = admin.post("/v1/keys", json={"name": "two-revisions"}).json()["key"]
    model = plan["models"][0]["model"]
    head = published.hub.repos[("model", model)].branches["main"]
    both = {**plan, "models": [{"model": model, "parameters": {"weight": 0.5}},
                               {"model": f"{model}@{head}", "parameters": {"weight": 0.5}}],
            "mergeshield": {**plan["mergeshield"], "evaluation": {
                model: published.dataset, f"{model}@{head}": published.dataset}}}
    new, newer = "2" * 40, "3" * 40  # commits the loopback hub does not have
    with stack.client(key) as c:
        w = c.post("/v1/watches", json={"merge": yaml.safe_dump(both)}).json()
        assert [m["model"] for m in w["merge"]["models"]] == [model, f"{model}@{head}"]
        first = deliver(stack, repo_content(model, new))
        assert first.status_code == 202 and first.json()["state"] == "accepted", first.text
        (merge_id,) = first.json()["scan_ids"]
        merge = c.get(f"/v1/merges/{merge_id}").json()
        assert merge["models"] == [f"{model}@{new}", f"{model}@{head}"]
        assert merge["plan"]["mergeshield"]["evaluation"] == {
            f"{model}@{new}": published.dataset, f"{model}@{head}": published.dataset}
        assert deliver(stack, repo_content(model, new)).json()["scan_ids"] == [merge_id]
        second = deliver(stack, repo_content(model, newer)).json()
        assert second["state"] == "accepted" and second["scan_ids"] != [merge_id], second
        assert c.get(f"/v1/merges/{second['scan_ids'][0]}").json()["models"] == [
            f"{model}@{newer}", f"{model}@{head}"]
        # the worker reads the pinned commit: one the hub does not have is source_not_found
        done = _wait(c, merge_id, stack)
        assert (done["state"], done["error"]["code"]) == ("failed", "source_not_found"), done
        _wait(c, second["scan_ids"][0], stack)
        assert c.delete(f"/v1/watches/{w['id']}").status_code == 204


def test_a_plan_pinned_throughout_is_refused_as_a_watch_that_never_runs(
        stack: Stack, user: httpx.Client, plan: dict[str, Any], published: Published) -> None:
    model, base = plan["models"][0]["model"], plan["base_model"]
    sha = published.hub.repos[("model", model)].branches["main"]
    base_sha = published.hub.repos[("model", base)].branches["main"]
    fixed = {**plan, "base_model": f"{base}@{base_sha}",
             "models": [{"model": f"{model}@{sha}"}], "mergeshield": {}}
    r = user.post("/v1/watches", json={"merge": fixed})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_config"), r.text
    assert "main" in r.json()["error"]["message"]
    assert user.get("/v1/watches").json() == []


def _wait(client: httpx.Client, merge_id: str, stack: Stack, timeout: float = 300
          ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/v1/merges/{merge_id}").json()
        if body["state"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.25)
    raise AssertionError(f"merge {merge_id} unfinished after {timeout} s\n{stack.logs(4000)}")
