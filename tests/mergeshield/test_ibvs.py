"""ibvs.py: the injection recipe and its cache key, poisoning, focus, sanitise and choosing λ."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError

from mergeshield.errors import ConfigError
from mergeshield.evaluation import Rate, attack_success_rate, clean_accuracy
from mergeshield.ibvs import (
    Focus,
    InjectionRecipe,
    SweepPoint,
    build_injection_bv,
    choose_lambda,
    focus,
    injected_backdoors,
    poison_many,
    sanitise,
    sweep,
)
from mergeshield.task_vectors import TaskVector, top_k
from mergeshield.training import FinetuneConfig, finetune, paired_finetune
from mergeshield.triggers import PatchTrigger, poison, stamp, trigger_id
from tests.support.tiny import IMAGE, TinyNet, block_task, tv_of


# -- the recipe and its cache key -----------------------------------------------------------------
def test_recipe_digest_is_stable_and_tracks_recipe_base_and_data() -> None:
    recipe = InjectionRecipe()
    key = recipe.digest("rev-a", "sha-1")
    assert key == InjectionRecipe().digest("rev-a", "sha-1") == recipe.digest("rev-a", "sha-1")
    assert len(key) == 64
    others = {
        InjectionRecipe(seed=1).digest("rev-a", "sha-1"),
        InjectionRecipe(poison_rate=0.2).digest("rev-a", "sha-1"),
        InjectionRecipe(mode="single", triggers=[PatchTrigger()]).digest("rev-a", "sha-1"),
        recipe.digest("rev-b", "sha-1"),
        recipe.digest("rev-a", "sha-2"),
    }
    assert key not in others and len(others) == 5


def test_recipe_is_frozen_and_strict() -> None:
    recipe = InjectionRecipe()
    with pytest.raises(ValidationError):
        recipe.epochs = 9  # type: ignore[misc]
    with pytest.raises(ValidationError):
        InjectionRecipe(epoch=3)  # type: ignore[call-arg]
    cfg = InjectionRecipe(epochs=2, lr=0.01, batch_size=8, seed=5).finetune_config()
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed) == (2, 0.01, 8, 5)


def test_per_class_mode_plants_one_distinct_trigger_per_class() -> None:
    pairs = injected_backdoors(InjectionRecipe(), n_classes=5, image_size=28)
    assert [t for _, t in pairs] == [0, 1, 2, 3, 4]
    assert len({trigger_id(trig) for trig, _ in pairs}) == 5
    assert all(isinstance(trig, PatchTrigger) and trig.size == 3 for trig, _ in pairs)  # 28/9
    images = torch.rand(2, 3, 28, 28)
    stamped = [stamp(images, trig) for trig, _ in pairs]
    assert all(not torch.equal(stamped[0], s) for s in stamped[1:])


def test_single_mode_pairs_every_trigger_with_every_target() -> None:
    trigs = [PatchTrigger(location="top_left"), PatchTrigger(pattern="solid")]
    recipe = InjectionRecipe(mode="single", triggers=trigs, targets=[1, 3])
    assert injected_backdoors(recipe, 4, 16) == [(trigs[0], 1), (trigs[0], 3),
                                                  (trigs[1], 1), (trigs[1], 3)]


@pytest.mark.parametrize("recipe", [
    InjectionRecipe(mode="single"),  # no trigger
    InjectionRecipe(mode="single", triggers=[PatchTrigger()], targets=[4]),  # not a class
])
def test_single_mode_errors(recipe: InjectionRecipe) -> None:
    with pytest.raises(ConfigError):
        injected_backdoors(recipe, 4, 16)


@pytest.mark.parametrize("fields", [
    {"targets": [-1]}, {"epochs": 10**8}, {"lr": float("nan")}, {"poison_rate": 0},
    {"seed": 2**32}, {"max_train": 10**12}, {"triggers": [PatchTrigger()] * 33}])
def test_a_recipe_out_of_bounds_is_refused_when_made(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        InjectionRecipe(mode="single", **fields)


# -- poisoning ------------------------------------------------------------------------------------
def test_poison_many_stamps_exact_counts_and_never_a_row_of_its_own_target() -> None:
    data = block_task(200, n_classes=4)
    pairs = injected_backdoors(InjectionRecipe(), 4, IMAGE)
    out = poison_many(data, pairs, rate=0.2, seed=3)
    changed = (out.images != data.images).flatten(1).any(1)
    assert int(changed.sum()) == 40  # 0.2 · 200, split evenly: 10 per trigger
    assert torch.equal(out.labels[~changed], data.labels[~changed])
    for trig, target in pairs:
        mine = changed & torch.isclose(out.images, stamp(data.images, trig)).flatten(1).all(1)
        assert int(mine.sum()) == 10
        assert bool((out.labels[mine] == target).all())
        assert bool((data.labels[mine] != target).all())
    assert out.classes == data.classes
    assert torch.equal(data.images, block_task(200, n_classes=4).images)  # the input is untouched


def test_poison_many_is_deterministic_per_seed() -> None:
    data = block_task(120, n_classes=4)
    pairs = injected_backdoors(InjectionRecipe(), 4, IMAGE)
    a, b = poison_many(data, pairs, 0.3, seed=0), poison_many(data, pairs, 0.3, seed=0)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = poison_many(data, pairs, 0.3, seed=1)
    assert not torch.equal(a.images, c.images)


def test_poison_many_at_rate_zero_poisons_nothing() -> None:
    data = block_task(80, n_classes=4)
    out = poison_many(data, injected_backdoors(InjectionRecipe(), 4, IMAGE), 0.0, seed=0)
    assert torch.equal(out.images, data.images) and torch.equal(out.labels, data.labels)


# -- focus and sanitise ---------------------------------------------------------------------------
BV = {"w": [0.5, -2.0, 1.0, -0.25], "b": [3.0, -0.125], "head": [9.0]}
TAU = {"w": [1.0, 1.0, -1.0, -1.0], "b": [2.0, 0.0]}


def test_plain_focus_is_the_bv_restricted_to_the_suspect_tensors() -> None:
    got = focus(tv_of(BV), tv_of(TAU), Focus(keep=1.0, agree_with_suspect=False))
    assert list(got) == ["w", "b"]
    want = tv_of(BV).restrict(["w", "b"])
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_focus_keeps_only_entries_whose_sign_agrees_with_the_suspect() -> None:
    got = focus(tv_of(BV), tv_of(TAU), Focus(keep=1.0, agree_with_suspect=True))
    assert got["w"].tolist() == [0.5, 0.0, 0.0, -0.25]
    assert got["b"].tolist() == [3.0, 0.0]  # τ = 0 has no sign to agree with


def test_focus_trims_then_masks() -> None:
    got = focus(tv_of(BV), tv_of(TAU), Focus(keep=0.5, agree_with_suspect=True))
    trimmed = top_k(tv_of(BV).restrict(["w", "b"]), 0.5)  # 3 of 6: 3.0, -2.0, 1.0
    assert trimmed["w"].tolist() == [0.0, -2.0, 1.0, 0.0]
    assert got["w"].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert got["b"].tolist() == [3.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sanitise_with_lambda_zero_is_identity(dtype: torch.dtype) -> None:
    suspect = {"w": torch.randn(4).to(dtype), "b": torch.randn(2).to(dtype),
               "classifier": torch.randn(3).to(dtype), "ids": torch.arange(3)}
    out = dict(sanitise(suspect, tv_of(TAU), 0.0))
    assert list(out) == list(suspect)
    assert all(torch.equal(out[k], suspect[k]) and out[k].dtype == suspect[k].dtype
               for k in suspect)


def test_sanitise_subtracts_lambda_times_the_bv() -> None:
    suspect = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([0.0, 1.0]),
               "classifier": torch.ones(3)}
    out = dict(sanitise(suspect, tv_of(TAU), 0.5))
    assert out["w"].tolist() == [0.5, 1.5, 3.5, 4.5]
    assert out["b"].tolist() == [-1.0, 1.0]
    assert torch.equal(out["classifier"], torch.ones(3))
    assert suspect["w"].tolist() == [1.0, 2.0, 3.0, 4.0]  # the suspect is not modified


# -- λ sweep and choice ---------------------------------------------------------------------------
def point(lam: float, hits: int, total: int = 100) -> SweepPoint:
    return SweepPoint(lam, Rate(hits, total), {"t": Rate(0, 10)})


def test_sweep_always_starts_at_zero_and_deduplicates() -> None:
    seen: list[float] = []

    def evaluate(lam: float) -> SweepPoint:
        seen.append(lam)
        return point(lam, 90)

    points = sweep(evaluate, [2.0, 0.5, 1.0, 0.5])
    assert seen == [0.0, 0.5, 1.0, 2.0]
    assert [p.lam for p in points] == seen


def test_sweep_rejects_negative_lambdas_before_evaluating_anything() -> None:
    seen: list[float] = []
    with pytest.raises(ConfigError):
        sweep(lambda lam: seen.append(lam) or point(lam, 90), [0.5, -1.0])
    assert seen == []


def test_choose_lambda_picks_the_largest_lambda_within_budget() -> None:
    curve = [point(0.0, 90), point(0.5, 89), point(1.0, 88), point(2.0, 80)]
    assert choose_lambda(curve, budget_points=2.5) == 1.0
    assert choose_lambda(curve, budget_points=1.5) == 0.5
    assert choose_lambda(curve, budget_points=0.0) == 0.0


def test_choose_lambda_on_a_non_monotone_curve() -> None:
    curve = [point(0.0, 90), point(1.0, 80), point(2.0, 89), point(3.0, 70)]
    assert choose_lambda(curve, budget_points=2.0) == 2.0
    assert choose_lambda([point(0.0, 50), point(1.0, 60)]) == 1.0  # a gain is within budget


def test_choose_lambda_accepts_a_drop_of_exactly_the_budget() -> None:
    assert choose_lambda([point(0.0, 90), point(1.0, 88)], budget_points=2.0) == 1.0


def test_choose_lambda_needs_the_zero_reference() -> None:
    with pytest.raises(ConfigError):
        choose_lambda([point(1.0, 90)])


# -- the science, on a tiny seeded run ------------------------------------------------------------
ATTACK = PatchTrigger(pattern="checkerboard", size=3, location="bottom_right")
TUNE = FinetuneConfig(epochs=5, batch_size=64, lr=1e-2)


class Scenario:
    """A pre-trained TinyNet, an attacker's paired (clean, backdoored) fine-tune, and the
    defender's own per-class injection BV built on the same task data."""

    def __init__(self) -> None:
        pre = TinyNet(4)
        finetune(pre, block_task(256, seed=5), TUNE, train_head=True)
        self.pre = {k: v.detach().clone() for k, v in pre.state_dict().items()}
        self.train, self.test = block_task(512, seed=0), block_task(200, seed=1)
        poisoned, _ = poison(self.train, ATTACK, target=0, rate=0.1, seed=0)
        self.clean, self.bd = paired_finetune(self.make, self.train, poisoned, TUNE)
        self.recipe = InjectionRecipe(epochs=5, lr=1e-2, max_train=512)
        self.bv_inj = build_injection_bv(self.make, self.train, self.recipe)

    def make(self) -> TinyNet:
        clf = TinyNet(4)
        clf.load_state_dict(self.pre)
        return clf

    def rates(self, backbone: dict[str, torch.Tensor]) -> tuple[float, float]:
        clf = self.make()
        clf.load_backbone(backbone)
        return (clean_accuracy(clf, self.test).rate,
                attack_success_rate(clf, self.test, ATTACK, 0).rate)


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return Scenario()


def test_injection_bv_covers_the_backbone(scenario: Scenario) -> None:
    bv = scenario.bv_inj
    assert list(bv) == list(scenario.make().backbone_state())
    assert bv.norm() > 0


def test_ibvs_removes_the_attack_and_a_random_direction_does_not(scenario: Scenario) -> None:
    clean_acc, bd_asr = scenario.rates(scenario.bd)
    assert clean_acc > 0.9 and bd_asr > 0.8  # the planted backdoor works
    assert scenario.rates(scenario.clean)[1] < 0.2
    acc, asr = scenario.rates(dict(sanitise(scenario.bd, scenario.bv_inj, 1.0)))
    assert asr < 0.3 and acc > clean_acc - 0.05, (acc, asr)
    gen = torch.Generator().manual_seed(0)
    noise = TaskVector.from_tensors({k: torch.randn(v.shape, generator=gen)
                                     for k, v in scenario.bv_inj.items()})
    same_norm = noise * (scenario.bv_inj.norm() / noise.norm())
    assert scenario.rates(dict(sanitise(scenario.bd, same_norm, 1.0)))[1] > 0.8
