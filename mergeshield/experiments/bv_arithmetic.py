"""Experiment 1, BV arithmetic: the injection curve of θ + λ·BV (arXiv:2510.08016, §BV).

For each backdoored zoo fine-tune, BV = θ_backdoored − θ_clean (same seed and batch order).
Adding λ·BV to the clean fine-tune, or to the pre-trained base, should inject the planted
backdoor: ASR of that model's trigger → target rises with λ while clean accuracy stays flat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mergeshield.backdoor_vectors import backdoor_vector
from mergeshield.evaluation import Rate, attack_success_rate, clean_accuracy
from mergeshield.experiments.zoo_models import ZooAccess
from mergeshield.triggers import parse_trigger

Start = Literal["clean", "base"]
Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class ArithmeticConfig:
    lambdas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # the injection curve
    attacks: tuple[str, ...] = ("badnets", "blended")  # attack types of the zoo to cover
    models: tuple[str, ...] = ()  # restrict to these backdoored fine-tunes; () = all
    starts: tuple[Start, ...] = ("clean", "base")  # θ in θ + λ·BV
    max_eval: int | None = None  # test images per task; None = the zoo's whole test split


@dataclass(frozen=True)
class ArithmeticPoint:
    start: Start
    lam: float
    asr: Rate  # the model's own planted trigger → target, non-target test images only
    clean_accuracy: Rate


@dataclass(frozen=True)
class ArithmeticCurve:
    model: str
    family: str
    task: str
    attack: str
    target: int
    trigger: dict[str, Any]
    bv_norm: float
    points: tuple[ArithmeticPoint, ...]

    def point(self, start: Start, lam: float) -> ArithmeticPoint:
        return next(p for p in self.points if p.start == start and p.lam == lam)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "family": self.family, "task": self.task,
            "attack": self.attack, "target": self.target, "trigger": self.trigger,
            "bv_norm": self.bv_norm,
            "points": [{"start": p.start, "lambda": p.lam,
                        "asr": p.asr.to_model().model_dump(mode="json"),
                        "clean_accuracy": p.clean_accuracy.to_model().model_dump(mode="json")}
                       for p in self.points],
        }


def selected(zoo: ZooAccess, cfg: ArithmeticConfig) -> list[dict[str, Any]]:
    """The backdoored fine-tunes the experiment covers."""
    return [m for m in zoo.backdoored() if m["attack"]["type"] in cfg.attacks
            and (not cfg.models or m["name"] in cfg.models)]


def injection_curve(zoo: ZooAccess, name: str, cfg: ArithmeticConfig) -> ArithmeticCurve:
    """ASR and clean accuracy of θ + λ·BV for ``name``'s BV, θ ∈ {clean fine-tune, base}."""
    entry = zoo.entry(name)
    clean_name = zoo.clean_of(entry)["name"]
    family = zoo.family(name)
    keys = zoo.backbone(name)
    base = zoo.weights(entry["base"], name)
    clean = zoo.weights(clean_name, name)
    bv = backdoor_vector(clean, zoo.weights(name, name), keys).materialize()
    test = zoo.task(entry["task"]).test
    if cfg.max_eval is not None:
        test = test.subset(slice(0, cfg.max_eval))
    attack = entry["attack"]
    trigger = parse_trigger(attack["trigger"])
    # (N, C, H, W) test images; the head is the task's (frozen) one, from the clean fine-tune
    clf = family.classifier(clean, family.head_from(base, clean), test.classes).to(zoo.device)
    starts = {"clean": clean, "base": base}
    points = []
    for start in cfg.starts:
        for lam in cfg.lambdas:
            clf.load_backbone(bv.apply_to({k: starts[start][k] for k in keys}, lam))
            points.append(ArithmeticPoint(
                start, float(lam), attack_success_rate(clf, test, trigger, attack["target"]),
                clean_accuracy(clf, test)))
    return ArithmeticCurve(name, entry["family"], entry["task"], attack["type"],
                           int(attack["target"]), dict(attack["trigger"]), bv.norm(),
                           tuple(points))


def run(zoo: ZooAccess, cfg: ArithmeticConfig,
        progress: Progress | None = None) -> list[ArithmeticCurve]:
    """The injection curve of every selected backdoored fine-tune."""
    models = selected(zoo, cfg)
    curves = []
    for i, m in enumerate(models):
        if progress is not None:
            progress("bv-arithmetic", i / max(len(models), 1))
        curves.append(injection_curve(zoo, m["name"], cfg))
    return curves
