"""The BV_inj cache on disk: entries are listed once complete, with what they were built from."""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mergeshield import bv_cache
from mergeshield.task_vectors import TaskVector

RATE = {"hits": 9, "total": 10, "rate": 0.9, "ci95": (0.6, 0.98)}


def _store(cache: Path, key: str) -> None:
    bv = TaskVector.from_tensors({"w": torch.ones(2, 3)})
    bv_cache.store(cache, key, bv, {"mode": "per_class", "epochs": 2})


def test_a_described_entry_lists_its_recipe_base_and_own_asr(tmp_path: Path) -> None:
    _store(tmp_path, "k1")
    bv_cache.describe(tmp_path, "k1", base="org/base", base_revision="abc", data="mnist",
                      data_sha256="d" * 64, own_asr={"patch->0": RATE}, measured_on="mnist test")
    (entry,) = bv_cache.entries(tmp_path)
    assert (entry.key, entry.base, entry.base_revision) == ("k1", "org/base", "abc")
    assert entry.recipe == {"mode": "per_class", "epochs": 2}
    assert entry.own_asr["patch->0"].hits == 9 and entry.size > 0
    assert bv_cache.load(tmp_path, "k1") is not None


def test_entries_without_a_description_or_with_a_foreign_one_are_still_listed(
        tmp_path: Path) -> None:
    _store(tmp_path, "old")  # built before entry.json existed
    _store(tmp_path, "odd")
    (bv_cache.entry_dir(tmp_path, "odd") / "entry.json").write_text(json.dumps({"own_asr": 3}))
    entries = {e.key: e for e in bv_cache.entries(tmp_path)}
    assert set(entries) == {"old", "odd"}
    assert entries["old"].base is None and entries["old"].own_asr == {}
    assert entries["odd"].own_asr == {} and entries["odd"].recipe["mode"] == "per_class"


def test_half_written_entries_and_missing_caches_list_nothing(tmp_path: Path) -> None:
    assert bv_cache.entries(tmp_path / "absent") == []
    (tmp_path / "bv" / "partial").mkdir(parents=True)
    (tmp_path / "bv" / "partial" / "recipe.json").write_text("{}")  # no weights yet
    assert bv_cache.entries(tmp_path) == []
    assert bv_cache.load(tmp_path, "partial") is None


def _locked(lock: Path) -> bool:
    """Whether another holder has ``lock`` (a separate open file, as another process would)."""
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def test_a_build_holds_the_callers_guard_and_the_cache_folders_lock(tmp_path: Path) -> None:
    """A service's guard spans its own workers only; a CLI scan or another server sharing the
    cache folder must still wait, or two builders would overwrite each other's description."""
    events: list[str] = []

    @contextmanager
    def service_row(key: str) -> Iterator[None]:
        events.append(f"row {key}")
        yield
        events.append(f"row {key} released")

    lock = tmp_path / "bv" / "k1.lock"
    with bv_cache.build_guard(tmp_path, service_row)("k1"):
        events.append("building")
        assert _locked(lock)
    assert events == ["row k1", "building", "row k1 released"]
    assert not _locked(lock)
    with bv_cache.build_guard(None, service_row)("k2"):  # no cache: only the caller's guard
        assert not (tmp_path / "bv" / "k2.lock").exists()
