"""Webhook payloads as the Hugging Face Hub documents them
(https://huggingface.co/docs/hub/webhooks, "Webhook Payloads"): the documented full payload of
a Pull Request being opened, and the documented ``repo`` object and ``updatedRefs`` value,
assembled into the ``repo.content`` event a push sends."""

from __future__ import annotations

import copy
from typing import Any

# the Hub's documented repo object and updatedRefs value, as its docs give them
DOCS_REPO: dict[str, Any] = {
    "type": "model", "name": "some-user/some-repo", "id": "6366c000a2abcdf2fd69a080",
    "private": False,
    "url": {"web": "https://huggingface.co/some-user/some-repo",
            "api": "https://huggingface.co/api/models/some-user/some-repo"},
    "headSha": "c379e821c9c95d613899e8c4343e4bfee2b0c600",
    "tags": ["license:other", "has_space"], "owner": {"id": "61d2000c3c2083e1c08af22d"}}
DOCS_REFS: list[dict[str, Any]] = [
    {"ref": "refs/heads/main", "oldSha": "ce9a4674fa833a68d5a73ec355f0ea95eedd60b7",
     "newSha": "575db8b7a51b6f85eb06eee540738584589f131c"},
    {"ref": "refs/tags/test", "oldSha": None,
     "newSha": "575db8b7a51b6f85eb06eee540738584589f131c"}]
# the Hub's documented full payload of a Pull Request being opened
DOCS_PR_OPENED: dict[str, Any] = {
    "event": {"action": "create", "scope": "discussion"},
    "repo": {"type": "model", "name": "openai-community/gpt2", "id": "621ffdc036468d709f17434d",
             "private": False,
             "url": {"web": "https://huggingface.co/openai-community/gpt2",
                     "api": "https://huggingface.co/api/models/openai-community/gpt2"},
             "owner": {"id": "628b753283ef59b5be89e937"}},
    "discussion": {
        "id": "6399f58518721fdd27fc9ca9", "title": "Update co2 emissions",
        "url": {"web": "https://huggingface.co/openai-community/gpt2/discussions/19",
                "api": "https://huggingface.co/api/models/openai-community/gpt2/discussions/19"},
        "status": "open", "author": {"id": "61d2f90c3c2083e1c08af22d"}, "num": 19,
        "isPullRequest": True, "changes": {"base": "refs/heads/main"}},
    "comment": {
        "id": "6399f58518721fdd27fc9caa", "author": {"id": "61d2f90c3c2083e1c08af22d"},
        "content": "Add co2 emissions information to the model card", "hidden": False,
        "url": {"web": "https://huggingface.co/openai-community/gpt2/discussions/19"
                       "#6399f58518721fdd27fc9caa"}},
    "webhook": {"id": "6390e855e30d9209411de93b", "version": 3}}


def repo_content(name: str, sha: str | None = None, *, refs: list[dict[str, Any]] | None = None,
                 repo_type: str = "model") -> dict[str, Any]:
    """A ``repo.content`` event (a push) built from the documented pieces, for ``name``."""
    repo = copy.deepcopy(DOCS_REPO) | {"name": name, "type": repo_type}
    updated = copy.deepcopy(DOCS_REFS if refs is None else refs)
    if sha is not None:
        repo["headSha"] = updated[0]["newSha"] = sha
    return {"event": {"action": "update", "scope": "repo.content"}, "repo": repo,
            "updatedRefs": updated, "webhook": {"id": "6390e855e30d9209411de93b", "version": 3}}
