"""The on-disk cache of injection backdoor vectors, one folder per key.

BV_inj depends only on (base revision, injection recipe, the defender's data), so it is built once
and shared by every scan of that base (method.md, IBVS step 2). Layout:
``<cache>/bv/<key>/model.safetensors`` (float32 deltas) and ``recipe.json``. Writes are atomic, so
a reader never sees half an entry; two builders of one key write the same bytes.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from mergeshield import checkpoints
from mergeshield.task_vectors import TaskVector


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
    return TaskVector(list(ck), ck.__getitem__)


def store(cache_dir: str | Path | None, key: str, bv: TaskVector, recipe: dict[str, Any]) -> None:
    """Save BV_inj under ``key`` (no-op without a cache directory)."""
    if cache_dir is None:
        return
    folder = entry_dir(cache_dir, key)
    checkpoints.save_checkpoint(folder, ((k, bv[k]) for k in bv),
                                metadata={"mergeshield.recipe_hash": key})
    checkpoints.atomic_write_text(folder / "recipe.json", json.dumps(recipe, indent=2))


def file_guard(cache_dir: str | Path | None) -> Callable[[str], AbstractContextManager[None]]:
    """A lock per key (``flock`` on ``<cache>/bv/<key>.lock``) for builders sharing one disk."""

    @contextmanager
    def guard(key: str) -> Iterator[None]:
        if cache_dir is None:  # nothing is cached, so there is nothing to share
            yield
            return
        lock = entry_dir(cache_dir, key).parent / f"{key}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, even on a crash
            yield

    return guard
