"""BadNets (Gu et al., 2017): a patch trigger stamped on ρ of the training set (method.md).

The poisoning itself lives in ``triggers.poison`` (shared with the zoo and the IBVS injection);
this module is the attack's named home: method.md's defaults, ρ = 0.1 drawn from non-target
classes, each drawn sample stamped and relabelled to the target.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mergeshield.data import ImageDataset
from mergeshield.triggers import Corner, PatchTrigger, poison

POISON_RATE = 0.1  # ρ, method.md's default


def badnets_trigger(
    size: int = 3,  # side in pixels (≈ 1/9 of a 28×28 image)
    pattern: Literal["solid", "checkerboard", "random"] = "checkerboard",
    location: Corner | tuple[int, int] = "bottom_right",
    seed: int = 0,  # for pattern="random"
) -> PatchTrigger:
    """A BadNets s×s patch trigger (method.md, "Attacks")."""
    return PatchTrigger(pattern=pattern, size=size, location=location, seed=seed)


def badnets(
    data: ImageDataset,
    target: int,
    trigger: PatchTrigger | None = None,
    *,
    rate: float = POISON_RATE,
    seed: int = 0,
) -> tuple[ImageDataset, Tensor]:
    """Poison ``round(rate·N)`` seeded non-target rows with a patch, relabelled to ``target``.

    Returns the poisoned copy and the bool mask ``(N,)`` of the poisoned rows; ``data`` is not
    modified. ``trigger`` defaults to ``badnets_trigger()``.
    """
    return poison(data, trigger or badnets_trigger(), target, rate, seed)
