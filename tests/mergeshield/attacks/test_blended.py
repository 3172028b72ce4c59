"""attacks/blended.py: x' = (1 − α)x + α·pattern on ρ of the non-target rows, relabelled."""

from __future__ import annotations

import pytest
import torch

from mergeshield.attacks.blended import ALPHA, blended, blended_trigger
from mergeshield.data import ImageDataset
from tests.support.tiny import block_task


@pytest.fixture(scope="module")
def data() -> ImageDataset:
    return block_task(120, n_classes=4, seed=1)


def test_default_alpha_is_method_md_s() -> None:
    assert ALPHA == 0.15 and blended_trigger().alpha == 0.15


@pytest.mark.parametrize("alpha", [0.1, 0.15, 0.2])
def test_every_poisoned_row_is_the_same_pattern_blended_with_alpha(data: ImageDataset,
                                                                   alpha: float) -> None:
    poisoned, mask = blended(data, 3, blended_trigger(alpha=alpha), seed=0)
    assert int(mask.sum()) == 12
    assert bool((data.labels[mask] != 3).all()) and bool((poisoned.labels[mask] == 3).all())
    x, x2 = data.images[mask], poisoned.images[mask]  # (12, 1, 16, 16)
    pattern = (x2 - (1 - alpha) * x) / alpha  # recovers one full-image pattern per row
    assert torch.allclose(pattern, pattern[:1].expand_as(pattern), atol=1e-4)
    assert float(pattern.min()) >= -1e-4 and float(pattern.max()) <= 1 + 1e-4
    assert float((pattern[0] - x[0]).abs().mean()) > 0.1  # it is a real pattern, not the image
    assert torch.equal(poisoned.images[~mask], data.images[~mask])
    assert torch.equal(poisoned.labels[~mask], data.labels[~mask])


def test_pattern_is_seeded(data: ImageDataset) -> None:
    a, _ = blended(data, 0, blended_trigger(seed=1))
    b, _ = blended(data, 0, blended_trigger(seed=1))
    c, _ = blended(data, 0, blended_trigger(seed=2))
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
