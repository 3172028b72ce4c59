"""Trigger inversion: search for a small patch that flips a model to each candidate target.

Neural-Cleanse style (Wang et al., S&P 2019), with a hard area budget so results are comparable
between models: a soft mask and pattern are optimised per target (all targets in one batch), the
mask is then cut to its ``area`` strongest pixels and the pattern refined under that fixed mask.
A backdoored model has a target that a tiny patch reaches far more easily than on its base model;
the scan runs the same search, with the same budget and seed, on both (method.md, "Metrics").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mergeshield import cancellation
from mergeshield.triggers import ImageTrigger, WarpTrigger, from_tensor, warp, warp_field

if TYPE_CHECKING:  # models imports transformers: only for annotations here
    from mergeshield.models import Classifier


@dataclass(frozen=True)
class InversionConfig:
    area_fraction: float = 1 / 81  # mask budget: (side/9)², the probe panel's patch area
    steps: int = 60  # Adam steps, half with a soft mask and half with the fixed top-k mask
    batch: int = 24  # images per target per step
    lr: float = 0.1
    mask_weight: float = 0.02  # L1 weight of the soft mask in phase one
    seed: int = 0


def invert_triggers(
    clf: Classifier, images: Tensor, labels: Tensor, n_classes: int, cfg: InversionConfig,
    targets: Sequence[int] | None = None, on_step: Callable[[float], None] | None = None,
    contrast: Classifier | None = None,
) -> list[ImageTrigger]:
    """One reconstructed trigger per target class (pixel-space mask + pattern), in the order of
    ``targets`` (default: every class 0..n_classes−1; the cost grows with their number).
    ``on_step(fraction done)`` after each step (progress).

    ``contrast`` (a differential search): a second model that must keep each stamped image's
    true label while ``clf`` goes to the target, so the search looks for what ``clf`` answers
    and ``contrast`` does not (a fine-tune's backdoor against its base), not for what any model
    of the task answers."""
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = next(clf.parameters()).device
    c, h, w = images.shape[1:]
    area = max(1, round(cfg.area_fraction * h * w))
    wanted = list(range(n_classes)) if targets is None else list(targets)
    k = len(wanted)
    mask_logit = torch.full((k, 1, h, w), -3.0, device=dev, requires_grad=True)  # (K, 1, H, W)
    pattern_logit = (torch.rand((k, c, h, w), generator=gen) * 2 - 1).to(dev).requires_grad_(True)
    goal = torch.tensor(wanted, device=dev)
    pools = [torch.nonzero(labels != t).flatten() for t in wanted]
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=cfg.lr)
    hard: Tensor | None = None
    with _searching(clf, contrast):
        for step in range(cfg.steps):
            cancellation.check()  # a cancelled scan stops between steps
            if step == cfg.steps // 2:  # phase two: freeze the mask to its top-``area`` pixels
                hard = _top_area(torch.sigmoid(mask_logit.detach()), area)
                opt = torch.optim.Adam([pattern_logit], lr=cfg.lr)
            rows = torch.stack([p[torch.randint(len(p), (cfg.batch,), generator=gen)]
                                for p in pools])
            x = images[rows.flatten()].to(dev).view(k, cfg.batch, c, h, w)  # (K, B, C, H, W)
            mask = hard if hard is not None else torch.sigmoid(mask_logit)
            pattern = torch.sigmoid(pattern_logit)[:, None]
            flat = ((1 - mask[:, None]) * x + mask[:, None] * pattern).view(k * cfg.batch, c, h, w)
            loss = nn.functional.cross_entropy(clf(flat), goal.repeat_interleave(cfg.batch))
            if contrast is not None:
                loss = loss + nn.functional.cross_entropy(contrast(flat),
                                                          labels[rows.flatten()].to(dev))
            if hard is None:
                loss = loss + cfg.mask_weight * torch.sigmoid(mask_logit).sum() / k
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step:
                on_step((step + 1) / cfg.steps)
    if hard is None:
        hard = _top_area(torch.sigmoid(mask_logit.detach()), area)
    pattern = torch.sigmoid(pattern_logit.detach()).cpu()
    return [from_tensor(pattern[t], hard[t, 0].cpu()) for t in range(k)]


def invert_blend(
    clf: Classifier, images: Tensor, labels: Tensor, target: int, cfg: InversionConfig,
    alpha: float = 0.2,
) -> ImageTrigger:
    """A full-image pattern that, blended in at ``alpha`` (x' = (1 − α)·x + α·p), sends the
    non-target ``images`` to ``target``: the blended-injection (Chen et al., 2017) counterpart of
    the patch search, for backdoors a small patch does not reach (blends, warps, spread patches).

    At α = 0.2 such a pattern flips many clean models too: the repair unlearns it towards a
    target the scan already suspects. Detection searches at a fainter α (``invert_blends``).
    Twice the patch search's batch: the one pattern has the step's images to itself."""
    return invert_blends(clf, images, labels, [target], replace(cfg, batch=cfg.batch * 2),
                         alpha)[0]


def invert_blends(
    clf: Classifier, images: Tensor, labels: Tensor, targets: Sequence[int], cfg: InversionConfig,
    alpha: float, on_step: Callable[[float], None] | None = None,
    contrast: Classifier | None = None,
) -> list[ImageTrigger]:
    """``invert_blend`` towards each of ``targets`` at once (one batch, like the patch search),
    in their order. The scan's blend search runs it on the suspect and on the reference at a
    faint α, where clean fine-tunes barely answer and blended or warping backdoors do
    (docs/decisions.md, "Detection"). ``contrast``: as ``invert_triggers``'."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    dev = next(clf.parameters()).device
    c, h, w = images.shape[1:]
    k, n = len(targets), cfg.batch  # images per target per step, as the patch search
    logit = (torch.rand((k, c, h, w), generator=gen) * 2 - 1).to(dev).requires_grad_(True)
    pools = [torch.nonzero(labels != t).flatten() for t in targets]
    opt = torch.optim.Adam([logit], lr=cfg.lr)
    y = torch.tensor(list(targets), device=dev).repeat_interleave(n)
    with _searching(clf, contrast):
        for step in range(cfg.steps):
            cancellation.check()  # a cancelled scan stops between steps
            rows = torch.stack([p[torch.randint(len(p), (n,), generator=gen)] for p in pools])
            x = images[rows.flatten()].to(dev).view(k, n, c, h, w)  # (K, B, C, H, W)
            stamped = (1 - alpha) * x + alpha * torch.sigmoid(logit)[:, None]
            flat = stamped.view(k * n, c, h, w)
            loss = nn.functional.cross_entropy(clf(flat), y)
            if contrast is not None:
                loss = loss + nn.functional.cross_entropy(contrast(flat),
                                                          labels[rows.flatten()].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step:
                on_step((step + 1) / cfg.steps)
    pattern = torch.sigmoid(logit.detach()).cpu()
    return [from_tensor(pattern[i], torch.full((h, w), alpha)) for i in range(k)]


def invert_warps(
    clf: Classifier, images: Tensor, labels: Tensor, targets: Sequence[int], cfg: InversionConfig,
    max_shift: float, grid: int = 4, on_step: Callable[[float], None] | None = None,
) -> list[WarpTrigger]:
    """A smooth warp towards each of ``targets`` (one batch, like the blend search): the
    inversion of a warping trigger (WaNet, Nguyen & Tran, ICLR 2021), which no patch or blend
    reproduces. A ``grid`` × ``grid`` lattice of control offsets (WaNet's k = 4), each bounded by
    ``max_shift`` pixels (tanh), upsampled bicubically to the image (``triggers.warp_field``):
    the universal warp of that bound that sends most non-target ``images`` to the target."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    dev = next(clf.parameters()).device
    h, w = images.shape[2:]
    k, n = len(targets), cfg.batch
    flow = ((torch.rand((k, 2, grid, grid), generator=gen) * 2 - 1) * 0.5).to(dev)
    flow.requires_grad_(True)
    pools = [torch.nonzero(labels != t).flatten() for t in targets]
    opt = torch.optim.Adam([flow], lr=cfg.lr)
    y = torch.tensor(list(targets), device=dev).repeat_interleave(n)
    with _searching(clf):
        for step in range(cfg.steps):
            cancellation.check()  # a cancelled scan stops between steps
            rows = torch.stack([p[torch.randint(len(p), (n,), generator=gen)] for p in pools])
            fields = warp_field(torch.tanh(flow) * max_shift, h, w).repeat_interleave(n, dim=0)
            x = images[rows.flatten()].to(dev)  # (K·B, C, H, W)
            loss = nn.functional.cross_entropy(clf(warp(x, fields)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step:
                on_step((step + 1) / cfg.steps)
    offsets = (torch.tanh(flow.detach()) * max_shift).cpu()
    return [WarpTrigger(offsets=o.tolist()) for o in offsets]


@contextmanager
def _searching(*models: nn.Module | None) -> Iterator[None]:
    """``models`` in eval mode with their weights frozen while a search runs: it optimises
    pixels only, so no weight gradient is computed or kept."""
    frozen = [p for m in models if m is not None for p in m.parameters() if p.requires_grad]
    for m in models:
        if m is not None:
            m.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _top_area(mask: Tensor, area: int) -> Tensor:
    """Binary masks (K, 1, H, W) keeping the ``area`` largest entries of each soft mask."""
    flat = mask.flatten(1)
    idx = flat.topk(area, dim=1).indices
    return torch.zeros_like(flat).scatter_(1, idx, 1.0).view_as(mask)
