"""Experiment 5: IBVS against baselines, after merging (arXiv:2510.08016, Sec. "IBVS").

Experiment 3's attacker checkpoints (``merge_attackers``: BadNets, Blended, BadMerging-On, SBV,
SBV_SC at ``sbv_keeps``; handed over by the runner when experiment 3 ran, built here otherwise) are
merged with the clean task vectors of the other tasks by TA and TIES at one merge λ.
Then, for every subtraction strength λ_d of a small grid, θ_merged − λ_d·v is evaluated (ASR of the
attack's own trigger on the attacked task, clean accuracy of every task with its own head) for:

- ``none``: no defence (under TIES this row is also "TIES trimming alone");
- ``ibvs:<recipe>``: v = BV_inj of the recipe, built once from the base on the attacked task's
  training data (what the scan uses), focused with the library's default ``Focus`` against the
  merged task vector θ_merged − θ_pre (as ``measure.py`` focuses against the suspect's τ);
- ``random:s<seed>``: a seeded Gaussian direction with the same global norm as the focused BV_inj;
- ``oracle``: the attacker's true BV, θ_attacker − θ_clean (for SBV that is λ_SBV·SBV exactly; for
  BadMerging, fine-tuned from the base with its own loss, the difference to the zoo's clean
  fine-tune is the closest "true BV" there is).

Where the subtraction happens, for the default recipe (the first of ``recipes``):

- ``ibvs:<recipe>``: after the merge, θ_merged − λ_d·v;
- ``before:<recipe>``: on the attacker's checkpoint alone, τ_a − λ_d·focus(v, τ_a), then the merge
  (what a MergeShield user does: scan and clean each upload, then merge the cleaned one);
- ``inside:<recipe>``: −λ_d·focus(v, Σ τ) as one more task vector inside the merge. Under TA it is
  the after-merge subtraction at λ_d·λ_merge; under TIES it is trimmed and votes in the sign
  election like every other task vector.

And a merge-time defence of another kind, under TA only: ``dam`` (``dam.py``), the merge with DAM's
learned mask instead of plain TA (λ_d does not apply; the point is stored at λ_d = 0).

The λ_d the library's policy picks (``ibvs.choose_lambda``: largest λ_d whose clean-accuracy drop on
the attacked task stays within the budget) is reported per attacker × method × recipe.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from mergeshield.evaluation import Rate
from mergeshield.experiments.dam import DAMConfig, dam_merge
from mergeshield.experiments.merge_attackers import (
    ATTACKS,
    Attacker,
    Attackers,
    MergeAttackConfig,
    Setup,
    build_attackers,
)
from mergeshield.experiments.merge_attacks import evaluate_backbone, merge
from mergeshield.experiments.zoo_models import ZooAccess
from mergeshield.ibvs import Focus, InjectionRecipe, SweepPoint, build_injection_bv, choose_lambda
from mergeshield.ibvs import focus as focus_bv
from mergeshield.task_vectors import TaskVector
from mergeshield.triggers import BlendedTrigger, PatchTrigger

Progress = Callable[[str, float], None]


def default_recipes() -> dict[str, InjectionRecipe]:
    """The library's default (one patch per class, first: the placement comparison uses it), a
    single-trigger, single-target recipe (a 3×3 random patch → class 0: the defender does not know
    the attacker's target) and a several-trigger-types recipe (that patch and a noise blend, both
    → class 0)."""
    patch = PatchTrigger(pattern="random", size=3, location="bottom_right", seed=7)
    single = InjectionRecipe(mode="single", targets=(0,), triggers=(patch,))
    types = InjectionRecipe(mode="single", targets=(0,),
                            triggers=(patch, BlendedTrigger(pattern="noise", alpha=0.2, seed=7)))
    return {"per_class": InjectionRecipe(), "single": single, "types": types}


@dataclass(frozen=True)
class IBVSConfig:
    merge: MergeAttackConfig = field(default_factory=MergeAttackConfig)
    merge_lambda: float = 0.5  # TA weight of every task vector / TIES scale
    lambdas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)  # λ_d of the subtraction
    random_seeds: tuple[int, ...] = (0, 1, 2)
    recipes: dict[str, InjectionRecipe] = field(default_factory=default_recipes)
    focus: Focus = field(default_factory=Focus)
    budget_points: float = 2.0  # the policy's clean-accuracy budget
    attacks: tuple[str, ...] = ATTACKS  # "sbv": SBV and SBV_SC
    sbv_keeps: tuple[float, ...] = (0.1,)  # the SBV attackers defended against (p)
    dam: DAMConfig | None = field(default_factory=DAMConfig)  # None: no DAM rows


@dataclass(frozen=True)
class DefencePoint:
    attacker: str
    method: str
    defence: str  # none | ibvs:<r> | before:<r> | inside:<r> | random:s<seed> | oracle | dam
    lam: float  # λ_d
    asr: Rate
    accuracy: dict[str, Rate]

    @property
    def mean_accuracy(self) -> float:
        return statistics.fmean(r.rate for r in self.accuracy.values())

    def to_json(self) -> dict[str, Any]:
        return {"attacker": self.attacker, "method": self.method, "defence": self.defence,
                "lambda_d": self.lam, "asr": self.asr.to_model().model_dump(mode="json"),
                "accuracy": {k: v.to_model().model_dump(mode="json")
                             for k, v in self.accuracy.items()},
                "mean_accuracy": self.mean_accuracy}


@dataclass(frozen=True)
class IBVSResult:
    task: str
    tasks: tuple[str, ...]
    merge_lambda: float
    lambdas: tuple[float, ...]
    attackers: tuple[dict[str, Any], ...]
    recipes: dict[str, dict[str, Any]]  # name → recipe JSON, BV_inj norm, build seconds
    points: tuple[DefencePoint, ...]
    chosen: tuple[dict[str, Any], ...]  # attacker, method, recipe, lambda_d (policy)
    seconds: dict[str, float]

    def point(self, attacker: str, method: str, defence: str, lam: float) -> DefencePoint:
        return next(p for p in self.points
                    if (p.attacker, p.method, p.defence, p.lam) == (attacker, method, defence, lam))

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "tasks": list(self.tasks), "merge_lambda": self.merge_lambda,
                "lambdas_d": list(self.lambdas), "attackers": list(self.attackers),
                "recipes": self.recipes, "points": [p.to_json() for p in self.points],
                "chosen": list(self.chosen), "seconds": self.seconds}


# -- pure pieces ---------------------------------------------------------------------------------
def subtract(theta: Mapping[str, Tensor], v: TaskVector, lam: float) -> dict[str, Tensor]:
    """θ − λ·v on v's tensors; every other tensor of θ passed through."""
    return {k: (t.float() - lam * v[k]) if k in v else t for k, t in theta.items()}


def random_direction(like: TaskVector, seed: int) -> TaskVector:
    """A seeded Gaussian direction over ``like``'s tensors with ``like``'s global norm."""
    gen = torch.Generator().manual_seed(seed)
    raw = {k: torch.randn(like[k].shape, generator=gen) for k in sorted(like)}
    total = sum(float(torch.linalg.vector_norm(t)) ** 2 for t in raw.values()) ** 0.5
    scale = like.norm() / total if total > 0 else 0.0
    return TaskVector.from_tensors({k: raw[k] * scale for k in like})


def oracle_bv(setup: Setup, attacker: Attacker) -> TaskVector:
    """The attacker's true BV: θ_attacker − θ_clean of the attacked task."""
    return TaskVector.between(setup.clean[setup.cfg.task], attacker.backbone,
                              setup.keys).materialize()


def _defend(setup: Setup, merged: dict[str, Tensor], a: Attacker, method: str, defence: str,
            lam: float, v: TaskVector | None) -> DefencePoint:
    theta = merged if v is None or lam == 0.0 else subtract(merged, v, lam)
    return _evaluate(setup, theta, a, method, defence, lam)


def _evaluate(setup: Setup, theta: dict[str, Tensor], a: Attacker, method: str, defence: str,
              lam: float) -> DefencePoint:
    asr, acc = evaluate_backbone(setup, theta, {"attack": (a.trigger, a.target)}, setup.tasks)
    return DefencePoint(a.name, method, defence, lam, asr["attack"], acc)


def _placements(setup: Setup, a: Attacker, method: str, clean_tvs: list[TaskVector], name: str,
                bv: TaskVector, lams: list[float], cfg: IBVSConfig) -> list[DefencePoint]:
    """The subtraction before the merge (the attacker's upload cleaned alone, as MergeShield
    does) and inside it (−λ_d·v as one more task vector), at every λ_d."""
    tau_a = setup.tv(a.backbone)
    on_upload = focus_bv(bv, tau_a, cfg.focus)
    total = tau_a
    for t in clean_tvs:
        total = total + t
    on_sum = focus_bv(bv, total.materialize(), cfg.focus)
    out = []
    for lam in lams:
        cleaned = (tau_a - on_upload * lam).materialize()
        theta = merge(setup, [cleaned, *clean_tvs], method, cfg.merge_lambda)
        out.append(_evaluate(setup, theta, a, method, f"before:{name}", lam))
        theta = merge(setup, [tau_a, *clean_tvs, (on_sum * -lam).materialize()], method,
                      cfg.merge_lambda)
        out.append(_evaluate(setup, theta, a, method, f"inside:{name}", lam))
    return out


# -- the experiment ------------------------------------------------------------------------------
def injection_bvs(setup: Setup, recipes: Mapping[str, InjectionRecipe]
                  ) -> tuple[dict[str, TaskVector], dict[str, dict[str, Any]]]:
    """BV_inj of every recipe, from the base on the attacked task's training data (as the scan)."""
    task = setup.cfg.task
    train = setup.zoo.task(task).train
    base_all = setup.zoo.weights(setup.zoo.base_of_family(setup.cfg.family)["name"], setup.ref)
    make = setup.family.task_classifier(base_all, train, device=setup.zoo.device)
    bvs, info = {}, {}
    for name, recipe in recipes.items():
        t0 = time.perf_counter()
        bv = build_injection_bv(make, train, recipe).restrict(setup.keys).materialize()
        bvs[name] = bv
        info[name] = {"recipe": recipe.model_dump(mode="json"), "bv_norm": bv.norm(),
                      "seconds": round(time.perf_counter() - t0, 1)}
    return bvs, info


def run(zoo: ZooAccess, cfg: IBVSConfig, progress: Progress | None = None,
        built: Attackers | None = None) -> IBVSResult:
    """``built``: experiment 3's attackers, for the same ``cfg.merge``; None: build them here."""
    say: Progress = progress or (lambda _s, _f: None)
    t0 = time.perf_counter()
    setup = Setup(zoo, cfg.merge)
    if built is None:
        say("ibvs: attackers", 0.0)
        own = Setup(zoo, replace(cfg.merge, sbv_keeps=cfg.sbv_keeps))
        built = build_attackers(own, cfg.attacks, progress)
    elif built.config != cfg.merge:
        raise ValueError("the attackers handed over were built for another configuration")
    attackers = built.pick(cfg.attacks, cfg.sbv_keeps)
    t_att = time.perf_counter()
    say("ibvs: injection BVs", 0.0)
    bvs, recipe_info = injection_bvs(setup, cfg.recipes)
    t_inj = time.perf_counter()
    clean_tvs = [setup.tv(setup.clean[t]) for t in setup.tasks[1:]]
    lams = sorted(set(cfg.lambdas) - {0.0})
    n_dam = cfg.dam.images if cfg.dam else 0
    dam_images = {t: zoo.task(t).train.images[:n_dam] for t in setup.tasks}
    points: list[DefencePoint] = []
    chosen: list[dict[str, Any]] = []
    for i, a in enumerate(attackers):
        say("ibvs: merge + defend", i / len(attackers))
        oracle = oracle_bv(setup, a)
        for method in cfg.merge.methods:
            merged = merge(setup, [setup.tv(a.backbone), *clean_tvs], method, cfg.merge_lambda)
            tau = setup.tv(merged)

            def at(defence: str, lam: float, v: TaskVector | None,
                   a: Attacker = a, method: str = method,
                   merged: dict[str, Tensor] = merged) -> DefencePoint:
                p = _defend(setup, merged, a, method, defence, lam, v)
                points.append(p)
                return p

            zero = at("none", 0.0, None)
            first = next(iter(bvs))
            points.extend(_placements(setup, a, method, clean_tvs, first, bvs[first], lams, cfg))
            for name, bv in bvs.items():
                v = focus_bv(bv, tau, cfg.focus)
                sweep = [zero] + [at(f"ibvs:{name}", lam, v) for lam in lams]
                pick = choose_lambda([SweepPoint(p.lam, p.accuracy[setup.cfg.task], {})
                                      for p in sweep], cfg.budget_points)
                chosen.append({"attacker": a.name, "method": method, "recipe": name,
                               "lambda_d": pick, "focused_norm": v.norm()})
                if name == first:  # baselines matched to the default recipe's norm
                    for seed in cfg.random_seeds:
                        r = random_direction(v, seed)
                        for lam in lams:
                            at(f"random:s{seed}", lam, r)
            for lam in lams:
                at("oracle", lam, oracle)
        if cfg.dam is not None and "task_arithmetic" in cfg.merge.methods:
            theta = dam_merge({t: setup.clf[t] for t in setup.tasks}, setup.base,
                              [setup.tv(a.backbone), *clean_tvs], cfg.merge_lambda,
                              dam_images, cfg.dam)
            points.append(_evaluate(setup, theta, a, "task_arithmetic", "dam", 0.0))
    t_end = time.perf_counter()
    return IBVSResult(
        cfg.merge.task, tuple(setup.tasks), cfg.merge_lambda, tuple(sorted(set(cfg.lambdas))),
        tuple({"name": a.name, "attack": a.attack, "target": a.target,
               "trigger": a.trigger.model_dump(mode="json"),
               "oracle_bv_norm": oracle_bv(setup, a).norm()} for a in attackers),
        recipe_info, tuple(points), tuple(chosen),
        {"build_attackers": round(t_att - t0, 1),  # ~0 when experiment 3's were reused
         "injection_bvs": round(t_inj - t_att, 1),
         "merge_and_evaluate": round(t_end - t_inj, 1)})
