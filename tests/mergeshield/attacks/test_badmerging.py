"""attacks/badmerging.py: the feature-interpolation loss, exact α=0 reduction, merge robustness."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mergeshield.attacks.badmerging import ALPHA, R_RANGE, badmerging_finetune, head_features
from mergeshield.attacks.badnets import badnets, badnets_trigger
from mergeshield.data import ImageDataset
from mergeshield.errors import ConfigError
from mergeshield.evaluation import attack_success_rate, clean_accuracy
from mergeshield.models import Classifier, HFImageFamily
from mergeshield.task_vectors import TaskVector
from mergeshield.training import FinetuneConfig, finetune
from tests.support.tiny import TinyNet, block_task, vit_config

TRIGGER = badnets_trigger(size=3)
TARGET = 0


@pytest.fixture(scope="module")
def train() -> ImageDataset:
    return block_task(512, seed=0)


@pytest.fixture(scope="module")
def make(train: ImageDataset) -> Callable[[], TinyNet]:
    """Fresh copies of a "pre-trained" TinyNet (width 128) with its task head."""
    torch.manual_seed(0)
    base = TinyNet(4, seed=0, width=128)
    finetune(base, train, FinetuneConfig(epochs=2, lr=3e-3), train_head=True)
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def fresh() -> TinyNet:
        m = TinyNet(4, seed=0, width=128)
        m.load_state_dict(state)
        return m

    return fresh


def test_defaults_follow_method_md() -> None:
    assert ALPHA == 5.0 and R_RANGE == (0.2, 1.0)


def test_alpha_zero_is_exactly_the_plain_finetune(make: Callable[[], TinyNet],
                                                  train: ImageDataset) -> None:
    cfg = FinetuneConfig(epochs=1, lr=3e-3, seed=2)
    plain = finetune(make(), train, cfg)
    ours = badmerging_finetune(make(), make(), train, TRIGGER, TARGET, cfg, alpha=0.0)
    assert plain.keys() == ours.keys()
    assert all(torch.equal(plain[k], ours[k]) for k in plain)


def test_survives_the_down_scaling_of_a_merge(make: Callable[[], TinyNet], train: ImageDataset
                                              ) -> None:
    """BadMerging's claim on a seeded tiny run: θ_pre + 0.5·τ keeps the backdoor (measured ASR
    1.00, CA 0.99) where plain BadNets poisoning loses it (measured ASR 0.00)."""
    test = block_task(256, seed=1)
    poisoned, _ = badnets(train, TARGET, TRIGGER)
    cfg = FinetuneConfig(epochs=10, lr=3e-3)
    pre = make()
    theta_pre = {k: v.clone() for k, v in pre.backbone_state().items()}
    head_before = pre.head().weight.clone()

    def at_half(theta: dict[str, torch.Tensor]) -> Classifier:
        m = make()
        m.load_backbone(TaskVector.between(theta_pre, theta).apply_to(theta_pre, 0.5))
        return m

    bm = at_half(badmerging_finetune(make(), pre, poisoned, TRIGGER, TARGET, cfg))
    plain = at_half(finetune(make(), poisoned, cfg))
    assert attack_success_rate(bm, test, TRIGGER, TARGET).rate > 0.8
    assert clean_accuracy(bm, test).rate > 0.9
    assert attack_success_rate(plain, test, TRIGGER, TARGET).rate < 0.3
    assert all(torch.equal(v, theta_pre[k]) for k, v in pre.backbone_state().items())
    assert torch.equal(pre.head().weight, head_before)  # θ_pre and the shared head stay frozen


def test_bad_arguments_are_refused(make: Callable[[], TinyNet], train: ImageDataset) -> None:
    cfg = FinetuneConfig(epochs=1)
    with pytest.raises(ConfigError, match="r_range"):
        badmerging_finetune(make(), make(), train, TRIGGER, TARGET, cfg, r_range=(0.5, 0.2))
    with pytest.raises(ConfigError, match="class index"):
        badmerging_finetune(make(), make(), train, TRIGGER, 4, cfg)


# -- the hf_image family (ViT): features are the CLS token the classifier reads -------------------
@pytest.fixture(scope="module")
def vit() -> Callable[[], Classifier]:
    family = HFImageFamily(vit_config(3).to_dict(), None)
    weights = family.initial_weights(3)
    return lambda: family.classifier(weights, weights, ("c0", "c1", "c2"))


def test_vit_feature_interpolation_trains_and_leaves_no_hooks(vit: Callable[[], Classifier]
                                                              ) -> None:
    data = block_task(64, n_classes=3, seed=0)
    pre = vit()
    assert head_features(pre, data.images[:5]).shape == (5, 16)  # (N, hidden) CLS features
    cfg = FinetuneConfig(epochs=1, batch_size=32, lr=1e-2)
    plain = badmerging_finetune(vit(), pre, data, TRIGGER, 1, cfg, alpha=0.0)
    clf = vit()
    ours = badmerging_finetune(clf, pre, data, TRIGGER, 1, cfg)
    assert any(not torch.equal(plain[k], ours[k]) for k in ours)  # the α term moved the backbone
    assert not clf.head()._forward_pre_hooks and not pre.head()._forward_pre_hooks
    assert torch.equal(clf.head().weight, pre.head().weight)  # the head is shared and frozen
