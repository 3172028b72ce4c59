"""Talking to the Hugging Face Hub: download a repo at a resolved sha, and say why it failed.

Every huggingface_hub / network failure becomes a :class:`SourceNotFoundError` or
:class:`HubError` whose message never quotes the request, so a token cannot leak into it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mergeshield.errors import HubError, SourceNotFoundError
from mergeshield.safetensors_io import atomic_write_text

__all__ = ["HUB_PATTERNS", "call_hub", "download_model", "hub_failure", "is_offline"]

HUB_PATTERNS = ["*.safetensors", "*.json", "*.bin", "*.pt", "*.pth", "*.txt", "*.model",
                "*.tiktoken", "*.py"]  # .py is fetched only to explain a refusal, never run

T = TypeVar("T")


def is_offline() -> bool:
    """Whether huggingface_hub may not contact the hub (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    return (constants.is_offline_mode()
            or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"})


def call_hub(fetch: Callable[[], T], repo_id: str, revision: str | None, *,
             noun: str = "hub repo", offline: bool = False) -> T:
    """``fetch()``, with a hub or network failure raised as our own error."""
    try:
        return fetch()
    except Exception as exc:
        error = hub_failure(exc, repo_id, revision, noun=noun, offline=offline)
        if error is None:
            raise
    # Raised outside the handler: no __context__ keeps the request (and its token) alive.
    raise error


def download_model(repo_id: str, *, revision: str | None, token: str | None,
                   endpoint: str | None, cache_dir: str | Path | None,
                   local_files_only: bool) -> tuple[Path, str, tuple[str, ...]]:
    """(snapshot folder, commit sha, file names on the hub) of ``repo_id`` at ``revision``."""
    from huggingface_hub import HfApi, snapshot_download

    offline = local_files_only or is_offline()

    def fetch() -> tuple[Path, str, tuple[str, ...]]:
        if offline:
            folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                            allow_patterns=HUB_PATTERNS, local_files_only=True))
            return folder, folder.name, ()
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
        sha = str(info.sha)
        folder = Path(snapshot_download(repo_id, revision=sha, allow_patterns=HUB_PATTERNS,
                                        endpoint=endpoint, token=token, cache_dir=cache_dir))
        _remember_ref(folder, revision or "main", sha)
        return folder, sha, tuple(s.rfilename for s in info.siblings or ())

    return call_hub(fetch, repo_id, revision, offline=offline)


def hub_failure(exc: Exception, repo_id: str, revision: str | None, *, noun: str = "hub repo",
                offline: bool = False) -> SourceNotFoundError | HubError | None:
    """Our error for a huggingface_hub / network failure; None for anything else.

    ``offline``: the hub was not to be contacted, so a cache miss is explained as such (online,
    huggingface_hub reports an unreachable hub as a cache miss too).
    """
    from huggingface_hub import errors as hf

    where = f"{repo_id!r} at revision {revision or 'main'!r}"
    details: dict[str, Any] = {"repo": repo_id, "revision": revision,
                               "reason": type(exc).__name__}
    if isinstance(exc, hf.GatedRepoError):
        return SourceNotFoundError(f"{noun} {where} is gated: accept its terms on the hub and "
                                   "pass a token", details=details)
    if isinstance(exc, hf.RepositoryNotFoundError | hf.RevisionNotFoundError
                  | hf.RemoteEntryNotFoundError):
        return SourceNotFoundError(
            f"{noun} {where} was not found: check the repo id and revision, or pass a token "
            "with access if the repo is private", details=details)
    if isinstance(exc, hf.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        details["status"] = status
        if status in (401, 403):
            return SourceNotFoundError(f"{noun} {where}: access denied (HTTP {status}); check "
                                       "the repo id or pass a token with read access",
                                       details=details)
        return _hub_error(where, f"HTTP {status}", details)
    if isinstance(exc, hf.OfflineModeIsEnabled) or (
            offline and isinstance(exc, hf.LocalEntryNotFoundError)):
        return HubError(f"{noun} {where} is not in the local cache and the hub may not be "
                        "contacted (offline mode); run once online first", details=details)
    if isinstance(exc, OSError | ConnectionError | TimeoutError) or type(
            exc).__module__.startswith(("httpx", "httpcore")):
        return _hub_error(where, type(exc).__name__, details)
    return None


def _hub_error(where: str, reason: str, details: dict[str, Any]) -> HubError:
    return HubError(f"the hub could not serve {where} ({reason}); check the endpoint and your "
                    "connection, then retry", details=details)


def _remember_ref(snapshot: Path, revision: str, sha: str) -> None:
    """Record ``revision → sha`` in the hub cache, so offline runs resolve the revision too."""
    if revision == sha or "/" in revision or revision.startswith("."):
        return
    refs = snapshot.parent.parent / "refs"
    refs.mkdir(exist_ok=True)
    atomic_write_text(refs / revision, sha)
