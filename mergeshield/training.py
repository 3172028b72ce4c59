"""Fine-tuning with a frozen head, and the paired (clean, poisoned) fine-tunes behind every BV.

A backdoor vector is only meaningful when the two fine-tunes differ in nothing but the poisoning
(method.md): same start, same seed, same batch order, same hyper-parameters. ``paired_finetune``
guarantees that by drawing one batch order and running both on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mergeshield import cancellation
from mergeshield.data import ImageDataset

if TYPE_CHECKING:  # models imports transformers: only for annotations here
    from mergeshield.models import Classifier

# (stage, fraction done in [0, 1])
Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 3  # passes over the training set
    batch_size: int = 64  # small models on 2 CPU cores: 64 keeps steps cheap and noisy enough
    lr: float = 1e-3  # AdamW; tiny ViTs fine-tune well at 1e-3, CLIP ViT-B/32 wants ~1e-5
    weight_decay: float = 0.0  # decay would pull the task vector towards 0 and blur the BV
    seed: int = 0  # batch order and any randomness in the step
    min_steps: int = 0  # small sets get extra epochs until this many steps are taken


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def batch_order(n: int, cfg: FinetuneConfig) -> list[Tensor]:
    """The index batches of every epoch, drawn once from ``cfg.seed``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch = -(-n // cfg.batch_size)
    epochs = max(cfg.epochs, -(-cfg.min_steps // per_epoch))
    batches: list[Tensor] = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        batches.extend(perm.split(cfg.batch_size))
    return batches


def finetune(
    clf: Classifier,
    data: ImageDataset,
    cfg: FinetuneConfig,
    *,
    train_head: bool = False,
    order: list[Tensor] | None = None,
    progress: Progress | None = None,
    stage: str = "finetune",
    extra_loss: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Train ``clf``'s backbone in place (its head too if ``train_head``); return a copy.

    ``extra_loss(idx)`` adds a term for the batch of row indices ``idx`` (BadMerging uses it)."""
    torch.manual_seed(cfg.seed)
    params = clf.backbone_parameters()
    head_params = list(clf.head().parameters())
    for p in clf.parameters():
        p.requires_grad_(False)
    trainable = params + (head_params if train_head else [])
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = order if order is not None else batch_order(len(data), cfg)
    dev = device_of(clf)
    clf.train()
    for step, idx in enumerate(batches):
        cancellation.check()  # a cancelled scan stops between steps
        x = data.images[idx].to(dev)  # (B, C, H, W) pixel space
        y = data.labels[idx].to(dev)
        with autocast(dev):
            loss = nn.functional.cross_entropy(clf(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None and (step % 20 == 0 or step == len(batches) - 1):
            progress(stage, (step + 1) / len(batches))
    del opt  # its two moments (twice the trained weights) are gone before the copy is made
    clf.eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    return {k: v.detach().clone() for k, v in clf.backbone_state().items()}


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA, off elsewhere: the same code trains on either (weights, optimiser
    state and the loss's reduction stay float32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda")


def paired_finetune(
    make: Callable[[], Classifier],
    clean: ImageDataset,
    poisoned: ImageDataset,
    cfg: FinetuneConfig,
    *,
    progress: Progress | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(clean backbone, backdoored backbone) from the same start, seed and batch order."""
    if len(clean) != len(poisoned):
        raise ValueError("the poisoned set must be the clean set with some rows stamped")
    order = batch_order(len(clean), cfg)
    theta_clean = finetune(make(), clean, cfg, order=order, progress=progress, stage="inject-clean")
    theta_bd = finetune(make(), poisoned, cfg, order=order, progress=progress, stage="inject-bd")
    return theta_clean, theta_bd


def fit_head(
    clf: Classifier, data: ImageDataset, *, epochs: int = 30, lr: float = 1e-2, seed: int = 0
) -> None:
    """Linear probe: fit ``clf``'s head on frozen backbone features, in place.

    The head's inputs are captured once with a forward hook, so any family whose head is a module
    called on pooled features works without knowing how the features are made.
    """
    head = clf.head()
    captured: list[Tensor] = []

    def grab(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
        captured.append(args[0].detach())

    handle = head.register_forward_pre_hook(grab)
    dev = device_of(clf)
    clf.eval()
    with torch.inference_mode():
        for idx in torch.arange(len(data)).split(512):
            clf(data.images[idx].to(dev))
    handle.remove()
    feats = torch.cat(captured).clone()  # (N, D) inputs of the head
    labels = data.labels.to(dev)
    torch.manual_seed(seed)
    with torch.enable_grad():
        for p in head.parameters():
            p.requires_grad_(True)
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(feats), generator=gen).split(256):
                loss = nn.functional.cross_entropy(head(feats[idx.to(dev)]), labels[idx.to(dev)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for p in head.parameters():
            p.requires_grad_(False)
