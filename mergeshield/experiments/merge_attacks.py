"""Experiments 3 and 4: attacks after merging, and inherent triggers (arXiv:2510.08016).

3. Each attacker checkpoint (``merge_attackers``) of the attacked task is merged with the clean zoo
   fine-tunes of the other tasks by Task Arithmetic and TIES over a λ grid: ASR of the attack's
   own trigger → target on the attacked task, and clean accuracy of every task with its own head.
4. A universal patch optimised on the base toward the target (no backdoor anywhere) and a random
   patch of the same size and place: their ASR on the base, on the clean merge (every task's
   clean fine-tune) and on every merge of experiment 3, measured on the same merged weights.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Literal, cast

from torch import Tensor

from mergeshield.evaluation import Rate, attack_success_rate, clean_accuracy
from mergeshield.experiments.merge_attackers import (
    Attacker,
    Attackers,
    MergeAttackConfig,
    Progress,
    Setup,
    build_attackers,
)
from mergeshield.experiments.zoo_models import ZooAccess
from mergeshield.merging import MergeConfig, merged_tensors
from mergeshield.task_vectors import TaskVector
from mergeshield.triggers import Trigger

Checks = dict[str, tuple[Trigger, int]]  # name → (trigger, target), measured on the attacked task
CLEAN = "none"  # the attacker name of the clean merge (no backdoored model)


def _rate(r: Rate) -> dict[str, Any]:
    return r.to_model().model_dump(mode="json")


@dataclass(frozen=True)
class MergePoint:
    attacker: str  # an Attacker.name, or CLEAN
    method: str
    lam: float
    asr: dict[str, Rate]  # "attack" (own trigger), "universal", "random"; CLEAN: per attack type
    accuracy: dict[str, Rate]  # clean accuracy per task, each with its own head

    @property
    def mean_accuracy(self) -> float:
        """Unweighted mean of the tasks' clean accuracies."""
        return statistics.fmean(r.rate for r in self.accuracy.values())

    def to_json(self) -> dict[str, Any]:
        return {"attacker": self.attacker, "method": self.method, "lambda": self.lam,
                "asr": {k: _rate(v) for k, v in self.asr.items()},
                "accuracy": {k: _rate(v) for k, v in self.accuracy.items()},
                "mean_accuracy": self.mean_accuracy}


@dataclass(frozen=True)
class Single:
    """One unmerged model on the attacked task: the base, the clean fine-tune, an attacker."""

    name: str
    asr: dict[str, Rate]
    accuracy: Rate
    tv_norm: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "asr": {k: _rate(v) for k, v in self.asr.items()},
                "accuracy": _rate(self.accuracy), "tv_norm": self.tv_norm}


@dataclass(frozen=True)
class MergeAttackResult:
    task: str
    tasks: tuple[str, ...]
    target: int
    attackers: tuple[dict[str, Any], ...]  # name, attack, target, trigger, detail
    singles: tuple[Single, ...]
    points: tuple[MergePoint, ...]
    universal: Trigger
    random: Trigger
    seconds: dict[str, float]
    built: Attackers  # the checkpoints themselves (not in JSON): experiment 5 reuses them

    def point(self, attacker: str, method: str, lam: float) -> MergePoint:
        return next(p for p in self.points
                    if (p.attacker, p.method, p.lam) == (attacker, method, lam))

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "tasks": list(self.tasks), "target": self.target,
                "attackers": list(self.attackers), "singles": [s.to_json() for s in self.singles],
                "points": [p.to_json() for p in self.points],
                "universal_patch": self.universal.model_dump(mode="json"),
                "random_patch": self.random.model_dump(mode="json"), "seconds": self.seconds}


def merge_and_evaluate(setup: Setup, tvs: list[TaskVector], method: str, lam: float,
                       checks: Checks) -> tuple[dict[str, Rate], dict[str, Rate]]:
    """ASR of every check on the attacked task, and every task's clean accuracy, of
    θ_pre + merge(tvs) (TA: λ per task vector; TIES: keep ``ties_keep``, scale λ)."""
    return evaluate_backbone(setup, merge(setup, tvs, method, lam), checks, setup.tasks)


def merge(setup: Setup, tvs: list[TaskVector], method: str, lam: float) -> dict[str, Tensor]:
    """θ_pre + merge(tvs) by ``method`` (TA: λ per task vector; TIES: keep ``ties_keep``)."""
    cfg = MergeConfig(method=cast(Literal["task_arithmetic", "ties"], method), weights=[lam],
                      keep=setup.cfg.ties_keep)
    return dict(merged_tensors(setup.base, tvs, cfg))


def evaluate_backbone(setup: Setup, backbone: dict[str, Tensor], checks: Checks,
                      tasks: list[str]) -> tuple[dict[str, Rate], dict[str, Rate]]:
    task = setup.cfg.task
    clf = setup.clf[task]
    clf.load_backbone(backbone)
    asr = {name: attack_success_rate(clf, setup.test[task], trig, target)
           for name, (trig, target) in checks.items()}
    accuracy = {}
    for t in tasks:
        setup.clf[t].load_backbone(backbone)
        accuracy[t] = clean_accuracy(setup.clf[t], setup.test[t])
    return asr, accuracy


def _summary(a: Attacker) -> dict[str, Any]:
    return {"name": a.name, "attack": a.attack, "target": a.target,
            "trigger": a.trigger.model_dump(mode="json"), "detail": a.detail}


def run(zoo: ZooAccess, cfg: MergeAttackConfig,
        progress: Progress | None = None) -> MergeAttackResult:
    """Build the attackers, merge each (and the clean set) over methods × λ, evaluate."""
    say: Progress = progress or (lambda _s, _f: None)
    t0 = time.perf_counter()
    setup = Setup(zoo, cfg)
    built = build_attackers(setup, progress=progress)
    attackers, uni, rnd = list(built.attackers), built.universal, built.random
    t_build = time.perf_counter() - t0
    probes: Checks = {"universal": (uni, setup.target), "random": (rnd, setup.target)}
    floors: Checks = {a.attack: (a.trigger, a.target) for a in attackers
                      if a.attack in ("badnets", "blended")}
    singles = []
    for name, theta in [("base", setup.base), ("clean", setup.clean[cfg.task]),
                        *((a.name, a.backbone) for a in attackers)]:
        own = next((a for a in attackers if a.name == name), None)
        checks = {"attack": (own.trigger, own.target)} if own else floors
        asr, acc = evaluate_backbone(setup, theta, {**checks, **probes}, [cfg.task])
        singles.append(Single(name, asr, acc[cfg.task], setup.tv(theta).norm()))
    clean_tvs = [setup.tv(setup.clean[t]) for t in setup.tasks]
    runs: list[tuple[str, list[TaskVector], Checks]] = [(CLEAN, clean_tvs, floors)]
    runs += [(a.name, [setup.tv(a.backbone), *clean_tvs[1:]], {"attack": (a.trigger, a.target)})
             for a in attackers]
    points = []
    for i, (name, tvs, checks) in enumerate(runs):
        say("merge-attacks: merge + evaluate", i / len(runs))
        for method in cfg.methods:
            for lam in cfg.lambdas:
                asr, acc = merge_and_evaluate(setup, tvs, method, lam, {**checks, **probes})
                points.append(MergePoint(name, method, float(lam), asr, acc))
    return MergeAttackResult(
        cfg.task, tuple(setup.tasks), setup.target, tuple(_summary(a) for a in attackers),
        tuple(singles), tuple(points), uni, rnd,
        {"build_attackers": round(t_build, 1),
         "merge_and_evaluate": round(time.perf_counter() - t0 - t_build, 1)}, built)
