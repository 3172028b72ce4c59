"""Inherent triggers: patches that already flip the *base* model (method.md, "Attacks").

A universal adversarial patch optimised on θ_pre toward one class (BadMerging's trigger, Zhang et
al. CCS 2024; named the core vulnerability of model merging in arXiv:2510.08016) and, as its
control, a random patch of the same size and place. Both are pixel-space ``ImageTrigger`` patches
with a ``location``, so ``triggers.stamp``, ``poison`` and ``evaluation.attack_success_rate`` take
them unchanged.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mergeshield.data import ImageDataset
from mergeshield.errors import ConfigError
from mergeshield.triggers import Corner, ImageTrigger, corner, from_tensor

if TYPE_CHECKING:  # models imports transformers: only for annotations here
    from mergeshield.models import Classifier


def patch_side(size_frac: float, height: int, width: int) -> int:
    """Side of a square patch covering ``size_frac`` of an ``height`` x ``width`` image (≥ 1)."""
    if not 0 < size_frac <= 1:
        raise ConfigError(f"size_frac must be in (0, 1], got {size_frac}")
    return max(1, min(height, width, round(math.sqrt(size_frac * height * width))))


def patch_origin(location: Corner | tuple[int, int], side: int, height: int, width: int,
                 margin: int = 0) -> tuple[int, int]:
    """Top-left (row, col) of a ``side`` x ``side`` patch at ``location`` (BadMerging: margin 0)."""
    return corner(location, margin, side, side, height, width)


def universal_patch(
    model: Classifier,
    data: ImageDataset,
    target: int,
    *,
    size_frac: float = 0.01,  # BadMerging: ~1% of the image area
    location: Corner | tuple[int, int] = "bottom_right",
    steps: int = 200,  # Adam steps on the patch pixels
    lr: float = 0.1,  # on the patch logits (pixels = sigmoid(logits))
    batch_size: int = 64,
    seed: int = 0,
) -> ImageTrigger:
    """A universal adversarial patch on ``model`` toward ``target`` (BadMerging step 1).

    Only the patch is optimised: gradients are taken w.r.t. it alone, so ``model`` (and the
    ``.grad`` of its parameters) is left untouched. Images of class ``target`` are not used.
    """
    if not 0 <= target < len(data.classes):
        raise ConfigError(f"target {target} is not a class index (0..{len(data.classes) - 1})")
    pool = (data.labels != target).nonzero().flatten()
    if len(pool) == 0:
        raise ConfigError("the data has no non-target images to optimise the patch on")
    c, h, w = data.images.shape[1:]
    side = patch_side(size_frac, h, w)
    row, col = patch_origin(location, side, h, w)
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    logit = (torch.rand((c, side, side), generator=gen) * 2 - 1).to(dev)  # (C, s, s)
    logit.requires_grad_(True)
    opt = torch.optim.Adam([logit], lr=lr)
    was_training = model.training
    model.eval()
    y = torch.full((batch_size,), target, dtype=torch.int64, device=dev)
    for _ in range(steps):
        rows = pool[torch.randint(len(pool), (batch_size,), generator=gen)]
        x = data.images[rows].to(dev)  # (B, C, H, W) pixel space
        loss = nn.functional.cross_entropy(model(_paste(x, torch.sigmoid(logit), row, col)), y)
        (grad,) = torch.autograd.grad(loss, [logit])
        logit.grad = grad
        opt.step()
    model.train(was_training)
    return from_tensor(torch.sigmoid(logit.detach()), None, location=(row, col))


# The inherent trigger of a base model is the universal patch optimised on θ_pre: one
# implementation, two names (BadMerging step 1 and the scan's "inherent trigger" probe).
inherent_patch = universal_patch


def random_patch(
    image_shape: tuple[int, int, int],
    *,
    size_frac: float = 0.01,
    location: Corner | tuple[int, int] = "bottom_right",
    seed: int = 0,
) -> ImageTrigger:
    """The control: uniform random pixels, same size and place as ``universal_patch``'s."""
    c, h, w = image_shape  # (C, H, W) of the images it will be stamped on
    side = patch_side(size_frac, h, w)
    origin = patch_origin(location, side, h, w)
    pattern = torch.rand((c, side, side), generator=torch.Generator().manual_seed(seed))
    return from_tensor(pattern, None, location=origin)


def _paste(images: Tensor, patch: Tensor, row: int, col: int) -> Tensor:
    """Differentiable stamp of a ``(C, s, s)`` patch on ``(N, C, H, W)`` images at (row, col)."""
    _, _, h, w = images.shape
    s = patch.shape[-1]
    pad = (col, w - col - s, row, h - row - s)  # (left, right, top, bottom)
    full = nn.functional.pad(patch, pad)  # (C, H, W), zero outside the patch
    mask = nn.functional.pad(torch.ones_like(patch[:1]), pad)  # (1, H, W)
    return images * (1 - mask) + full * mask
