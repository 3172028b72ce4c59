"""Experiment 1 on one zoo model: clean + λ·BV injects the planted backdoor."""

from __future__ import annotations

import pytest

from mergeshield.experiments.bv_arithmetic import (
    ArithmeticConfig,
    ArithmeticCurve,
    injection_curve,
    selected,
)
from mergeshield.experiments.zoo_models import ZooAccess
from tests.support.zoo import Zoo

MODEL = "vit-mnist-badnets"


@pytest.fixture(scope="module")
def curve(zoo: Zoo) -> ArithmeticCurve:
    cfg = ArithmeticConfig(lambdas=(0.0, 0.5, 1.0), models=(MODEL,))
    return injection_curve(ZooAccess(zoo.root), MODEL, cfg)


def test_clean_plus_bv_injects_the_planted_backdoor(curve: ArithmeticCurve) -> None:
    asr = [curve.point("clean", lam).asr for lam in (0.0, 0.5, 1.0)]
    assert asr[2].rate > 0.8
    assert asr[0].rate < 0.2
    assert asr[0].rate <= asr[1].rate <= asr[2].rate
    assert asr[2].rate - asr[0].rate > 0.6


def test_clean_plus_one_bv_is_the_backdoored_fine_tune(curve: ArithmeticCurve, zoo: Zoo) -> None:
    measured = zoo.model(MODEL)["measured"]
    point = curve.point("clean", 1.0)
    assert point.asr.total == measured["asr"]["total"]
    assert abs(point.asr.hits - measured["asr"]["hits"]) <= 5  # float32 rounding of θ_c + BV
    assert abs(point.clean_accuracy.hits - measured["clean_accuracy"]["hits"]) <= 5


def test_rates_keep_their_denominators(curve: ArithmeticCurve) -> None:
    data = curve.to_json()
    assert len(data["points"]) == 6  # 2 starts × 3 λ
    for p in data["points"]:
        for key in ("asr", "clean_accuracy"):
            assert p[key]["total"] > 0 and 0 <= p[key]["hits"] <= p[key]["total"]
            lo, hi = p[key]["ci95"]
            assert lo <= p[key]["rate"] <= hi


def test_selection_follows_the_manifest(zoo: Zoo) -> None:
    access = ZooAccess(zoo.root)
    names = [m["name"] for m in selected(access, ArithmeticConfig(attacks=("blended",)))]
    assert names and all(n.endswith("-blended") for n in names)
