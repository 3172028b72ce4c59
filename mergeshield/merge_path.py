"""The path a merge moves a fine-tune along, in feature space (BadMerging's view of a merge).

Merging scales a task vector down (θ_pre + λ·τ) and adds others; BadMerging (Zhang et al., CCS
2024) models what that does to a model's features as r·f_ft + (1 − r)·f_pre, the features the head
reads moved part of the way back to the pre-trained model's, r ~ U(0.2, 1.0). The attack trains its
backdoor to hold along that path (``attacks.badmerging``); the repair trains the found triggers to
mean nothing along it (``unlearning``, ``UnlearnConfig.path_weight``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from mergeshield.errors import ConfigError

if TYPE_CHECKING:  # models imports transformers: only for annotations here
    from mergeshield.models import Classifier

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


def interpolated_logits(clf: Classifier, pixels: Tensor, f_pre: Tensor, r: Tensor) -> Tensor:
    """Logits of ``head(r·f_ft + (1 − r)·f_pre)``: the head's input is replaced by a pre-hook.
    ``f_pre`` (B, D): the pre-trained model's features of the same pixels; ``r`` (B,)."""

    def mix(_m: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        f_ft = args[0]  # (B, D) features of the model being fine-tuned
        rr = r.view(-1, *([1] * (f_ft.ndim - 1)))  # (B, 1): one r per row
        return (rr * f_ft + (1 - rr) * f_pre, *args[1:])

    handle = clf.head().register_forward_pre_hook(mix)
    try:
        out: Tensor = clf(pixels)
    finally:
        handle.remove()
    return out
