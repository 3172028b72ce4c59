"""The quick zoo, built once per test run (about two minutes on 2 cores), and one BV_inj cache.

Under pytest-xdist the workers share both: the first to need the zoo builds it under a file lock in
the run's common temporary folder, the others wait for it and read it.

Set ``MERGESHIELD_TEST_ZOO=/path`` to reuse a zoo built earlier with ``mergeshield zoo build
/path --quick`` (handy while developing). ``scripts/test`` (and so CI) builds a fresh one that way
beside the linters and sets it; pytest run alone builds it here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock
from transformers import AutoModelForImageClassification

from mergeshield.data import load_task
from mergeshield.triggers import parse_trigger, triggered_test_set
from mergeshield.zoo import ZooConfig, build_zoo


@dataclass(frozen=True)
class Zoo:
    root: Path
    manifest: dict[str, Any]

    @classmethod
    def read(cls, root: Path) -> Zoo:
        """The zoo built in ``root`` (its manifest)."""
        return cls(root, json.loads((root / "manifest.json").read_text()))

    def model(self, name: str) -> dict[str, Any]:
        return next(m for m in self.manifest["models"] if m["name"] == name)

    def path(self, name: str) -> Path:
        return self.root / self.model(name)["path"]

    def dataset(self, model_name: str) -> Path:
        return self.root / self.model(model_name)["dataset"]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    given = os.environ.get("MERGESHIELD_TEST_ZOO")
    if given and (Path(given) / "manifest.json").is_file():
        return Zoo.read(Path(given))
    root = shared_tmp(tmp_path_factory) / "zoo"
    with FileLock(f"{root}.lock"):  # a build that died half-way wrote no manifest: built again
        if (root / "manifest.json").is_file():
            return Zoo.read(root)
        threads = torch.get_num_threads()  # one under xdist: the build may use every core
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            return Zoo(root, build_zoo(root, ZooConfig.for_speed(quick=True)))
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bv_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One injection-BV cache for the run: BV_inj is built once per (base, recipe, data) (the
    cache locks each key, so xdist workers share it safely)."""
    root = shared_tmp(tmp_path_factory) / "cache"
    root.mkdir(exist_ok=True)
    return root


def shared_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This run's temporary folder, the one every xdist worker's own folder is in."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


def independent_asr(folder: Path, zoo: Zoo, name: str) -> tuple[float, float]:
    """ASR of ``name``'s planted trigger and clean accuracy of the checkpoint in ``folder``,
    through transformers' own loader (not ours)."""
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    attack = zoo.model(name)["attack"]
    test = load_task(str(zoo.dataset(name))).test
    stamped = triggered_test_set(test, parse_trigger(attack["trigger"]), attack["target"])
    with torch.no_grad():
        asr = (model(pixel_values=(stamped.images - 0.5) / 0.5).logits.argmax(-1)
               == attack["target"]).float().mean().item()
        acc = (model(pixel_values=(test.images - 0.5) / 0.5).logits.argmax(-1)
               == test.labels).float().mean().item()
    return asr, acc
