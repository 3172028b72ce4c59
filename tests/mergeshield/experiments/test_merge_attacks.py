"""Experiments 3 + 4: merge-and-evaluate, the SBV attacker's λ, and the runner's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergeshield.experiments.merge_attackers import (
    MergeAttackConfig,
    Setup,
    sbv_attackers,
    sbv_bvs,
    zoo_attacker,
)
from mergeshield.experiments.merge_attacks import merge_and_evaluate
from mergeshield.experiments.runner import PaperConfig, run_paper
from mergeshield.experiments.zoo_models import ZooAccess
from mergeshield.report.schema import RateModel
from mergeshield.training import FinetuneConfig
from tests.mergeshield.experiments.test_runner import _rates
from tests.support.zoo import Zoo

SMALL = MergeAttackConfig(lambdas=(1.0,), max_eval=150, select_images=150, patch_steps=3,
                          sbv_seeds=(), sbv_keeps=(0.2,), finetune=FinetuneConfig(epochs=1),
                          train_images=256, lambda_grid=(0.5, 1.0))


@pytest.fixture(scope="module")
def setup(zoo: Zoo) -> Setup:
    return Setup(ZooAccess(zoo.root), SMALL)


def test_merge_of_the_attacker_alone_at_lambda_1_is_the_attacker(setup: Setup) -> None:
    a = zoo_attacker(setup, "badnets")
    checks = {"attack": (a.trigger, a.target)}
    asr, acc = merge_and_evaluate(setup, [setup.tv(a.backbone)], "task_arithmetic", 1.0, checks)
    clf = setup.classifier("mnist", a.backbone)
    from mergeshield.evaluation import attack_success_rate

    assert asr["attack"] == attack_success_rate(clf, setup.test["mnist"], a.trigger, a.target)
    assert asr["attack"].rate > 0.5  # the zoo's planted BadNets backdoor
    assert set(acc) == {"mnist", "digits", "mnist-rot90"}
    others = [setup.tv(setup.clean[t]) for t in ("digits", "mnist-rot90")]
    for method in ("task_arithmetic", "ties"):
        asr, acc = merge_and_evaluate(setup, [setup.tv(a.backbone), *others], method, 0.5, checks)
        assert 0 <= asr["attack"].hits <= asr["attack"].total == len(
            [y for y in setup.test["mnist"].labels if y != a.target])
        assert all(r.total == len(setup.test[t]) for t, r in acc.items())


def test_sbv_attacker_keeps_clean_accuracy_within_the_budget(setup: Setup) -> None:
    bvs = sbv_bvs(setup)  # the zoo's BadNets BV only (no new pairs in SMALL)
    attackers = sbv_attackers(setup, bvs)
    assert [a.name for a in attackers] == ["sbv-p20", "sbv_sc-p20"]
    for a in attackers:
        d = a.detail
        ok = [lam for lam, acc in d["lambda_curve"] if acc >= d["select_accuracy_clean"] - 0.01]
        assert d["lambda_sbv"] == max(ok, default=0.0)
        assert a.target == setup.target and d["bvs"] == 1


def test_runner_writes_experiments_3_and_4_and_keeps_earlier_results(zoo: Zoo,
                                                                    tmp_path: Path) -> None:
    earlier = {"experiments": {"bv-arithmetic": {"curves": []}}, "timings_s": {
        "bv-arithmetic": 1.0}, "files": ["bv-arithmetic.md"], "created_at": "then"}
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    cfg = PaperConfig(out=tmp_path, zoo=zoo.root, quick=True, only=(3, 4), merging=SMALL)
    results = run_paper(cfg)
    for name in ("merge-attacks.md", "merge-attacks.png", "inherent-triggers.md",
                 "inherent-triggers.png"):
        assert (tmp_path / name).stat().st_size > 0 and name in results["files"], name
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["experiments"]["bv-arithmetic"] == {"curves": []}  # kept, marked as carried
    assert data["carried_over"]["bv-arithmetic"]["created_at"] == "then"
    assert "bv-arithmetic.md" in data["files"]
    m = data["experiments"]["merge-attacks"]
    assert {a["attack"] for a in m["attackers"]} == {"badnets", "blended", "badmerging", "sbv",
                                                     "sbv_sc"}
    assert len(m["points"]) == (1 + 5) * 2  # (clean merge + 5 attackers) × 2 methods × 1 λ
    rates = _rates(m)
    assert len(rates) > 50
    for r in rates:
        RateModel.model_validate(r)
    md = (tmp_path / "merge-attacks.md").read_text()
    assert "| attacker | merge | λ | ASR |" in md and "/" in md
    assert "ASR universal" in (tmp_path / "inherent-triggers.md").read_text()
