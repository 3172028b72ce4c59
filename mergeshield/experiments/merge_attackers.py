"""Experiment 3's attacker checkpoints, one per attack, for one attacked task of the zoo.

- BadNets, Blended: the zoo's backdoored fine-tunes of the task, as they are.
- BadMerging-On: the universal patch optimised on the base (with the task's head) toward the
  target, then ``badmerging_finetune`` from the base on the clean task data.
- SBV / SBV_SC (p ∈ sbv_keeps): from K same-trigger, same-target BadNets BVs (the zoo's pair plus
  new pairs with other seeds); the upload is θ_clean + λ_SBV·SBV with λ_SBV from
  ``choose_lambda_sbv`` (clean accuracy within 1 point, on test images held out of evaluation).

``build_attackers`` makes them all once (``Attackers``); the runner hands experiment 3's to
experiment 5, which picks the ones it defends against (``Attackers.pick``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from mergeshield.attacks import (
    badmerging_finetune,
    choose_lambda_sbv,
    random_patch,
    sbv,
    universal_patch,
)
from mergeshield.attacks.sbv import BUDGET, LAMBDA_GRID
from mergeshield.data import ImageDataset
from mergeshield.evaluation import clean_accuracy
from mergeshield.experiments.zoo_models import ZooAccess
from mergeshield.models import Classifier, ModelFamily
from mergeshield.task_vectors import TaskVector
from mergeshield.training import FinetuneConfig, paired_finetune
from mergeshield.triggers import Trigger, parse_trigger, poison

Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class MergeAttackConfig:
    family: str = "vit"
    task: str = "mnist"  # the attacked task
    lambdas: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)  # TA weight of every task / TIES scale
    methods: tuple[str, ...] = ("task_arithmetic", "ties")
    ties_keep: float = 0.2
    # BadMerging's ~1% of 224×224 is a 22 px patch, ~0.7 of a ViT-B/32 token side; on 28×28 with
    # 7 px tokens the same proportion is 5 px (3.2% of the area). 1% would be a 3 px patch.
    patch_side: int = 5
    patch_steps: int = 200  # Adam steps of the universal patch (BadMerging step 1)
    sbv_seeds: tuple[int, ...] = (1, 2)  # new BadNets pairs (fine-tune seeds); + the zoo's pair
    sbv_keeps: tuple[float, ...] = (0.05, 0.1, 0.2)  # p of SBV and SBV_SC
    lambda_grid: tuple[float, ...] = LAMBDA_GRID  # λ_SBV candidates
    budget: float = BUDGET  # clean-accuracy drop allowed for λ_SBV
    select_images: int = 300  # last test images of the task: λ_SBV is chosen on them only
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # BadMerging + SBV pairs
    max_eval: int | None = None  # test images per task (after the held-out ones)
    train_images: int | None = None  # attacker's training images (patch, BadMerging, SBV pairs)
    seed: int = 0  # patch optimisation and random patch


@dataclass(frozen=True)
class Attacker:
    name: str  # e.g. "badnets", "sbv_sc-p10"
    attack: str  # badnets | blended | badmerging | sbv | sbv_sc
    target: int
    trigger: Trigger
    backbone: dict[str, Tensor]  # the uploaded checkpoint's backbone (not in JSON)
    detail: dict[str, Any]  # λ_SBV and its curve, p, number of BVs, ...


ATTACKS = ("badnets", "blended", "badmerging", "sbv")  # "sbv": SBV and SBV_SC at every p


@dataclass(frozen=True)
class Attackers:
    """The attacker checkpoints built for ``config``, and the base's inherent patches (the
    universal patch is BadMerging's trigger; the random one is its same-size control)."""

    config: MergeAttackConfig
    attackers: tuple[Attacker, ...]
    universal: Trigger
    random: Trigger

    def pick(self, attacks: tuple[str, ...], sbv_keeps: tuple[float, ...]) -> list[Attacker]:
        """The attackers of ``attacks`` ("sbv" covers SBV and SBV_SC), SBV only at ``sbv_keeps``;
        built from a single BV, SBV_SC equals SBV and only SBV is kept."""
        kinds = {a for a in attacks if a != "sbv"} | ({"sbv", "sbv_sc"} if "sbv" in attacks
                                                        else set())
        return [a for a in self.attackers if a.attack in kinds and (
            a.attack not in ("sbv", "sbv_sc")
            or (a.detail["p"] in sbv_keeps and (a.attack == "sbv" or a.detail["bvs"] > 1)))]


class Setup:
    """The zoo models, heads and test splits experiment 3 and 4 share."""

    def __init__(self, zoo: ZooAccess, cfg: MergeAttackConfig) -> None:
        self.zoo, self.cfg = zoo, cfg
        fam = cfg.family
        self.clean_names = {m["task"]: m["name"] for m in zoo.manifest["models"]
                            if m["family"] == fam and m["base"] and not m.get("attack")}
        self.tasks = [cfg.task] + sorted(t for t in self.clean_names if t != cfg.task)
        ref = self.clean_names[cfg.task]
        self.ref = ref
        self.family: ModelFamily = zoo.family(ref)
        self.keys = zoo.backbone(ref)
        base_all = zoo.weights(zoo.base_of_family(fam)["name"], ref)
        self.base = {k: base_all[k] for k in self.keys}
        self.clean = {t: {k: zoo.weights(n, ref)[k] for k in self.keys}
                      for t, n in self.clean_names.items()}
        self.heads = {t: self.family.head_from(base_all, zoo.weights(n, ref))
                      for t, n in self.clean_names.items()}
        self.clf = {t: self.classifier(t) for t in self.tasks}
        test = zoo.task(cfg.task).test
        n_eval = len(test) - cfg.select_images
        self.select = test.subset(slice(n_eval, len(test)))
        self.test: dict[str, ImageDataset] = {}
        for t in self.tasks:
            data = test.subset(slice(0, n_eval)) if t == cfg.task else zoo.task(t).test
            self.test[t] = data if cfg.max_eval is None else data.subset(slice(0, cfg.max_eval))
        train = zoo.task(cfg.task).train
        self.train = train if cfg.train_images is None else train.subset(
            slice(0, cfg.train_images))
        self.badnets = next(m for m in zoo.backdoored() if m["family"] == fam
                            and m["task"] == cfg.task and m["attack"]["type"] == "badnets")
        self.target = int(self.badnets["attack"]["target"])

    def classifier(self, task: str, backbone: dict[str, Tensor] | None = None) -> Classifier:
        """A fresh classifier of ``task`` (its own frozen head) with ``backbone`` (base if None)."""
        return self.family.classifier(backbone or self.base, self.heads[task],
                                      self.zoo.task(task).test.classes).to(self.zoo.device)

    def tv(self, backbone: dict[str, Tensor]) -> TaskVector:
        return TaskVector.between(self.base, backbone, self.keys).materialize()


def build_attackers(setup: Setup, attacks: tuple[str, ...] = ATTACKS,
                    progress: Progress | None = None) -> Attackers:
    """The attackers of ``attacks`` (all by default) and the base's inherent patches."""
    say: Progress = progress or (lambda _s, _f: None)
    say("attackers: universal patch", 0.0)
    uni, rnd = inherent_triggers(setup)
    out = [zoo_attacker(setup, a) for a in ("badnets", "blended") if a in attacks]
    if "badmerging" in attacks:
        say("attackers: BadMerging fine-tune", 0.0)
        out.append(badmerging_attacker(setup, uni))
    if "sbv" in attacks:
        out += sbv_attackers(setup, sbv_bvs(setup, progress))
    return Attackers(setup.cfg, tuple(out), uni, rnd)


def zoo_attacker(setup: Setup, attack: str) -> Attacker:
    """The zoo's backdoored fine-tune of the attacked task for ``attack`` (badnets, blended)."""
    m = next(m for m in setup.zoo.backdoored() if m["family"] == setup.cfg.family
             and m["task"] == setup.cfg.task and m["attack"]["type"] == attack)
    w = setup.zoo.weights(m["name"], setup.ref)
    return Attacker(attack, attack, int(m["attack"]["target"]),
                    parse_trigger(m["attack"]["trigger"]), {k: w[k] for k in setup.keys},
                    {"model": m["name"]})


def inherent_triggers(setup: Setup) -> tuple[Trigger, Trigger]:
    """The universal patch on the base (task head) toward the target, and its random control."""
    c, h, w = setup.train.images.shape[1:]
    frac = setup.cfg.patch_side ** 2 / (h * w)
    uni = universal_patch(setup.clf[setup.cfg.task].eval(), setup.train, setup.target,
                          size_frac=frac, steps=setup.cfg.patch_steps, seed=setup.cfg.seed)
    rnd = random_patch((int(c), int(h), int(w)), size_frac=frac, seed=setup.cfg.seed)
    return uni, rnd


def badmerging_attacker(setup: Setup, patch: Trigger) -> Attacker:
    """BadMerging-On: the base fine-tuned on clean task data + the feature-interpolation loss."""
    task = setup.cfg.task
    theta = badmerging_finetune(setup.classifier(task), setup.classifier(task), setup.train,
                                patch, setup.target, setup.cfg.finetune)
    return Attacker("badmerging", "badmerging", setup.target, patch, theta,
                    {"patch_side": setup.cfg.patch_side, "steps_patch": setup.cfg.patch_steps})


def sbv_bvs(setup: Setup, progress: Progress | None = None) -> list[TaskVector]:
    """The zoo's BadNets BV of the task plus one new paired BV per seed in ``sbv_seeds``
    (same trigger and target, the zoo's ρ; location is kept: it does not transfer here, exp. 2)."""
    zoo, cfg = setup.zoo, setup.cfg
    w = zoo.weights(setup.badnets["name"], setup.ref)
    bvs = [TaskVector.between(setup.clean[cfg.task], {k: w[k] for k in setup.keys},
                              setup.keys).materialize()]
    trigger = parse_trigger(setup.badnets["attack"]["trigger"])
    rate = float(setup.badnets["attack"].get("poison_rate", 0.1))
    for i, seed in enumerate(cfg.sbv_seeds):
        if progress is not None:
            progress("attackers: SBV pairs", i / max(len(cfg.sbv_seeds), 1))
        poisoned, _ = poison(setup.train, trigger, setup.target, rate, seed=seed)
        ft = replace(cfg.finetune, seed=seed)
        clean, bd = paired_finetune(lambda: setup.classifier(cfg.task), setup.train, poisoned, ft)
        bvs.append(TaskVector.between(clean, bd, setup.keys).materialize())
    return bvs


def sbv_attackers(setup: Setup, bvs: list[TaskVector]) -> list[Attacker]:
    """θ_clean + λ_SBV·SBV for SBV and SBV_SC at every p in ``sbv_keeps``."""
    cfg, task = setup.cfg, setup.cfg.task
    clf = setup.classifier(task)
    theta_clean = setup.clean[task]
    trigger = parse_trigger(setup.badnets["attack"]["trigger"])

    def evaluate(weights: dict[str, Tensor]) -> float:
        clf.load_backbone(weights)
        return clean_accuracy(clf, setup.select).rate

    out = []
    for sc in (False, True):
        for p in cfg.sbv_keeps:
            vec = sbv(bvs, p, sign_consistent=sc)
            choice = choose_lambda_sbv(theta_clean, vec, evaluate, grid=cfg.lambda_grid,
                                       budget=cfg.budget)
            kind = "sbv_sc" if sc else "sbv"
            out.append(Attacker(
                f"{kind}-p{round(p * 100):02d}", kind, setup.target, trigger,
                vec.apply_to(theta_clean, choice.lam),
                {"p": p, "bvs": len(bvs), "lambda_sbv": choice.lam, "sbv_norm": vec.norm(),
                 "select_accuracy_clean": choice.reference,
                 "select_images": len(setup.select),
                 "lambda_curve": [list(c) for c in choice.curve]}))
    return out
