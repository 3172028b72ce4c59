"""DAM, experiment 5's merge-time baseline: the mask's sampling and a short run on the test zoo."""

from __future__ import annotations

import torch

from mergeshield.experiments.dam import DAMConfig, dam_merge, entropy, sample_mask
from mergeshield.experiments.merge_attackers import MergeAttackConfig, Setup
from mergeshield.experiments.zoo_models import ZooAccess
from tests.support.zoo import Zoo


def test_mask_samples_are_reparameterised_and_mean_one() -> None:
    logits = {"a": torch.zeros(4, 5, requires_grad=True), "b": torch.full((7,), 3.0)}
    mask = sample_mask(logits, 0.5, torch.Generator().manual_seed(0))
    assert all(torch.isclose(m.mean(), torch.tensor(1.0)) for m in mask.values())
    assert all(bool((m >= 0).all()) for m in mask.values())
    mask["a"].sum().backward()  # the gradient reaches the logits
    assert logits["a"].grad is not None
    again = sample_mask(logits, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again["b"], mask["b"])  # seeded


def test_entropy_is_zero_when_certain_and_log_k_when_uniform() -> None:
    assert float(entropy(torch.tensor([[100.0, 0.0, 0.0]]))) < 1e-6
    assert torch.isclose(entropy(torch.zeros(2, 4)), torch.log(torch.tensor(4.0)))


def test_dam_merge_learns_a_mask_and_keeps_every_tensor(zoo: Zoo) -> None:
    setup = Setup(ZooAccess(zoo.root), MergeAttackConfig(max_eval=50, select_images=50))
    tvs = [setup.tv(setup.clean[t]) for t in setup.tasks]
    images = {t: setup.zoo.task(t).train.images[:64] for t in setup.tasks}
    clfs = {t: setup.clf[t] for t in setup.tasks}
    cfg = DAMConfig(steps=3, images=64, lr=0.5)
    theta = dam_merge(clfs, setup.base, tvs, 0.5, images, cfg)
    assert set(theta) == set(setup.base)
    plain = {k: setup.base[k] + 0.5 * sum(tv[k] for tv in tvs) for k in setup.keys}
    moved = [k for k in setup.keys if not torch.allclose(theta[k], plain[k])]
    assert moved  # the mask is not all ones: some parameters are scaled down or up
    assert all(bool(torch.isfinite(theta[k]).all()) for k in theta)
    again = dam_merge(clfs, setup.base, tvs, 0.5, images, cfg)
    assert all(torch.equal(theta[k], again[k]) for k in theta)  # seeded end to end
