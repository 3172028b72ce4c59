"""Talking to the Hugging Face Hub: download a repo at a resolved sha, and say why it failed.

Every huggingface_hub / network failure becomes a :class:`SourceNotFoundError` or
:class:`HubError` whose message never quotes the request, so a token cannot leak into it.
Every request has a timeout (huggingface_hub's own ``HF_HUB_DOWNLOAD_TIMEOUT`` and
``HF_HUB_ETAG_TIMEOUT``, 10 s by default) and a transient failure (5xx, 408/429, refused,
timed out) is retried after each of ``RETRY_DELAYS``: a blip is ridden out, an outage fails the
scan with ``hub_unavailable`` in bounded time instead of hanging it.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from mergeshield import cancellation
from mergeshield.disk import ensure_room
from mergeshield.errors import HubError, MergeShieldError, SourceNotFoundError, StorageFullError
from mergeshield.safetensors_io import atomic_write_text

__all__ = ["HUB_PATTERNS", "RETRY_DELAYS", "call_hub", "download_repo", "hub_failure",
           "is_offline"]

HUB_PATTERNS = ["*.safetensors", "*.json", "*.bin", "*.pt", "*.pth", "*.txt", "*.model",
                "*.tiktoken", "*.py", "README.md"]  # .py is fetched only to explain a refusal,
# never run; README.md is the model card, whose base_model is checked against the given base
RETRY_DELAYS = (1.0, 2.0, 4.0)  # seconds before each retry of a transient failure

T = TypeVar("T")


def is_offline() -> bool:
    """Whether huggingface_hub may not contact the hub (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    return (constants.is_offline_mode()
            or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"})


def call_hub(fetch: Callable[[], T], repo_id: str, revision: str | None, *,
             noun: str = "hub repo", offline: bool = False) -> T:
    """``fetch()``, retried on a transient failure; a hub or network failure is raised as our
    own error."""
    delays = iter(RETRY_DELAYS)
    while True:
        try:
            return fetch()
        except Exception as exc:
            error = hub_failure(exc, repo_id, revision, noun=noun, offline=offline)
            if error is None:
                raise
        delay = next(delays, None)
        if delay is None or offline or not _transient(error):
            # Raised outside the handler: no __context__ keeps the request (and its token) alive.
            raise error
        time.sleep(delay)


def _transient(error: Exception) -> bool:
    """A failure that may go away: the hub answered 5xx/408/429 or not at all."""
    if not isinstance(error, HubError):
        return False
    status = (error.details or {}).get("status")
    return status is None or status in (408, 429) or status >= 500


def download_repo(repo_id: str, *, repo_type: Literal["model", "dataset"] = "model",
                  revision: str | None, token: str | None, endpoint: str | None,
                  cache_dir: str | Path | None, local_files_only: bool = False,
                  patterns: list[str] | None = None, min_free_bytes: int | None = None
                  ) -> tuple[Path, str, tuple[str, ...]]:
    """(snapshot folder, commit sha, file names on the hub) of ``repo_id`` at ``revision``: the
    revision resolved once, then each file matching ``patterns`` (None: all) fetched at the sha.
    ``min_free_bytes``: refused first (InsufficientStorageError) when the files not cached yet
    would leave less free disk in the cache; None: no check.

    File by file, not ``snapshot_download``: its tree listing has no timeout at all."""
    from huggingface_hub import (
        HfApi,
        constants,
        hf_hub_download,
        snapshot_download,
        try_to_load_from_cache,
    )
    from huggingface_hub.file_download import repo_folder_name

    offline = local_files_only or is_offline()

    def fetch() -> tuple[Path, str, tuple[str, ...]]:
        if offline:
            folder = Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                                            cache_dir=cache_dir, allow_patterns=patterns,
                                            local_files_only=True))
            return folder, folder.name, ()
        api = HfApi(endpoint=endpoint, token=token)
        info = (api.model_info if repo_type == "model" else api.dataset_info)(
            repo_id, revision=revision, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
            files_metadata=min_free_bytes is not None)  # sizes, for the free-disk check
        sha = str(info.sha)
        names = tuple(s.rfilename for s in info.siblings or ())
        wanted = [s for s in info.siblings or () if patterns is None
                  or any(fnmatch.fnmatch(s.rfilename, p) for p in patterns)]
        if min_free_bytes is not None:
            need = sum(s.size or 0 for s in wanted if not isinstance(try_to_load_from_cache(
                repo_id, s.rfilename, cache_dir, sha, repo_type), str))
            ensure_room(Path(cache_dir or constants.HF_HUB_CACHE), need, min_free_bytes,
                        f"downloading {repo_id!r}")
        for name in (s.rfilename for s in wanted):
            cancellation.check()
            hf_hub_download(repo_id, name, repo_type=repo_type, revision=sha, token=token,
                            endpoint=endpoint, cache_dir=cache_dir,
                            etag_timeout=constants.HF_HUB_ETAG_TIMEOUT,
                            tqdm_class=_cancellable_bar())
        folder = (Path(cache_dir or constants.HF_HUB_CACHE)
                  / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "snapshots" / sha)
        folder.mkdir(parents=True, exist_ok=True)  # a repo with no matching file: empty
        _remember_ref(folder, revision or "main", sha)
        return folder, sha, names

    noun = "hub repo" if repo_type == "model" else "hub dataset"
    return call_hub(fetch, repo_id, revision, noun=noun, offline=offline)


@functools.cache
def _cancellable_bar() -> type[Any]:
    """A progress bar class for ``hf_hub_download`` (built once, at the first download) whose
    every update is a cancellation point: a cancelled scan stops a download between two chunks
    (the partial file stays in the hub cache's ``.incomplete``, resumed by the next download)."""
    from tqdm.auto import tqdm

    class CancellableBar(tqdm):  # type: ignore[misc]
        def update(self, n: float | None = 1) -> bool | None:
            cancellation.check()
            return super().update(n)  # type: ignore[no-any-return]

    return CancellableBar


def hub_failure(exc: Exception, repo_id: str, revision: str | None, *, noun: str = "hub repo",
                offline: bool = False) -> MergeShieldError | None:
    """Our error for a huggingface_hub / network failure; None for anything else.

    ``offline``: the hub was not to be contacted, so a cache miss is explained as such (online,
    huggingface_hub reports an unreachable hub as a cache miss too).
    """
    from huggingface_hub import errors as hf

    if isinstance(exc, MergeShieldError):
        return exc  # ours already, e.g. no room for the download: neither the hub's nor retried

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
    if isinstance(exc, OSError) and (full := StorageFullError.of(exc, repo_id)) is not None:
        return full  # the download ran out of room: not the hub's fault
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
