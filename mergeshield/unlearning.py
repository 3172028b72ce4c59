"""Trigger unlearning: the repair a scan applies to every suspect it can search.

IBVS (``ibvs.py``) subtracts the defender's own injected backdoor vector; it needs no trigger, but
on one checkpoint (a backdoor at full strength, not scaled down by a merge) it removes little
(docs/efficacy). So the suspect is also fine-tuned on the defender's clean data with the triggers
the scan found (a probe, a user trigger, an inverted patch or blend) and a blended pattern
inverted towards the same target, stamped on a share of the rows under their *true* labels (the
unlearning of Neural Cleanse, Wang et al., S&P 2019), in rounds that search the repaired model
again. When nothing was found, the scan's inverted triggers (its most suspicious patch and blend)
are unlearned the same way, as a precaution: on the efficacy bench most backdoors the verdict
missed were still reachable that way (docs/decisions.md, "Cleaning"). The change is one more
task-vector step, the unlearning vector U = θ_repaired − θ_start, so a cleaned checkpoint reads
θ' = θ_suspect − λ·BV_inj + U, with λ = 0 when a backdoor was found (``with_ibvs``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mergeshield.data import ImageDataset
from mergeshield.evaluation import Rate, attack_success_rate, clean_accuracy
from mergeshield.inversion import InversionConfig, invert_blend, invert_triggers
from mergeshield.training import FinetuneConfig, Progress, finetune
from mergeshield.triggers import Trigger, stamp

if TYPE_CHECKING:  # models imports transformers: only for annotations here
    from mergeshield.models import Classifier

Responds = Callable[[float, float], bool]  # (ASR after, reference ASR) -> still a backdoor?


class UnlearnConfig(BaseModel):
    """How a found backdoor is unlearned. Defaults chosen on the efficacy bench's dev split
    (docs/decisions.md, "Cleaning")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True  # False: IBVS alone, as the paper states it
    # nothing found: still unlearn the scan's most suspicious inverted triggers (and a blend
    # towards their targets), as Neural Cleanse repairs whatever its search finds (decisions.md)
    precautionary: bool = True
    # after IBVS's λ (True) or instead of it (False: λ = 0 when a backdoor was found, IBVS
    # stays the cleaning of a scan that found nothing); a 5-epoch repair recovers what λ costs
    with_ibvs: bool = False
    rounds: int = Field(default=3, ge=1, le=10)  # at most; stops once no found trigger responds
    epochs: int = Field(default=5, ge=1, le=20)  # passes over the defender's data per round
    lr: float = Field(default=1e-3, gt=0, le=1)  # the dev split's cut/cost trade-off (decisions)
    stamp_fraction: float = Field(default=0.2, gt=0, lt=1)  # rows stamped, split between triggers
    blend_alpha: float = Field(default=0.2, gt=0, le=0.5)  # the inverted blend's weight
    max_train: int | None = Field(default=2000, ge=100, le=1_000_000)  # defender images used
    # also unlearn, each round, a patch this many times the search's area inverted towards each
    # target: a real trigger wider than the search's mask (BadMerging's 4–6 px patches) survives
    # unlearning the small one (docs/efficacy, test4). 4: the cut 89.1 → 92.3 % on a paired dev
    # run at −1.2 points (decisions.md, "Cleaning: a larger patch too"); None: off
    large_patch_scale: float | None = Field(default=4, gt=1, le=16)


@dataclass(frozen=True)
class Round:
    """One round: the triggers unlearned and the backbone it left."""

    triggers: tuple[tuple[Trigger, int], ...]
    backbone: dict[str, Tensor]


def unlearning_set(data: ImageDataset, triggers: Sequence[tuple[Trigger, int]], fraction: float,
                   seed: int) -> ImageDataset:
    """``data`` with ``fraction`` of its rows stamped, split evenly between ``triggers``; every
    label is kept, so the model learns that the trigger means nothing."""
    gen = torch.Generator().manual_seed(seed)
    images = data.images.clone()  # (N, C, H, W) pixel space
    perm = torch.randperm(len(data), generator=gen)
    share = max(1, round(fraction * len(data) / max(len(triggers), 1)))
    for i, (trigger, _target) in enumerate(triggers):
        rows = perm[i * share:(i + 1) * share]
        images[rows] = stamp(images[rows], trigger)
    return ImageDataset(images=images, labels=data.labels, classes=data.classes,
                        name=f"{data.name}+unlearn")


def unlearn_round(clf: Classifier, data: ImageDataset, triggers: Sequence[tuple[Trigger, int]],
                  cfg: UnlearnConfig, round_index: int, *, seed: int = 0,
                  progress: Progress | None = None) -> Round:
    """Fine-tune ``clf``'s backbone in place (head frozen) on ``data`` with ``triggers`` stamped
    under true labels; the round's seed draws both the stamped rows and the batch order."""
    round_seed = seed * 1000 + round_index
    unlearn_data = unlearning_set(data, triggers, cfg.stamp_fraction, round_seed)
    backbone = finetune(clf, unlearn_data,
                        FinetuneConfig(epochs=cfg.epochs, lr=cfg.lr, seed=round_seed),
                        progress=progress, stage="unlearn")
    return Round(triggers=tuple(triggers), backbone=backbone)


@dataclass(frozen=True)
class Found:
    """A trigger the scan found on the suspect, with its reference ASR (the base's response)."""

    id: str
    trigger: Trigger
    target: int
    reference_rate: float


@dataclass(frozen=True)
class RoundReport:
    """What a round unlearned and what still responded after it (hits, total) per trigger id;
    ``reinverted:target-T`` is a fresh patch search on the repaired model."""

    unlearned: tuple[str, ...]
    residual: dict[str, Rate]


def repair(clf: Classifier, data: ImageDataset, test: ImageDataset, search: ImageDataset,
           found: Sequence[Found], cfg: UnlearnConfig, *, still_responds: Responds,
           inversion: InversionConfig | None, accuracy_floor: float, seed: int = 0,
           progress: Progress | None = None) -> list[RoundReport]:
    """Unlearn ``found`` (and, each round, a blend and a patch inverted towards their targets on
    the model as it is then, and a larger patch with ``cfg.large_patch_scale``) from ``clf`` in
    place, until nothing responds or ``cfg.rounds``.

    ``data``: the defender's training images; ``search``: images the inversions optimise on;
    ``test``: where residual ASR and clean accuracy are measured. ``still_responds(rate,
    reference_rate)`` is the verdict's residual rule, so the loop stops exactly when the report
    would call it removed. A round after the first that takes clean accuracy below
    ``accuracy_floor`` is undone and ends the loop (the first is kept: a backdoor left in place
    is worse than its cost, which the report states). ``inversion`` None (a scan run without
    inversion): no searches at all, only ``found`` is unlearned and checked."""
    targets = sorted({f.target for f in found})
    k = len(test.classes)
    unlearn_set: list[tuple[Trigger, int]] = [(f.trigger, f.target) for f in found]
    ids = [f.id for f in found]
    ref_of = {t: max(f.reference_rate for f in found if f.target == t) for t in targets}
    reports: list[RoundReport] = []
    fresh: dict[int, Trigger] = {}
    for r in range(cfg.rounds):
        cfg_r = replace(inversion, seed=inversion.seed + r) if inversion else None
        # a blend reaches what a patch does not (blends, warps, spread patches)
        blends = {t: invert_blend(clf, search.images, search.labels, t, cfg_r,
                                  alpha=cfg.blend_alpha) for t in targets} if cfg_r else {}
        unlearn_set += [(b, t) for t, b in blends.items()]
        ids += [f"round{r}:blend->{t}" for t in blends]
        if cfg_r and cfg.large_patch_scale:
            wide = replace(cfg_r, area_fraction=cfg_r.area_fraction * cfg.large_patch_scale)
            large = invert_triggers(clf, search.images, search.labels, k, wide, targets)
            unlearn_set += list(zip(large, targets, strict=True))
            ids += [f"round{r}:large-patch->{t}" for t in targets]
        for t, trig in fresh.items():  # the patch the last check still found
            unlearn_set.append((trig, t))
            ids.append(f"round{r}:patch->{t}")
        # only a round after the first may be undone: keep its starting point
        before = {k: v.detach().clone() for k, v in clf.backbone_state().items()} if r else None
        unlearn_round(clf, data, unlearn_set, cfg, r, seed=seed, progress=progress)
        if before is not None and clean_accuracy(clf, test).rate < accuracy_floor:
            clf.load_backbone(before)
            break
        residual = {f.id: attack_success_rate(clf, test, f.trigger, f.target) for f in found}
        if cfg_r:  # a fresh patch search, only towards the suspected targets
            patches = invert_triggers(clf, search.images, search.labels, k, cfg_r, targets)
            fresh = dict(zip(targets, patches, strict=True))
        residual |= {f"reinverted:target-{t}": attack_success_rate(clf, test, fresh[t], t)
                     for t in fresh}
        reports.append(RoundReport(unlearned=tuple(ids), residual=residual))
        left = [f for f in found if still_responds(residual[f.id].rate, f.reference_rate)]
        left_t = [t for t in fresh
                  if still_responds(residual[f"reinverted:target-{t}"].rate, ref_of[t])]
        if not left and not left_t:
            break
        fresh = {t: fresh[t] for t in left_t}
    return reports
