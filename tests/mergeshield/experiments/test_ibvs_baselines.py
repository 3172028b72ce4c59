"""Experiment 5: subtraction, same-norm random directions, the oracle BV, and reusing
experiment 3's attackers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mergeshield.experiments import merge_attacks
from mergeshield.experiments.dam import DAMConfig
from mergeshield.experiments.ibvs_baselines import (
    IBVSConfig,
    oracle_bv,
    random_direction,
    run,
    subtract,
)
from mergeshield.experiments.merge_attackers import MergeAttackConfig, Setup, zoo_attacker
from mergeshield.experiments.zoo_models import ZooAccess
from mergeshield.ibvs import InjectionRecipe
from mergeshield.task_vectors import TaskVector
from mergeshield.triggers import PatchTrigger
from tests.support.zoo import Zoo


@pytest.fixture(scope="module")
def setup(zoo: Zoo) -> Setup:
    return Setup(ZooAccess(zoo.root), MergeAttackConfig(max_eval=50, select_images=50))


def _bv(setup: Setup) -> TaskVector:
    gen = torch.Generator().manual_seed(3)
    return TaskVector.from_tensors({k: torch.randn(setup.base[k].shape, generator=gen)
                                    for k in setup.keys})


def test_random_direction_has_the_same_norm_and_is_seeded(setup: Setup) -> None:
    bv = _bv(setup)
    r0, r0b, r1 = (random_direction(bv, s) for s in (0, 0, 1))
    assert r0.norm() == pytest.approx(bv.norm(), rel=1e-5)
    assert set(r0) == set(bv)
    assert all(torch.equal(r0[k], r0b[k]) for k in r0)
    assert not all(torch.equal(r0[k], r1[k]) for k in r0)


def test_lambda_zero_is_the_identity(setup: Setup) -> None:
    theta = setup.clean[setup.cfg.task]
    out = subtract(theta, _bv(setup), 0.0)
    assert set(out) == set(theta)
    assert all(torch.equal(out[k], theta[k].float()) for k in theta)


def test_oracle_subtraction_of_clean_plus_bv_gives_back_clean(setup: Setup) -> None:
    a = zoo_attacker(setup, "badnets")
    bv = oracle_bv(setup, a)
    clean = setup.clean[setup.cfg.task]
    planted = bv.apply_to(clean, 1.0)  # exactly clean + BV
    back = subtract(planted, bv, 1.0)
    for k in clean:
        torch.testing.assert_close(back[k], clean[k].float(), rtol=0, atol=1e-5)
    # and the oracle of the zoo's attacker is its own difference to the clean fine-tune
    back = subtract(a.backbone, bv, 1.0)
    for k in clean:
        torch.testing.assert_close(back[k], clean[k].float(), rtol=0, atol=1e-5)


def test_experiment_5_reuses_experiment_3s_attackers(zoo: Zoo) -> None:
    """The runner hands experiment 3's attackers to experiment 5, which picks its own and builds
    none; attackers built for another configuration are refused."""
    from tests.mergeshield.experiments.test_merge_attacks import SMALL

    access = ZooAccess(zoo.root)
    built = merge_attacks.run(access, SMALL).built
    assert [a.name for a in built.pick(("sbv",), (0.2,))] == ["sbv-p20"]  # one BV: SBV_SC = SBV
    assert [a.name for a in built.pick(("badnets", "blended"), (0.1,))] == ["badnets", "blended"]
    patch = PatchTrigger(pattern="random", size=3, location="bottom_right", seed=7)
    cfg = IBVSConfig(merge=SMALL, merge_lambda=1.0, lambdas=(0.0, 1.0), random_seeds=(0,),
                     recipes={"single": InjectionRecipe(mode="single", targets=(0,),
                                                        triggers=(patch,), epochs=1)},
                     attacks=("badnets", "sbv"), sbv_keeps=(0.2,),
                     dam=DAMConfig(steps=2, images=32))
    res = run(access, cfg, built=built)
    assert [a["name"] for a in res.attackers] == ["badnets", "sbv-p20"]
    assert {(p.attacker, p.method) for p in res.points if p.defence == "dam"} == {
        ("badnets", "task_arithmetic"), ("sbv-p20", "task_arithmetic")}  # DAM: a TA merge
    assert res.seconds["build_attackers"] < 1.0  # nothing fine-tuned or optimised again
    a = next(a for a in built.attackers if a.name == "sbv-p20")
    assert res.attackers[1]["oracle_bv_norm"] == pytest.approx(oracle_bv(Setup(access, SMALL),
                                                                          a).norm())
    with pytest.raises(ValueError, match="another configuration"):
        run(access, replace(cfg, merge=replace(SMALL, patch_steps=4)), built=built)
