"""Injection Backdoor Vector Subtraction (IBVS): θ' = θ_suspect − λ·BV_inj.

Pawlak et al., "Backdoor Vectors: a Task Arithmetic View on Backdoor Attacks and Defenses",
arXiv:2510.08016, Sec. "IBVS": BV_inj = θ_inj_bd − θ_inj_clean, both fine-tuned from θ_pre.

The defender does not know the attack: it injects backdoors of its own (``InjectionRecipe``),
measures their BV and subtracts it. BV_inj depends only on (base revision, recipe, data), so it is
built once and cached; λ is chosen by a sweep whose whole curve goes into the report.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mergeshield.data import ImageDataset
from mergeshield.errors import ConfigError
from mergeshield.evaluation import Rate, attack_success_rate
from mergeshield.options import (
    MAX_TRIGGERS,
    BatchSize,
    ClassIndex,
    Epochs,
    LearningRate,
    Seed,
    Share,
    TrainImages,
)
from mergeshield.task_vectors import TaskVector, top_k
from mergeshield.tensor_stream import TensorStream
from mergeshield.training import FinetuneConfig, Progress, batch_order, finetune
from mergeshield.triggers import PatchTrigger, Trigger, stamp

if TYPE_CHECKING:  # models imports transformers: only for annotations here
    from mergeshield.models import Classifier

CORNERS = ("bottom_right", "top_left", "top_right", "bottom_left")


class InjectionRecipe(BaseModel):
    """How the defender plants its own backdoor(s). Defaults: see ``DEFAULT_RECIPE_NOTE``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # "per_class": one distinct random-pattern patch per class, each relabelled to its class, so
    # BV_inj spans backdoor directions towards every target (the attacker's target is unknown).
    # "single": ``triggers`` all sent to ``targets`` (method.md shows this misses other targets).
    mode: Literal["per_class", "single"] = "per_class"
    # used by mode="single"
    triggers: tuple[Trigger, ...] = Field(default=(), max_length=MAX_TRIGGERS)
    targets: tuple[ClassIndex, ...] = Field(default=(0,), max_length=MAX_TRIGGERS)
    patch_fraction: Share = 1 / 9  # patch side / image side for per_class triggers
    # ρ over the whole set, split evenly between the injected triggers, and the fine-tune's lr.
    # At these values 8 of 10 per-class injections do not take (own ASR 1–27%, reported as
    # ``took: false``); ρ=0.6, lr 2e-3 and 3 rounds take all ten ≥ 90%, but that BV_inj is so
    # much larger that λ_d=1 over-subtracts in merges (docs/decisions.md, "Injections that
    # take"): the stronger recipe waits for a λ policy of its own.
    poison_rate: Share = 0.3
    epochs: Epochs = 4  # paired fine-tune length of one round
    lr: LearningRate = 1e-3
    min_own_asr: Share = 0.9  # own ASR every injected backdoor should reach ("took")
    max_rounds: int = Field(default=1, ge=1, le=20)  # rounds of ``epochs`` to try to reach it
    batch_size: BatchSize = 64
    max_train: TrainImages | None = 2000  # images of the defender's data used for the injection
    seed: Seed = 0

    def digest(self, base_revision: str, data_sha256: str) -> str:
        """Cache key of BV_inj: the recipe, the base revision and the data it was trained on."""
        payload = {"recipe": self.model_dump(mode="json"), "base": base_revision,
                   "data": data_sha256}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def finetune_config(self) -> FinetuneConfig:
        return FinetuneConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                              seed=self.seed)


# Chosen by experiment 5 of `bench paper` (docs/results/ibvs.md and quick/ibvs.md, rows
# "ibvs:per_class" vs "ibvs:single" vs "ibvs:types" at λ_d = 1): the single-target recipe only wins
# when it guesses the attacker's target (Blended → class 1, quick: 12.6% left vs 3.0% for per_class)
# and the several-types recipe adds nothing; see docs/decisions.md.
DEFAULT_RECIPE_NOTE = (
    "per_class: one random-pattern corner patch per class, each relabelled to its own class, "
    "ρ=0.3 split evenly, 4 epochs; target-agnostic because the attacker's target is unknown "
    "(docs/results/ibvs.md: per_class vs single vs types)"
)


def injected_backdoors(recipe: InjectionRecipe, n_classes: int, image_size: int
                       ) -> list[tuple[Trigger, int]]:
    """The (trigger, target) pairs the recipe plants."""
    if recipe.mode == "single":
        if not recipe.triggers:
            raise ConfigError("an injection recipe in mode 'single' needs at least one trigger")
        bad = [t for t in recipe.targets if not 0 <= t < n_classes]
        if bad:
            raise ConfigError(f"injection targets {bad} outside 0..{n_classes - 1}")
        return [(trig, tgt) for trig in recipe.triggers for tgt in recipe.targets]
    side = max(2, round(image_size * recipe.patch_fraction))
    return [
        (PatchTrigger(pattern="random", size=side, location=CORNERS[c % 4],  # type: ignore[arg-type]
                      seed=1000 + c), c)
        for c in range(n_classes)
    ]


def poison_many(data: ImageDataset, backdoors: Sequence[tuple[Trigger, int]], rate: float,
                seed: int) -> ImageDataset:
    """Stamp ``rate``·N rows (non-target rows of each pair), split evenly between the pairs."""
    if not 0.0 <= rate <= 1.0 or not backdoors:
        raise ConfigError(f"poisoning needs 0 <= rate <= 1 and at least one trigger (rate {rate})")
    gen = torch.Generator().manual_seed(seed)
    images, labels = data.images.clone(), data.labels.clone()
    free = torch.ones(len(data), dtype=torch.bool)
    per_pair = round(rate * len(data) / len(backdoors))
    for trigger, target in backdoors:
        pool = torch.nonzero(free & (data.labels != target)).flatten()
        if len(pool) < per_pair:
            raise ConfigError(f"only {len(pool)} rows left to poison for target {target}, "
                              f"{per_pair} needed: lower the poison rate or add data")
        rows = pool[torch.randperm(len(pool), generator=gen)[:per_pair]]
        images[rows] = stamp(images[rows], trigger)
        labels[rows] = target
        free[rows] = False
    return ImageDataset(images=images, labels=labels, classes=data.classes,
                        name=f"{data.name}+injection")


def build_injection_bv(
    make_classifier: Callable[[], Classifier],
    data: ImageDataset,
    recipe: InjectionRecipe,
    *,
    held_out: ImageDataset | None = None,
    progress: Progress | None = None,
    inspect: Callable[[Classifier, Classifier], None] | None = None,
) -> TaskVector:
    """BV_inj = θ_inj_bd − θ_inj_clean from paired fine-tunes of the base (head frozen).

    Trained in rounds of ``recipe.epochs`` (both models on the same batch order each round)
    until every injected backdoor's own ASR on ``held_out`` (default: ``data``) reaches
    ``recipe.min_own_asr``, or ``recipe.max_rounds``: a BV of injections that did not take
    removes little. ``inspect`` is handed the pair (θ_inj_clean, θ_inj_bd), with their head, at
    the end: the scan records θ_inj_bd's own ASR; ``bench/detection_searches.py --calibrators``
    searches θ_inj_clean, a clean fine-tune of the task."""
    if recipe.max_train is not None and len(data) > recipe.max_train:
        gen = torch.Generator().manual_seed(recipe.seed)
        data = data.subset(torch.randperm(len(data), generator=gen)[: recipe.max_train])
    image_size = int(data.images.shape[-1])
    backdoors = injected_backdoors(recipe, len(data.classes), image_size)
    poisoned = poison_many(data, backdoors, recipe.poison_rate, recipe.seed)
    check = held_out if held_out is not None else data
    clean_clf, bd_clf = make_classifier(), make_classifier()
    for r in range(recipe.max_rounds):
        cfg = replace(recipe.finetune_config(), seed=recipe.seed + r)
        order = batch_order(len(data), cfg)  # the pair shares each round's batch order
        finetune(clean_clf, data, cfg, order=order, progress=progress, stage="inject-clean")
        finetune(bd_clf, poisoned, cfg, order=order, progress=progress, stage="inject-bd")
        last = r + 1 == recipe.max_rounds  # after the last round the check decides nothing
        if not last and min(own_asr(bd_clf, check, backdoors)) >= recipe.min_own_asr:
            break
    if inspect is not None:
        inspect(clean_clf, bd_clf)
    return TaskVector.between(clean_clf.backbone_state(), bd_clf.backbone_state()).materialize()


def own_asr(model: Classifier, data: ImageDataset, backdoors: Sequence[tuple[Trigger, int]]
            ) -> list[float]:
    """Each injected backdoor's ASR on ``model``: did the injection take?"""
    return [attack_success_rate(model, data, trigger, target).rate
            for trigger, target in backdoors]


class Focus(BaseModel):
    """Which part of BV_inj is subtracted (MergeShield's refinement of plain IBVS).

    Plain IBVS (``keep=1, agree_with_suspect=False``) subtracts all of BV_inj, which also removes
    task features: on the quick zoo a 2-point accuracy budget then allows only λ≈0.2 (ASR 98→92%).
    Keeping BV_inj's top 20% entries and only those whose sign agrees with the suspect's own task
    vector (TIES-style trim + elect, aimed at weights the suspect really moved in a backdoor
    direction) allows λ≈1 at the same budget (ASR 98→66% BadNets, 74→38% blended). Measured in
    docs/ibvs-defaults.md; the paper-scale comparison is the benchmark's job.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    keep: float = 0.2  # fraction of BV_inj entries kept, by magnitude (global); 1 = all
    agree_with_suspect: bool = True  # keep only entries with sign(BV_inj) == sign(τ_suspect)


def focus(bv: TaskVector, tau: TaskVector, cfg: Focus) -> TaskVector:
    """BV_inj restricted to ``tau``'s tensors, trimmed and sign-masked as ``cfg`` says."""
    out = top_k(bv.restrict(tau), cfg.keep)
    if cfg.agree_with_suspect:
        out = out.zip_with(tau, lambda b, t: torch.where(torch.sign(b) == torch.sign(t), b, 0.0),
                           elementwise=True)
    return out.materialize()


def sanitise(suspect: Mapping[str, Tensor], bv: TaskVector, lam: float) -> TensorStream:
    """θ' = θ_suspect − λ·BV_inj, one tensor at a time, every other tensor passed through (the
    checkpoint writer streams it by element ranges)."""
    return bv.apply_lazily(suspect, -lam)


class Shifted(Mapping[str, Tensor]):
    """θ − λ·BV one tensor at a time, as ``load_backbone`` reads it: the whole shifted backbone
    never exists beside the model it is loaded into (the same values as a dict of them)."""

    def __init__(self, theta: Mapping[str, Tensor], bv: TaskVector, lam: float) -> None:
        self.theta, self.bv, self.lam = theta, bv, lam

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.bv:
            raise KeyError(name)
        return self.theta[name] - self.lam * self.bv[name]

    def __contains__(self, name: object) -> bool:
        return name in self.bv

    def __iter__(self) -> Iterator[str]:
        return iter(self.bv)

    def __len__(self) -> int:
        return len(self.bv)


# -- choosing λ --------------------------------------------------------------------------------
DEFAULT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)


@dataclass(frozen=True)
class SweepPoint:
    lam: float
    clean_accuracy: Rate
    asr: dict[str, Rate]  # trigger id -> ASR


def sweep(evaluate: Callable[[float], SweepPoint], grid: Sequence[float] = DEFAULT_GRID
          ) -> list[SweepPoint]:
    """Evaluate every λ of ``grid`` (λ=0 first: it is the reference of the accuracy budget)."""
    lams = sorted(set(grid) | {0.0})
    if any(lam < 0 for lam in lams):
        raise ConfigError("λ grid values must be >= 0")
    return [evaluate(lam) for lam in lams]


def choose_lambda(points: Sequence[SweepPoint], budget_points: float = 2.0) -> float:
    """The largest λ whose clean-accuracy drop from λ=0 stays within ``budget_points``.

    The 2-point budget is method.md's; experiment 5 of ``bench paper`` (docs/results/ibvs.md, table
    "λ_d the library's policy picks") shows it picks the top of a 0–2 grid on every merged attack at
    default scale, hence ``DEFAULT_GRID`` runs to 4, and 0 for BadMerging at quick scale, where
    every λ costs accuracy (the report then says the backdoor was not removed).
    """
    zero = [p for p in points if p.lam == 0.0]
    if not zero:
        raise ConfigError("the λ sweep needs a λ=0 point: it is the accuracy budget's reference")
    ref = zero[0].clean_accuracy.rate
    # a small tolerance: (0.90 − 0.88)·100 is 2.0000000000000018 in floating point
    ok = [p.lam for p in points if (ref - p.clean_accuracy.rate) * 100 <= budget_points + 1e-9]
    return max(ok)
