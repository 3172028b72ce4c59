"""evaluation.py: Wilson intervals against known values, and rates that name their denominators."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mergeshield.data import ImageDataset
from mergeshield.evaluation import (
    Rate,
    attack_success_rate,
    best_target_asr,
    clean_accuracy,
    probe_panel,
    wilson,
)
from mergeshield.models import Classifier, Preprocessing
from mergeshield.triggers import BlendedTrigger, PatchTrigger, stamp

# Reference values (95% Wilson score interval, 6 decimals), as scipy.stats.binomtest(k, n)
# .proportion_ci(method="wilson") gives them.
KNOWN = [
    (0, 10, 0.0, 0.277533),
    (10, 10, 0.722467, 1.0),
    (5, 10, 0.236593, 0.763407),
    (961, 1000, 0.947131, 0.971341),
    (1, 3, 0.061492, 0.792340),
]


def wilson_by_quadratic(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The interval's ends as the roots of (p̂ − p)² = z² p (1 − p) / n, solved directly."""
    p_hat = k / n
    a, b, c = 1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize(("hits", "total", "lo", "hi"), KNOWN)
def test_wilson_matches_known_intervals(hits: int, total: int, lo: float, hi: float) -> None:
    got = wilson(hits, total)
    assert got == pytest.approx((lo, hi), abs=1e-6)
    assert got == pytest.approx(wilson_by_quadratic(hits, total), abs=1e-6)
    assert 0.0 <= got[0] <= got[1] <= 1.0


def test_wilson_interval_always_contains_the_observed_rate() -> None:
    for total in range(1, 1001):
        for hits in (0, 1, total // 2, total - 1, total):
            lo, hi = wilson(hits, total)
            assert lo <= hits / total <= hi, (hits, total, lo, hi)


def test_wilson_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for hits, total in [(3, 7), (0, 1), (50, 51), (123, 456)]:
        ci = stats.binomtest(hits, total).proportion_ci(method="wilson")
        assert wilson(hits, total) == pytest.approx((ci.low, ci.high), abs=1e-6)


def test_wilson_of_nothing_is_the_whole_interval() -> None:
    assert wilson(0, 0) == (0.0, 1.0)


def test_rate_carries_hits_total_and_interval() -> None:
    r = Rate(961, 1000)
    assert r.rate == 0.961
    assert r.ci95 == wilson(961, 1000)
    assert str(r).startswith("961/1000 (96.1%, 95% CI 94.7%–97.1%")
    m = r.to_model()
    assert (m.hits, m.total, m.rate) == (961, 1000, 0.961)
    assert tuple(m.ci95) == pytest.approx(r.ci95)
    assert Rate(0, 0).rate == 0.0 and Rate(0, 0).ci95 == (0.0, 1.0)


# -- rates of a classifier whose answers are known -------------------------------------------------
SIDE = 8
TRIGGER = PatchTrigger(pattern="solid", size=1, location="bottom_right", margin=0)


class Oracle(Classifier):
    """Reads the true class from pixel (0, 0) = label / 10; pixel (0, 1) = 1 marks a row it gets
    wrong (answers label + 1); a white bottom-right pixel sends the image to ``target``,
    unless pixel (0, 2) = 1 marks the row as resistant."""

    def __init__(self, n_classes: int, target: int) -> None:
        super().__init__()
        self.k, self.target = n_classes, target
        self.anchor = nn.Parameter(torch.zeros(()))  # predict() needs a parameter for the device
        self.preprocessing = Preprocessing(SIDE, 1, (0.0,), (1.0,))  # identity

    def logits(self, inputs: Tensor) -> Tensor:
        label = torch.round(inputs[:, 0, 0, 0] * 10).long()
        pred = torch.where(inputs[:, 0, 0, 1] > 0.5, (label + 1) % self.k, label)
        hit = (inputs[:, 0, -1, -1] == 1.0) & (inputs[:, 0, 0, 2] < 0.5)
        pred = torch.where(hit, torch.full_like(pred, self.target), pred)
        return nn.functional.one_hot(pred, self.k).float() + 0 * self.anchor

    def head(self) -> nn.Module:
        return nn.Identity()

    def backbone_state(self) -> dict[str, Tensor]:
        return {}


def oracle_data(wrong: list[int], resistant: list[int]) -> ImageDataset:
    labels = torch.arange(40) % 4  # 10 images per class
    images = torch.zeros(40, 1, SIDE, SIDE)
    images[:, 0, 0, 0] = labels.float() / 10
    images[wrong, 0, 0, 1] = 1.0
    images[resistant, 0, 0, 2] = 1.0
    return ImageDataset(images, labels, ("a", "b", "c", "d"), "oracle")


def test_clean_accuracy_counts_hits_over_all_images() -> None:
    data = oracle_data(wrong=[0, 5, 9, 22, 23, 30, 39], resistant=[])
    assert clean_accuracy(Oracle(4, target=2), data) == Rate(33, 40)


def test_asr_excludes_target_class_images_from_the_denominator() -> None:
    # rows 2, 6, 10 are class 2 (the target): resistant or not, they never count
    data = oracle_data(wrong=[], resistant=[1, 4, 5, 2, 6, 10])
    clf = Oracle(4, target=2)
    assert attack_success_rate(clf, data, TRIGGER, target=2) == Rate(27, 30)
    assert attack_success_rate(clf, data, TRIGGER, target=1) == Rate(0, 30)


def test_best_target_asr_finds_the_target_of_an_unknown_trigger() -> None:
    data = oracle_data(wrong=[], resistant=[1, 4, 5])  # classes 1, 0, 1
    target, rate = best_target_asr(Oracle(4, target=3), data, TRIGGER)
    assert (target, rate) == (3, Rate(27, 30))
    other, low = best_target_asr(Oracle(4, target=3), data, BlendedTrigger(alpha=0.2))
    assert low.total == 30 and low.hits < 30  # blended noise is not this oracle's trigger


def test_clean_accuracy_of_an_empty_set() -> None:
    empty = ImageDataset(torch.zeros(0, 1, SIDE, SIDE), torch.zeros(0, dtype=torch.int64),
                         ("a", "b"), "empty")
    assert clean_accuracy(Oracle(2, target=0), empty) == Rate(0, 0)


@pytest.mark.parametrize(("image_size", "side"), [(8, 2), (14, 2), (28, 3), (224, 25)])
def test_probe_panel_sizes(image_size: int, side: int) -> None:
    panel = probe_panel(image_size)
    patches = [t for t in panel if isinstance(t, PatchTrigger)]
    assert len(panel) == 9 and len(patches) == 8
    assert {t.size for t in patches} == {side}
    assert {t.location for t in patches} == {"bottom_right", "top_left", "top_right",
                                              "bottom_left"}
    assert {t.pattern for t in patches} == {"checkerboard", "solid"}
    assert sum(isinstance(t, BlendedTrigger) for t in panel) == 1
    images = torch.rand(2, 3, image_size, image_size)
    assert all(stamp(images, t).shape == images.shape for t in panel)  # every probe fits
