"""service/hub_events.py: what a Hub payload announces, on the Hub's documented payloads."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from starlette.datastructures import State

from mergeshield.errors import ConfigError
from service.hub_events import (
    Commit,
    _scan_for,
    commit_of,
    dedup_key,
    pinned,
    recorded_headers,
    watched_repos,
)
from service.schemas import ModelRef, ScanCreate, ScanOptions
from tests.support.hub_payloads import DOCS_PR_OPENED, DOCS_REFS, DOCS_REPO, repo_content
from worker.db import Watch

SHA = "575db8b7a51b6f85eb06eee540738584589f131c"  # the documented new sha of refs/heads/main
OLD = "1" * 40  # a commit a plan pins explicitly


def test_a_push_to_main_gives_the_new_commit_of_main() -> None:
    assert commit_of(repo_content("some-user/some-repo")) == Commit("some-user/some-repo", SHA)


def test_without_updated_refs_the_head_sha_is_taken() -> None:
    payload = repo_content("some-user/some-repo")
    del payload["updatedRefs"]
    assert commit_of(payload) == Commit("some-user/some-repo", DOCS_REPO["headSha"])


def _deleted_main() -> dict[str, Any]:
    return repo_content("a/b", refs=[{"ref": "refs/heads/main", "oldSha": SHA, "newSha": None}])


def _repo_deleted() -> dict[str, Any]:
    return {**repo_content("a/b"), "event": {"action": "delete", "scope": "repo"}}


def _action_delete_on_content() -> dict[str, Any]:
    return {**repo_content("a/b"), "event": {"action": "delete", "scope": "repo.content"}}


def _bad_name() -> dict[str, Any]:
    payload = repo_content("a/b")
    payload["repo"]["name"] = "../../etc/passwd"
    return payload


def _short_sha() -> dict[str, Any]:
    return repo_content("a/b", refs=[{"ref": "refs/heads/main", "oldSha": None,
                                      "newSha": "abc"}])


@pytest.mark.parametrize(("payload", "reason"), [
    (copy.deepcopy(DOCS_PR_OPENED), "scope 'discussion'"),
    (_deleted_main(), "main was deleted"),
    (repo_content("a/b", refs=[{"ref": "refs/heads/main", "oldSha": SHA, "newSha": "0" * 40}]),
     "main was deleted"),
    (repo_content("a/b", refs=DOCS_REFS[1:]), "no new commit on main"),
    (repo_content("a/b", refs=[{"ref": "refs/pr/3", "oldSha": None, "newSha": SHA}]),
     "refs/pr/3"),
    (_repo_deleted(), "scope 'repo'"),
    (_action_delete_on_content(), "a deletion"),
    (repo_content("a/b", repo_type="space"), "'space' repo"),
    (_bad_name(), "no valid repo"),
    (_short_sha(), "no commit sha"),
    ([1, 2], "not a JSON object"),
])
def test_everything_else_is_a_reason_to_ignore(payload: Any, reason: str) -> None:
    got = commit_of(payload)
    assert isinstance(got, str) and reason in got


def test_the_dedup_key_is_the_repo_commit_and_configuration() -> None:
    def body(sha: str, seed: int = 0) -> ScanCreate:
        return ScanCreate(suspect=ModelRef(hub="a/b", revision=sha), base=ModelRef(hub="a/base"),
                          options=ScanOptions(seed=seed))

    assert dedup_key(body(SHA)) == dedup_key(body(SHA))
    assert len({dedup_key(body(SHA)), dedup_key(body("1" * 40)),
                dedup_key(body(SHA, seed=1))}) == 3


def test_the_secret_is_never_recorded() -> None:
    kept = recorded_headers({"X-Webhook-Secret": "s", "authorization": "Bearer k",
                             "Cookie": "c", "user-agent": "huggingface-hub-webhooks"})
    assert kept == {"user-agent": "huggingface-hub-webhooks"}


def test_a_watch_stored_with_options_past_the_bounds_fails_with_a_reason_not_a_500() -> None:
    watch = Watch(owner="o", repo="a/b", callback_url=None,
                  scan={"base": {"hub": "a/base"}, "options": {"fixed_lambda": 1e9}})
    state, scan_id, reason = _scan_for(State(), watch, Commit("a/b", SHA))
    assert (state, scan_id) == ("failed", None)
    assert reason is not None and reason.startswith("invalid_config") and "fixed_lambda" in reason


def _plan(*models: str, base: str = "org/base",
          evaluation: dict[str, str] | None = None) -> dict[str, Any]:
    """A checked plan as a watch stores it (plain data)."""
    return {"merge_method": "task_arithmetic", "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
            "mergeshield": {"evaluation": evaluation or {}}}


def test_a_push_moves_the_entries_that_follow_main_and_keeps_the_pinned_ones() -> None:
    plan = _plan("org/m", f"org/m@{OLD}", "org/m@main", "org/m@v1", "org/other",
                 evaluation={"org/m": "org/task-a", f"org/m@{OLD}": "org/task-b"})
    got = pinned(plan, Commit("org/m", SHA))
    # org/m and @main follow main; the explicit commit and the tag are not moved by a main push
    assert [m["model"] for m in got["models"]] == [
        f"org/m@{SHA}", f"org/m@{OLD}", f"org/m@{SHA}", "org/m@v1", "org/other"]
    assert got["mergeshield"]["evaluation"] == {f"org/m@{SHA}": "org/task-a",
                                                f"org/m@{OLD}": "org/task-b"}
    assert got["base_model"] == "org/base" and plan["models"][0]["model"] == "org/m"  # a copy
    assert pinned(plan, Commit("org/base", SHA))["base_model"] == f"org/base@{SHA}"
    refs = _plan("org/m@refs/heads/main", f"org/m@{OLD}")
    assert [m["model"] for m in pinned(refs, Commit("org/m", SHA))["models"]] == [
        f"org/m@{SHA}", f"org/m@{OLD}"]


def test_a_plan_is_watched_on_the_repos_it_follows_on_main_only() -> None:
    plan = _plan(f"org/m@{OLD}", "org/n@main", "org/m@v1", "org/p", "org/n",
                 base=f"org/base@{OLD}")
    assert watched_repos(plan) == ["org/n", "org/p"]
    assert watched_repos(_plan(f"org/m@{OLD}", "org/m", base="org/base")) == [
        "org/base", "org/m"]
    assert watched_repos(_plan(f"org/m@{OLD}", base=f"org/base@{OLD}")) == []


def test_a_push_that_makes_two_entries_one_with_two_datasets_is_refused() -> None:
    plan = _plan("org/m", f"org/m@{SHA}",
                 evaluation={"org/m": "org/task-a", f"org/m@{SHA}": "org/task-b"})
    with pytest.raises(ConfigError, match="org/task-a.*org/task-b|org/task-b.*org/task-a"):
        pinned(plan, Commit("org/m", SHA))
    same = _plan("org/m", f"org/m@{SHA}",
                 evaluation={"org/m": "org/task-a", f"org/m@{SHA}": "org/task-a"})
    got = pinned(same, Commit("org/m", SHA))  # the same model twice, as the plan now says
    assert [m["model"] for m in got["models"]] == [f"org/m@{SHA}"] * 2
    assert got["mergeshield"]["evaluation"] == {f"org/m@{SHA}": "org/task-a"}
