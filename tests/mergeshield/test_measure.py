"""measure.py's savings keep the numbers: the reference's rates read from the cache, the sweep's
λ = 0 read from the suspect's own measurement, θ − λ·BV loaded one tensor at a time."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mergeshield.ibvs import Shifted
from mergeshield.pipeline import ScanContext, ScanRequest, scan
from mergeshield.task_vectors import TaskVector
from mergeshield.unlearning import UnlearnConfig
from tests.support.zoo import Zoo


def test_shifted_is_the_dict_it_replaces() -> None:
    gen = torch.Generator().manual_seed(0)
    theta = {f"w{i}": torch.randn(4, 3, generator=gen) for i in range(3)}
    bv = TaskVector.from_tensors({k: torch.randn(v.shape, generator=gen)
                                  for k, v in theta.items()})
    lazy = Shifted(theta, bv, 0.75)
    eager = {k: theta[k] - 0.75 * bv[k] for k in bv}
    assert list(lazy) == list(eager) and len(lazy) == 3 and "w1" in lazy and "x" not in lazy
    assert all(torch.equal(lazy[k], eager[k]) for k in eager)


def test_a_second_scan_reads_the_references_rates_and_reports_the_same(zoo: Zoo,
                                                                       tmp_path: Path) -> None:
    name = "vit-mnist-clean"
    base = zoo.path(zoo.model(name)["base"])
    request = ScanRequest(suspect=str(zoo.path(name)), base=str(base),
                          evaluation=str(zoo.dataset(name)), inversion=False, max_eval=300,
                          lambdas=[0.0, 1.0], unlearning=UnlearnConfig(enabled=False))
    first = scan(request, ScanContext(cache_dir=tmp_path))
    stored = {p.name: json.loads(p.read_text())["search"]
              for p in (tmp_path / "reference").iterdir()}
    kinds = sorted({s["kind"] for s in stored.values()})
    assert kinds == ["asr", "clean_accuracy"]
    # 9 probes and one injected trigger per class, each at one target on the reference
    assert sum(s["kind"] == "asr" for s in stored.values()) == len(first.metrics.triggers)
    again = scan(request, ScanContext(cache_dir=tmp_path))
    assert {p.name for p in (tmp_path / "reference").iterdir()} == set(stored)
    assert again.metrics == first.metrics and again.sweep == first.sweep
    # the sweep's λ = 0 is the suspect as measure_suspect measured it
    assert first.sweep is not None and first.sweep.points[0].lam == 0.0
    zero = first.sweep.points[0]
    assert zero.clean_accuracy == first.metrics.clean_accuracy_before
    before = {t.id: t.asr_before for t in first.metrics.triggers}
    assert all(before[i] == r for i, r in zero.asr.items() if not i.startswith("probe:"))
