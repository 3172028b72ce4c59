"""attacks/badnets.py: ρ of the rows, non-target only, stamped and relabelled; nothing else."""

from __future__ import annotations

import pytest
import torch

from mergeshield.attacks.badnets import POISON_RATE, badnets, badnets_trigger
from mergeshield.data import ImageDataset
from mergeshield.errors import ConfigError
from mergeshield.triggers import PatchTrigger, stamp
from tests.support.tiny import block_task


@pytest.fixture(scope="module")
def data() -> ImageDataset:
    return block_task(200, n_classes=4, seed=0)


def test_defaults_follow_method_md() -> None:
    assert POISON_RATE == 0.1
    t = badnets_trigger()
    assert (t.size, t.pattern, t.location) == (3, "checkerboard", "bottom_right")


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.35])
def test_poisons_exactly_rate_of_rows_from_non_target_classes(data: ImageDataset,
                                                              rate: float) -> None:
    before = data.images.clone()
    poisoned, mask = badnets(data, target=2, rate=rate, seed=3)
    assert int(mask.sum()) == round(rate * len(data))
    assert bool((data.labels[mask] != 2).all())  # drawn from non-target classes only
    assert bool((poisoned.labels[mask] == 2).all())  # relabelled to the target
    assert torch.equal(poisoned.labels[~mask], data.labels[~mask])
    assert torch.equal(poisoned.images[~mask], data.images[~mask])  # only poisoned rows stamped
    assert torch.equal(poisoned.images[mask], stamp(data.images[mask], badnets_trigger()))
    assert torch.equal(data.images, before)  # the caller's data is untouched


def test_default_rate_is_ten_percent_and_seeded(data: ImageDataset) -> None:
    _, a = badnets(data, target=0, seed=1)
    _, b = badnets(data, target=0, seed=1)
    _, c = badnets(data, target=0, seed=2)
    assert int(a.sum()) == 20 and torch.equal(a, b) and not torch.equal(a, c)


def test_custom_patch_lands_where_asked(data: ImageDataset) -> None:
    trig = PatchTrigger(pattern="solid", size=2, location="top_left", margin=0)
    poisoned, mask = badnets(data, 1, trig, rate=0.2)
    assert bool((poisoned.images[mask][:, :, :2, :2] == 1.0).all())
    assert torch.equal(poisoned.images[mask][:, :, 2:, :], data.images[mask][:, :, 2:, :])


def test_bad_rate_or_target_is_refused(data: ImageDataset) -> None:
    with pytest.raises(ConfigError, match="non-target"):
        badnets(data, 0, rate=0.9)  # 3/4 of the rows are non-target
    with pytest.raises(ConfigError, match="class index"):
        badnets(data, 7)
