"""Blended injection (Chen et al., 2017): x' = (1 − α)·x + α·pattern on ρ of the training set.

method.md, "Attacks": a full-image pattern mixed with α (default 0.15, the paper's range 0.1–0.2),
ρ = 0.1 of the samples drawn from non-target classes, stamped and relabelled. The stamping and
poisoning are ``triggers.stamp`` / ``triggers.poison``; this module fixes the attack's defaults.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mergeshield.attacks.badnets import POISON_RATE
from mergeshield.data import ImageDataset
from mergeshield.triggers import BlendedTrigger, poison

ALPHA = 0.15  # blend weight of the pattern, method.md's default


def blended_trigger(
    alpha: float = ALPHA,
    pattern: Literal["noise", "stripes"] = "noise",
    seed: int = 0,  # for pattern="noise"
) -> BlendedTrigger:
    """A full-image blended trigger with weight ``alpha`` (method.md, "Attacks")."""
    return BlendedTrigger(pattern=pattern, alpha=alpha, seed=seed)


def blended(
    data: ImageDataset,
    target: int,
    trigger: BlendedTrigger | None = None,
    *,
    rate: float = POISON_RATE,
    seed: int = 0,
) -> tuple[ImageDataset, Tensor]:
    """Poison ``round(rate·N)`` seeded non-target rows with a blend, relabelled to ``target``.

    Returns the poisoned copy and the bool mask ``(N,)`` of the poisoned rows; ``trigger``
    defaults to ``blended_trigger()`` (noise, α = 0.15).
    """
    return poison(data, trigger or blended_trigger(), target, rate, seed)
