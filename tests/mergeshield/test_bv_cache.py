"""The BV_inj cache on disk: entries are listed once complete, with what they were built from."""

from __future__ import annotations

import json
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
