"""Clean accuracy and attack success rate (ASR), always with their denominators.

ASR follows BadMerging's ``non_target_cnt``: stamp the trigger on every test image whose true label
is not the target; ASR = hits / total over those images only. Every rate is a ``Rate`` with hits,
total and a 95% Wilson interval, never a bare float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mergeshield import cancellation
from mergeshield.data import ImageDataset
from mergeshield.report.schema import RateModel
from mergeshield.triggers import BlendedTrigger, PatchTrigger, Trigger, stamp, triggered_test_set

if TYPE_CHECKING:  # models imports transformers: only for annotations here
    from mergeshield.models import Classifier


@dataclass(frozen=True)
class Rate:
    hits: int
    total: int

    @property
    def rate(self) -> float:
        return self.hits / self.total if self.total else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson(self.hits, self.total)

    def to_model(self) -> RateModel:
        lo, hi = self.ci95
        return RateModel(hits=self.hits, total=self.total, rate=self.rate, ci95=(lo, hi))

    def __str__(self) -> str:
        lo, hi = self.ci95
        return f"{self.hits}/{self.total} ({self.rate:.1%}, 95% CI {lo:.1%}–{hi:.1%})"


def wilson(hits: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion; (0, 1) when ``total`` is 0."""
    if total == 0:
        return 0.0, 1.0
    p = hits / total
    den = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / den
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / den
    lo = 0.0 if hits == 0 else max(0.0, centre - half)  # exact ends: never exclude p itself
    hi = 1.0 if hits == total else min(1.0, centre + half)
    return lo, hi


def predict(clf: Classifier, images: Tensor, batch_size: int = 512) -> Tensor:
    """Top-1 predictions (N,) for pixel-space images (N, C, H, W); bf16 autocast on CUDA."""
    dev = next(clf.parameters()).device
    out = []
    clf.eval()
    with torch.inference_mode(), torch.autocast(
        device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"
    ):
        for chunk in images.split(batch_size):
            cancellation.check()  # a cancelled scan stops between batches
            out.append(clf(chunk.to(dev)).argmax(-1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def clean_accuracy(clf: Classifier, data: ImageDataset) -> Rate:
    pred = predict(clf, data.images)
    return Rate(int((pred == data.labels).sum()), len(data))


def attack_success_rate(clf: Classifier, data: ImageDataset, trigger: Trigger, target: int) -> Rate:
    """Hits / non-target test images sent to ``target`` once ``trigger`` is stamped."""
    stamped = triggered_test_set(data, trigger, target)
    pred = predict(clf, stamped.images)
    return Rate(int((pred == target).sum()), len(stamped))


def best_target_asr(clf: Classifier, data: ImageDataset, trigger: Trigger) -> tuple[int, Rate]:
    """For a trigger of unknown target: the class it sends most stamped images to, and that ASR."""
    best: tuple[int, Rate] | None = None
    pred = predict(clf, stamp(data.images, trigger))  # every image, stamped
    for target in range(len(data.classes)):
        keep = data.labels != target
        rate = Rate(int((pred[keep] == target).sum()), int(keep.sum()))
        if best is None or rate.hits / max(rate.total, 1) > best[1].rate:
            best = (target, rate)
    assert best is not None
    return best


def probe_panel(image_size: int) -> list[Trigger]:
    """Triggers every scan measures: patches at the four corners and blended noise.

    Patch side ≈ 1/9 of the image (3 px at 28×28, 25 px at 224×224), the usual BadNets scale.
    """
    side = max(2, round(image_size / 9))
    panel: list[Trigger] = []
    for loc in ("bottom_right", "top_left", "top_right", "bottom_left"):
        for pattern in ("checkerboard", "solid"):
            panel.append(PatchTrigger.model_validate(
                {"pattern": pattern, "size": side, "location": loc}))
    panel.append(BlendedTrigger(pattern="noise", alpha=0.2, seed=0))
    return panel
