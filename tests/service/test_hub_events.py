"""service/hub_events.py: what a Hub payload announces, on the Hub's documented payloads."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from starlette.datastructures import State

from service.hub_events import Commit, _scan_for, commit_of, dedup_key, recorded_headers
from service.schemas import ModelRef, ScanCreate, ScanOptions
from tests.support.hub_payloads import DOCS_PR_OPENED, DOCS_REFS, DOCS_REPO, repo_content
from worker.db import Watch

SHA = "575db8b7a51b6f85eb06eee540738584589f131c"  # the documented new sha of refs/heads/main


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
