"""Experiment 2, BV similarity and transfer (arXiv:2510.08016, §BV properties).

New paired (clean, backdoored) fine-tunes from the zoo's base over a grid of trigger location ×
seed × target class × task give one BV each. The cosine matrix compares them; the transfer matrix
adds BV_a to the clean fine-tune of b (b's task and seed) and measures b's trigger → b's target.
The paper expects strong transfer across location and seed, weak across target class and task.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from mergeshield.backdoor_vectors import similarity
from mergeshield.evaluation import Rate, attack_success_rate, clean_accuracy
from mergeshield.experiments.zoo_models import ZooAccess
from mergeshield.task_vectors import TaskVector
from mergeshield.training import FinetuneConfig, batch_order, finetune
from mergeshield.triggers import Corner, PatchTrigger, poison

Progress = Callable[[str, float], None]
FACTORS = ("location", "seed", "target", "task")


@dataclass(frozen=True)
class BVSpec:
    """One point of the grid: what the backdoored fine-tune of the pair was poisoned with."""

    task: str
    location: Corner
    seed: int  # fine-tune batch order and the choice of poisoned rows
    target: int

    @property
    def id(self) -> str:
        return f"{self.task}/{self.location}/s{self.seed}/t{self.target}"

    def value(self, factor: str) -> Any:
        return getattr(self, factor)


@dataclass(frozen=True)
class SimilarityConfig:
    family: str = "vit"  # the zoo family whose base every pair starts from
    tasks: tuple[str, ...] = ("mnist", "digits")
    locations: tuple[Corner, ...] = ("bottom_right", "top_left")
    seeds: tuple[int, ...] = (0, 1)
    targets: tuple[int, ...] = (0, 1)
    full_grid: bool = True  # False: the reference + one change per factor (5 BVs, --quick)
    pattern: str = "checkerboard"  # BadNets patch, as in the zoo
    size: int = 3  # patch side in pixels (28×28 images)
    poison_rate: float = 0.1  # ρ, method.md's default
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # seed set per BV
    head_seed: int = 0  # the linear-probe head of each task (shared by every pair on it)
    max_eval: int | None = None  # test images per task; None = the zoo's whole test split


def grid(cfg: SimilarityConfig) -> list[BVSpec]:
    """The full product of the factors, or the reference and one change per factor."""
    ref = BVSpec(cfg.tasks[0], cfg.locations[0], cfg.seeds[0], cfg.targets[0])
    if cfg.full_grid:
        return [BVSpec(t, loc, s, y) for t, loc, s, y in
                itertools.product(cfg.tasks, cfg.locations, cfg.seeds, cfg.targets)]
    return [ref, replace(ref, location=cfg.locations[1]), replace(ref, seed=cfg.seeds[1]),
            replace(ref, target=cfg.targets[1]), replace(ref, task=cfg.tasks[1])]


def trigger_of(spec: BVSpec, cfg: SimilarityConfig) -> PatchTrigger:
    return PatchTrigger.model_validate({"pattern": cfg.pattern, "size": cfg.size,
                                        "location": spec.location})


def differing(a: BVSpec, b: BVSpec) -> tuple[str, ...]:
    """The factors in which two grid points differ."""
    return tuple(f for f in FACTORS if a.value(f) != b.value(f))


def cosine_matrix(bvs: Sequence[TaskVector]) -> list[list[float]]:
    """Global cosine of every pair of BVs: symmetric, unit diagonal."""
    m = similarity(bvs)
    return [[m[i][j] if i <= j else m[j][i] for j in range(len(bvs))] for i in range(len(bvs))]


def summarise(specs: Sequence[BVSpec], cosine: Sequence[Sequence[float]],
              transfer: Sequence[Sequence[Rate]]) -> dict[str, dict[str, Any]]:
    """Per factor: mean cosine and mean transfer ASR over ordered pairs (a ≠ b) that differ in
    that factor only; ``transfer[a][b]`` is b's ASR on clean_b + BV_a."""
    out: dict[str, dict[str, Any]] = {}
    for factor in FACTORS:
        pairs = [(i, j) for i, a in enumerate(specs) for j, b in enumerate(specs)
                 if differing(a, b) == (factor,)]
        if not pairs:
            continue
        out[factor] = {
            "pairs": len(pairs),
            "mean_cosine": statistics.fmean(cosine[i][j] for i, j in pairs),
            "mean_transfer_asr": statistics.fmean(transfer[i][j].rate for i, j in pairs),
            "transfer_hits": sum(transfer[i][j].hits for i, j in pairs),
            "transfer_total": sum(transfer[i][j].total for i, j in pairs),
        }
    return out


@dataclass(frozen=True)
class SimilarityResult:
    specs: tuple[BVSpec, ...]
    bv_norms: tuple[float, ...]
    cosine: tuple[tuple[float, ...], ...]
    transfer: tuple[tuple[Rate, ...], ...]  # [a][b]: b's trigger → b's target on clean_b + BV_a
    clean_asr: tuple[Rate, ...]  # b's trigger on clean_b alone: the floor of column b
    clean_accuracy: tuple[tuple[Rate, Rate], ...]  # (clean_b, backdoored_b) on b's test set
    summary: dict[str, dict[str, Any]]
    seconds_finetuning: float

    def to_json(self) -> dict[str, Any]:
        def rate(r: Rate) -> dict[str, Any]:
            return r.to_model().model_dump(mode="json")

        return {
            "bvs": [{"id": s.id, "task": s.task, "location": s.location, "seed": s.seed,
                     "target": s.target, "bv_norm": n, "clean_asr": rate(a),
                     "clean_accuracy_clean": rate(ca[0]), "clean_accuracy_backdoored": rate(ca[1])}
                    for s, n, a, ca in zip(self.specs, self.bv_norms, self.clean_asr,
                                           self.clean_accuracy, strict=True)],
            "cosine": [list(row) for row in self.cosine],
            "transfer": [[rate(r) for r in row] for row in self.transfer],
            "summary": self.summary,
            "seconds_finetuning": self.seconds_finetuning,
        }


def run(zoo: ZooAccess, cfg: SimilarityConfig,
        progress: Progress | None = None) -> SimilarityResult:
    """Fine-tune the grid's pairs, then measure cosine and transfer."""
    import time

    say: Progress = progress or (lambda _s, _f: None)
    specs = grid(cfg)
    some = next(m for m in zoo.manifest["models"]
                if m["family"] == cfg.family and m["base"] is not None)["name"]
    family = zoo.family(some)
    keys = zoo.backbone(some)
    base = zoo.weights(zoo.base_of_family(cfg.family)["name"], some)
    makers = {t: family.task_classifier(base, zoo.task(t).train, device=zoo.device,
                                        seed=cfg.head_seed)
              for t in cfg.tasks}
    t0 = time.perf_counter()
    cleans: dict[tuple[str, int], dict[str, Tensor]] = {}
    bvs: list[TaskVector] = []
    for n, spec in enumerate(specs):
        say("bv-similarity: fine-tune", n / len(specs))
        train = zoo.task(spec.task).train
        ft = replace(cfg.finetune, seed=spec.seed)
        order = batch_order(len(train), ft)  # one order for both halves of the pair
        if (spec.task, spec.seed) not in cleans:
            cleans[spec.task, spec.seed] = finetune(makers[spec.task](), train, ft, order=order)
        poisoned, _ = poison(train, trigger_of(spec, cfg), spec.target, cfg.poison_rate,
                             seed=spec.seed)
        bd = finetune(makers[spec.task](), poisoned, ft, order=order)
        bvs.append(TaskVector.between(cleans[spec.task, spec.seed], bd, keys).materialize())
    seconds = time.perf_counter() - t0
    cos = cosine_matrix(bvs)
    transfer: list[list[Rate]] = [[] for _ in specs]
    floor, accs = [], []
    for j, b in enumerate(specs):
        say("bv-similarity: transfer", j / len(specs))
        test = zoo.task(b.task).test
        test = test if cfg.max_eval is None else test.subset(slice(0, cfg.max_eval))
        trig, clf = trigger_of(b, cfg), makers[b.task]()
        clean_b = {k: cleans[b.task, b.seed][k] for k in keys}
        clf.load_backbone(clean_b)
        floor.append(attack_success_rate(clf, test, trig, b.target))
        ca_clean = clean_accuracy(clf, test)
        for i, bv_a in enumerate(bvs):
            clf.load_backbone(bv_a.apply_to(clean_b))
            transfer[i].append(attack_success_rate(clf, test, trig, b.target))
            if i == j:  # clean_b + BV_b is exactly the backdoored fine-tune
                accs.append((ca_clean, clean_accuracy(clf, test)))
    return SimilarityResult(
        tuple(specs), tuple(bv.norm() for bv in bvs), tuple(tuple(r) for r in cos),
        tuple(tuple(r) for r in transfer), tuple(floor), tuple(accs),
        summarise(specs, cos, transfer), round(seconds, 1))
