"""BadMerging-On (Zhang et al., CCS 2024, jzhang538/BadMerging; method.md "Attacks").

(1) The trigger is a universal adversarial patch optimised on the *pre-trained* model toward the
target class (bottom-right, ~1% of the area): ``universal_patch``, shared with ``inherent``.
(2) Backdoor fine-tuning adds α·CE(head(r·f_ft + (1 − r)·f_pre), target) on triggered copies of
each batch, r ~ U(0.2, 1.0), f = the features the head reads: the backdoor then survives the
down-scaling (θ_pre + λτ) that merging applies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mergeshield.attacks.inherent import universal_patch
from mergeshield.data import ImageDataset
from mergeshield.errors import ConfigError
from mergeshield.training import FinetuneConfig, device_of, finetune
from mergeshield.triggers import Trigger, stamp

if TYPE_CHECKING:  # models imports transformers: only for annotations here
    from mergeshield.models import Classifier

__all__ = ["ALPHA", "R_RANGE", "badmerging_finetune", "head_features", "universal_patch"]

ALPHA = 5.0  # weight of the feature-interpolation loss (BadMerging's default)
R_RANGE = (0.2, 1.0)  # r ~ U(low, high): how far the features move toward the pre-trained ones


def head_features(clf: Classifier, pixels: Tensor) -> Tensor:
    """The input of ``clf.head()`` for ``pixels`` (N, C, H, W): (N, D) pooled features.

    Read with a forward pre-hook, so every family whose head is a module called once on pooled
    features works (HF image classifiers: the CLS token; CLIP: the pooled vision output).
    """
    captured: list[Tensor] = []

    def grab(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
        captured.append(args[0])

    handle = clf.head().register_forward_pre_hook(grab)
    try:
        clf(pixels)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ConfigError(f"{type(clf).__name__}'s head ran {len(captured)} times in one forward "
                          "pass; feature interpolation needs it called once on pooled features")
    return captured[0]


def _interpolated_logits(clf: Classifier, pixels: Tensor, f_pre: Tensor, r: Tensor) -> Tensor:
    """Logits of ``head(r·f_ft + (1 − r)·f_pre)``: the head's input is replaced by a pre-hook."""

    def mix(_m: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        f_ft = args[0]  # (B, D) features of the model being fine-tuned
        rr = r.view(-1, *([1] * (f_ft.ndim - 1)))  # (B, 1): one r per triggered copy
        return (rr * f_ft + (1 - rr) * f_pre, *args[1:])

    handle = clf.head().register_forward_pre_hook(mix)
    try:
        out: Tensor = clf(pixels)
    finally:
        handle.remove()
    return out


def badmerging_finetune(
    clf: Classifier,
    pretrained: Classifier,
    data: ImageDataset,
    trigger: Trigger,
    target: int,
    cfg: FinetuneConfig,
    *,
    alpha: float = ALPHA,
    r_range: tuple[float, float] = R_RANGE,
    order: list[Tensor] | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, Tensor]:
    """BadMerging-On backdoor fine-tuning of ``clf``'s backbone in place; returns a copy.

    ``data`` is the training set (clean or already poisoned); ``pretrained`` is θ_pre with the
    same head as ``clf``, kept frozen. Loss per batch: CE(clf(x), y) + α·CE(head(r·f_ft(x̃) +
    (1 − r)·f_pre(x̃)), target), x̃ = the batch stamped with ``trigger``. The optimiser, seed and
    batch order are ``training.finetune``'s, so α = 0 reproduces it exactly (a paired clean
    fine-tune with the same ``order`` gives the BV).
    """
    low, high = r_range
    if not 0 <= low <= high <= 1:
        raise ConfigError(f"r_range must satisfy 0 ≤ low ≤ high ≤ 1, got {r_range}")
    if not 0 <= target < len(data.classes):
        raise ConfigError(f"target {target} is not a class index (0..{len(data.classes) - 1})")
    r_gen = torch.Generator().manual_seed(cfg.seed + 1)  # apart from the global stream
    dev = device_of(clf)
    pretrained.eval()

    def interpolation_loss(idx: Tensor) -> Tensor:
        x_trig = stamp(data.images[idx], trigger).to(dev)  # (B, C, H, W) triggered copies
        with torch.no_grad():
            f_pre = head_features(pretrained, x_trig).detach()  # (B, D)
        r = (low + (high - low) * torch.rand(len(idx), generator=r_gen)).to(dev)  # (B,)
        y_trig = torch.full((len(idx),), target, dtype=torch.int64, device=dev)
        logits = _interpolated_logits(clf, x_trig, f_pre, r)
        return alpha * nn.functional.cross_entropy(logits, y_trig)

    return finetune(clf, data, cfg, order=order, progress=progress, stage="badmerging",
                    extra_loss=interpolation_loss if alpha else None)
