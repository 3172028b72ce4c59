"""attacks/inherent.py: a universal patch flips the base model; a random patch does not."""

from __future__ import annotations

import pytest
import torch

from mergeshield.attacks.badmerging import universal_patch as badmerging_patch
from mergeshield.attacks.inherent import (
    inherent_patch,
    patch_origin,
    patch_side,
    random_patch,
    universal_patch,
)
from mergeshield.data import ImageDataset
from mergeshield.errors import ConfigError
from mergeshield.evaluation import attack_success_rate
from mergeshield.training import FinetuneConfig, finetune
from mergeshield.triggers import ImageTrigger, stamp
from tests.support.tiny import TinyNet, block_task

SIZE = 0.14  # 6×6 px of 16×16: the smallest patch that reliably flips the tiny MLP


@pytest.fixture(scope="module")
def base() -> TinyNet:
    """A "pre-trained" model: TinyNet fit (backbone and head) on the block task."""
    torch.manual_seed(0)
    model = TinyNet(4, seed=0)
    finetune(model, block_task(512, seed=0), FinetuneConfig(epochs=1, lr=3e-3), train_head=True)
    for p in model.parameters():
        p.grad = None  # so the test can see that the patch search leaves no gradients behind
    return model


@pytest.fixture(scope="module")
def test_set() -> ImageDataset:
    return block_task(256, seed=1)


def test_geometry_matches_badmerging_defaults() -> None:
    assert patch_side(0.01, 224, 224) == 22  # ~1% of a 224×224 image
    assert patch_origin("bottom_right", 22, 224, 224) == (202, 202)  # flush with the corner
    assert patch_origin((3, 4), 2, 16, 16) == (3, 4)
    with pytest.raises(ConfigError, match="does not fit"):
        patch_origin((15, 0), 3, 16, 16)
    with pytest.raises(ConfigError, match="size_frac"):
        patch_side(0.0, 16, 16)


def test_random_patch_is_seeded_and_sized_like_the_universal_one() -> None:
    a, b = random_patch((1, 16, 16), size_frac=SIZE), random_patch((1, 16, 16), size_frac=SIZE)
    assert a == b and a != random_patch((1, 16, 16), size_frac=SIZE, seed=1)
    assert torch.tensor(a.pattern).shape == (1, 6, 6) and a.location == (10, 10)


def test_universal_patch_flips_the_base_model_and_random_does_not(
    base: TinyNet, test_set: ImageDataset
) -> None:
    before = {k: v.clone() for k, v in base.state_dict().items()}
    trig = universal_patch(base, block_task(512, seed=0), 3, size_frac=SIZE, steps=100, lr=0.2)
    assert isinstance(trig, ImageTrigger) and trig.location == (10, 10)
    assert torch.tensor(trig.pattern).shape == (1, 6, 6)
    uap = attack_success_rate(base, test_set, trig, 3)
    control = attack_success_rate(base, test_set, random_patch((1, 16, 16), size_frac=SIZE), 3)
    assert uap.rate > 0.8 and control.rate < 0.2  # seeded; measured 1.00 vs 0.00
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # model untouched
    assert all(p.grad is None for p in base.parameters())


def test_patch_is_stamped_only_inside_its_square(base: TinyNet) -> None:
    data = block_task(64, seed=2)
    trig = inherent_patch(base, data, 0, size_frac=SIZE, location="top_left", steps=3)
    x = stamp(data.images, trig)
    assert torch.equal(x[:, :, 6:, :], data.images[:, :, 6:, :])
    assert torch.equal(x[:, :, :, 6:], data.images[:, :, :, 6:])
    assert torch.allclose(x[0, :, :6, :6], torch.tensor(trig.pattern))


def test_one_implementation_two_names_and_clear_errors(base: TinyNet) -> None:
    assert inherent_patch is universal_patch and badmerging_patch is universal_patch
    data = block_task(16, seed=0)
    with pytest.raises(ConfigError, match="class index"):
        universal_patch(base, data, 9, steps=1)
    with pytest.raises(ConfigError, match="non-target"):
        universal_patch(base, data.subset(data.labels == 1), 1, steps=1)
