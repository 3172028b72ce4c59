"""The on-disk cache of injection backdoor vectors, one folder per key.

BV_inj depends only on (base revision, injection recipe, the defender's data), so it is built once
and shared by every scan of that base (method.md, IBVS step 2). Layout:
``<cache>/bv/<key>/model.safetensors`` (float32 deltas), ``recipe.json`` and ``entry.json`` (what it
was built from and its own ASR: see ``CacheEntry``). Writes are atomic, so a reader never sees half
an entry; two builders of one key write the same bytes.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergeshield import checkpoints
from mergeshield.report.schema import RateModel
from mergeshield.task_vectors import TaskVector


class CacheEntry(BaseModel):
    """One cached BV_inj as the cache describes it (``entries``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    recipe: dict[str, Any]
    built_at: str  # ISO 8601, UTC (the weights' file time for entries without entry.json)
    size: int  # bytes of model.safetensors
    base: str | None = None  # the base model as the building scan named it
    base_revision: str | None = None  # commit sha, or sha256 of its weight files
    data: str | None = None  # the injection data's name
    data_sha256: str | None = None
    # the injected model θ_inj_bd's ASR for each of its (trigger -> target), measured on
    # ``measured_on`` when it was built: whether the injection behind the cached vector took
    own_asr: dict[str, RateModel] = Field(default_factory=dict)
    measured_on: str | None = None


def entry_dir(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "bv" / key


def load(cache_dir: str | Path | None, key: str) -> TaskVector | None:
    """The cached BV_inj for ``key``, read lazily, or None."""
    if cache_dir is None:
        return None
    folder = entry_dir(cache_dir, key)
    if not (folder / "model.safetensors").is_file():
        return None
    ck = checkpoints.open_checkpoint(checkpoints.resolve(str(folder / "model.safetensors")))
    return TaskVector.stored(ck)


def store(cache_dir: str | Path | None, key: str, bv: TaskVector, recipe: dict[str, Any]) -> None:
    """Save BV_inj under ``key`` (no-op without a cache directory)."""
    if cache_dir is None:
        return
    folder = entry_dir(cache_dir, key)
    checkpoints.save_checkpoint(folder, ((k, bv[k]) for k in bv),
                                metadata={"mergeshield.recipe_hash": key})
    checkpoints.atomic_write_text(folder / "recipe.json", json.dumps(recipe, indent=2))


def describe(cache_dir: str | Path | None, key: str, **info: Any) -> None:
    """Record what ``key``'s entry was built from and its own ASR (``CacheEntry`` fields)."""
    if cache_dir is None:
        return
    folder = entry_dir(cache_dir, key)
    record = {"built_at": datetime.now(UTC).isoformat(timespec="seconds"), **info}
    checkpoints.atomic_write_text(folder / "entry.json", json.dumps(record, indent=2))


def own_asr(cache_dir: str | Path | None, key: str) -> dict[str, RateModel]:
    """The own ASR ``describe`` recorded for ``key``'s entry ({} when none was recorded)."""
    if cache_dir is None:
        return {}
    path = entry_dir(cache_dir, key) / "entry.json"
    try:
        recorded = json.loads(path.read_text()).get("own_asr") or {}
        return {k: RateModel.model_validate(v) for k, v in recorded.items()}
    except (OSError, ValueError, AttributeError):  # absent, or written by another version
        return {}


def entries(cache_dir: str | Path) -> list[CacheEntry]:
    """Every complete entry in the cache, newest first (half-written ones are not listed)."""
    root = Path(cache_dir) / "bv"
    out = []
    for folder in root.iterdir() if root.is_dir() else ():
        weights = folder / "model.safetensors"
        if not (weights.is_file() and (folder / "recipe.json").is_file()):
            continue
        stat = weights.stat()
        record: dict[str, Any] = {
            "built_at": datetime.fromtimestamp(stat.st_mtime, UTC).isoformat(timespec="seconds")}
        if (folder / "entry.json").is_file():
            record |= json.loads((folder / "entry.json").read_text())
        record |= {"key": folder.name, "size": stat.st_size,
                   "recipe": json.loads((folder / "recipe.json").read_text())}
        try:
            out.append(CacheEntry.model_validate(record))
        except ValidationError:  # written by another scanner version: list what is certain
            out.append(CacheEntry(key=folder.name, recipe=record["recipe"],
                                  built_at=str(record["built_at"]), size=stat.st_size))
    return sorted(out, key=lambda e: e.built_at, reverse=True)


def build_guard(cache_dir: str | Path | None,
                outer: Callable[[str], AbstractContextManager[None]] | None = None,
                ) -> Callable[[str], AbstractContextManager[None]]:
    """Held while one key's BV_inj is built: ``outer`` (a service's database row, spanning its
    own workers), then a ``flock`` on ``<cache>/bv/<key>.lock`` spanning every process that shares
    this cache folder (a CLI scan beside a server, two servers on one disk)."""

    @contextmanager
    def guard(key: str) -> Iterator[None]:
        with outer(key) if outer else nullcontext():
            if cache_dir is None:  # nothing is cached, so there is nothing to share
                yield
                return
            lock = entry_dir(cache_dir, key).parent / f"{key}.lock"
            lock.parent.mkdir(parents=True, exist_ok=True)
            with open(lock, "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, even on a crash
                yield

    return guard
