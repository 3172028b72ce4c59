"""The hold-out efficacy bench: plant drawn attacks, defend them every way, measure what is left.

Per planted attack (own ASR ≥ ``min_asr``; the others are counted, not defended) and per defence:
hidden-trigger ASR and clean accuracy before / after (single checkpoint); the merge of the three
tasks with the attacked one before / after, every checkpoint defended (merge setting); and whether
the backdoor comes back (the cleaned checkpoint merged with the zoo's clean task vectors; after a
short clean fine-tune). Per clean fine-tune (new seeds) and detecting defence: the verdict, the
score and the accuracy cost. Everything is returned as JSON-ready dicts; ``metrics.py`` sums them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from mergeshield.efficacy import baselines
from mergeshield.efficacy.attacks import FAMILIES, Attack, clean_seeds, draw
from mergeshield.efficacy.defences import Case, Cleaned, Defence, RepairDefence, scan_defences
from mergeshield.efficacy.world import Backbone, World, WorldConfig
from mergeshield.evaluation import Rate
from mergeshield.experiments.dam import DAMConfig, dam_merge
from mergeshield.pipeline import ScanRequest
from mergeshield.training import FinetuneConfig

Progress = Callable[[str, float], None]
DEFENCES = ("product", "ibvs-plain", "ibvs-focused", "fine-tuning", "fine-pruning",
            "nc-unlearning", "anp", "dam")  # dam: merge setting only


@dataclass(frozen=True)
class BenchConfig:
    zoo: Path  # a built zoo (default scale for the real bench, the quick one in CI)
    work: Path  # suspects, scans' outputs (kept for inspection)
    split: str = "dev"
    attacks: int = 6  # planted attacks wanted (attacks are drawn until this many planted)
    max_draws: int | None = None  # stop drawing here even if fewer planted; None = 2 × attacks
    clean: int = 6  # clean fine-tunes with new seeds
    families: tuple[str, ...] = FAMILIES
    defences: tuple[str, ...] = DEFENCES
    min_asr: float = 0.8  # an attack that does not reach this on its own is not defended
    # TA weight of every task vector (experiment 5's); TIES scale: the zoo's three tasks
    # interfere, and these keep the merges' accuracy highest (TA 0.8: every task ≈ 30 %)
    merge_lambda: float = 0.5
    ties_scale: float = 1.0
    merge_methods: tuple[str, ...] = ("task_arithmetic", "ties")
    ties_keep: float = 0.2
    comeback: FinetuneConfig = FinetuneConfig(epochs=1, lr=1e-3)  # the short clean fine-tune
    world: WorldConfig = field(default_factory=WorldConfig)
    cache_dir: Path | None = None  # the shared BV_inj cache of the scans
    # ScanRequest fields set on every scan defence, product included: {} for real numbers; CI
    # uses it to skip inversion (the product's defaults are then no longer measured)
    scan_overrides: dict[str, Any] = field(default_factory=dict)
    dam: DAMConfig | None = field(default_factory=DAMConfig)  # merge setting, TA only; None: off
    resume: bool = False  # reuse the cases of ``work/cases*.jsonl`` (same split and defences)
    shard: tuple[int, int] | None = None  # (i, n): run shard i of n (``Bench.run_shard``)
    repair: baselines.RepairConfig = field(default_factory=baselines.RepairConfig)

    @property
    def label(self) -> str:
        """The split's name in pages and results.json: ``test6``, or ``test6-clip`` for CLIP."""
        family = self.world.family
        return self.split if family == "vit" else f"{self.split}-{family}"


def _rate(r: Rate) -> dict[str, Any]:
    return r.to_model().model_dump(mode="json")


def build_defences(cfg: BenchConfig) -> list[Defence]:
    repairs = {"fine-tuning": baselines.fine_tune, "fine-pruning": baselines.fine_prune,
               "nc-unlearning": baselines.nc_unlearn, "anp": baselines.anp}
    out: list[Defence] = [replace(d, overrides={**d.overrides, **cfg.scan_overrides})
                          for d in scan_defences(cfg.cache_dir) if d.name in cfg.defences]
    out += [RepairDefence(n, partial(f, cfg=cfg.repair)) for n, f in repairs.items()
            if n in cfg.defences]
    return out


def _aliases(defences: list[Defence]) -> dict[str, str]:
    """Scan defences whose requests are identical (e.g. the product's defaults = focused IBVS
    at the bench's creation) run once: name → the name whose result it shares."""
    seen: dict[str, str] = {}
    out: dict[str, str] = {}
    for d in defences:
        overrides = getattr(d, "overrides", None)
        if overrides is None:
            continue
        h = ScanRequest(suspect="s", base="b", evaluation="e", **overrides).config_hash()
        out[d.name] = seen.setdefault(h, d.name)
    return out


class Bench:
    def __init__(self, cfg: BenchConfig, progress: Progress | None = None) -> None:
        self.cfg, self.say = cfg, progress or (lambda _s, _f: None)
        self.world = World(cfg.zoo, cfg.world)
        self.defences = build_defences(cfg)
        self.alias = _aliases(self.defences)
        self._zoo_cleaned: dict[tuple[str, str], Backbone] = {}

    def defend(self, case: Case) -> dict[str, Cleaned]:
        out: dict[str, Cleaned] = {}
        for d in self.defences:
            shared = self.alias.get(d.name, d.name)
            out[d.name] = out[shared] if shared in out else d(self.world, case)
        return out

    def zoo_cleaned(self, name: str, task: str) -> Backbone:
        """The zoo's clean fine-tune of ``task`` as defence ``name`` returns it (merge setting)."""
        key = (name, task)
        if key not in self._zoo_cleaned:
            w = self.world
            case = Case(task, w.clean[task], w.path(w.clean_names[task]),
                        self.cfg.work / "zoo-clean" / task, seed=0)
            d = next(x for x in self.defences if x.name == self.alias.get(name, name))
            self._zoo_cleaned[key] = d(w, case).backbone
        return self._zoo_cleaned[key]

    def merges(self, attacked: str, backbone: Backbone, others: dict[str, Backbone],
               method: str) -> Backbone:
        order = [backbone] + [others[t] for t in self.world.tasks if t != attacked]
        lam = self.cfg.ties_scale if method == "ties" else self.cfg.merge_lambda
        return self.world.merge(order, method, lam, self.cfg.ties_keep)

    def accuracies(self, backbone: Backbone) -> dict[str, Any]:
        return {t: _rate(self.world.accuracy(t, backbone)) for t in self.world.tasks}

    def attack_case(self, attack: Attack) -> dict[str, Any]:
        w, task = self.world, attack.task
        trigger = w.trigger(attack)
        t0 = time.perf_counter()
        planted = w.plant(attack)
        own = w.asr(task, planted, trigger, attack.target)
        row: dict[str, Any] = {"attack": attack.to_json(), "own_asr": _rate(own),
                               "planted": own.rate >= self.cfg.min_asr,
                               "clean_accuracy": _rate(w.accuracy(task, planted)),
                               "plant_seconds": round(time.perf_counter() - t0, 1)}
        if not row["planted"]:
            return row
        folder = w.save(task, planted, self.cfg.work / attack.id / "suspect")
        case = Case(task, planted, folder, self.cfg.work / attack.id, attack.seed)
        hidden = partial(w.asr, task, trigger=trigger, target=attack.target)
        row["merge"] = {}
        for method in self.cfg.merge_methods:
            clean_merge = self.merges(task, w.clean[task], w.clean, method)
            before = self.merges(task, planted, w.clean, method)
            row["merge"][method] = {"clean_merge_asr": _rate(hidden(clean_merge)),
                                    "before": {"asr": _rate(hidden(before)),
                                               "accuracy": self.accuracies(before)},
                                    "defences": {}}
        row["defences"] = {}
        for name, c in self.defend(case).items():
            tuned = w.finetune(task, w.defender(task), attack.seed, c.backbone, self.cfg.comeback)
            res: dict[str, Any] = {
                "asr": _rate(hidden(c.backbone)), "accuracy": _rate(w.accuracy(task, c.backbone)),
                "flagged": c.flagged, "score": c.score, "seconds": round(c.seconds, 1),
                "detail": c.detail, "comeback_finetune_asr": _rate(hidden(tuned)),
                "comeback_merge_asr": {}}
            for method in self.cfg.merge_methods:
                res["comeback_merge_asr"][method] = _rate(hidden(
                    self.merges(task, c.backbone, w.clean, method)))
                others = {t: self.zoo_cleaned(name, t) for t in w.tasks if t != task}
                defended = self.merges(task, c.backbone, others, method)
                row["merge"][method]["defences"][name] = {
                    "asr": _rate(hidden(defended)), "accuracy": self.accuracies(defended)}
            row["defences"][name] = res
        if self._dam():
            t1 = time.perf_counter()
            merged = self.dam(task, planted)
            row["merge"]["task_arithmetic"]["defences"]["dam"] = {
                "asr": _rate(hidden(merged)), "accuracy": self.accuracies(merged),
                "seconds": round(time.perf_counter() - t1, 1)}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row

    def _dam(self) -> bool:
        cfg = self.cfg
        return cfg.dam is not None and "dam" in cfg.defences and "task_arithmetic" in \
            cfg.merge_methods

    def dam(self, attacked: str, backbone: Backbone) -> Backbone:
        """DAM's masked TA merge (a merge-time defence: no single-checkpoint row) from
        unlabelled defender images of every task."""
        assert self.cfg.dam is not None
        w = self.world
        tvs = [w.tv(backbone)] + [w.tv(w.clean[t]) for t in w.tasks if t != attacked]
        images = {t: w.defender(t).images[:self.cfg.dam.images] for t in w.tasks}
        merged = dam_merge({t: w.classifier(t) for t in w.tasks}, w.base, tvs,
                           self.cfg.merge_lambda, images, self.cfg.dam)
        return {k: merged[k] for k in w.keys}

    def clean_case(self, index: int, seed: int) -> dict[str, Any]:
        w = self.world
        task = w.tasks[index % len(w.tasks)]
        t0 = time.perf_counter()
        backbone = w.finetune(task, w.data[task].train, seed)
        folder = w.save(task, backbone, self.cfg.work / f"clean-{index:03d}" / "suspect")
        case = Case(task, backbone, folder, self.cfg.work / f"clean-{index:03d}", seed)
        row: dict[str, Any] = {"index": index, "seed": seed, "task": task,
                               "accuracy": _rate(w.accuracy(task, backbone)), "defences": {}}
        for d in self.defences:
            if not isinstance(d, RepairDefence):  # repairs do not detect: nothing to measure
                shared = self.alias.get(d.name, d.name)
                c = row["defences"].get(shared) if shared != d.name else None
                row["defences"][d.name] = c or self._clean_result(d, case)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row

    def _clean_result(self, d: Defence, case: Case) -> dict[str, Any]:
        c = d(self.world, case)
        return {"flagged": c.flagged, "score": c.score, "seconds": round(c.seconds, 1),
                "accuracy": _rate(self.world.accuracy(case.task, c.backbone)),
                "detail": c.detail}

    def _journal(self) -> dict[str, dict[str, Any]]:
        """Rows of earlier runs of the same split and defences (``resume``: every
        ``work/cases*.jsonl``, shards' included), by case key; each case is appended to this
        run's journal as soon as it is done."""
        self.cfg.work.mkdir(parents=True, exist_ok=True)
        if not self.cfg.resume:
            self._path.write_text("")
            return {}
        names = [d.name for d in self.defences]
        out: dict[str, dict[str, Any]] = {}
        for path in sorted(self.cfg.work.glob("cases*.jsonl")):
            for x in (json.loads(t) for t in path.read_text().splitlines() if t.strip()):
                if x["defences"] == names:
                    out[x["key"]] = x["row"]
        return out

    @property
    def _path(self) -> Path:
        shard = self.cfg.shard
        return self.cfg.work / ("cases.jsonl" if shard is None else f"cases-{shard[0]}.jsonl")

    def _case(self, done: dict[str, dict[str, Any]], key: str,
              make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if key in done:
            return done[key]
        row = make()
        entry = {"key": key, "defences": [d.name for d in self.defences], "row": row}
        with self._path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        return row

    def run_shard(self, shard: int, shards: int) -> None:
        """Shard ``shard`` of ``shards`` processes: every shards-th attack draw (until its share
        of planted attacks) and clean fine-tune, journaled only; a later run with ``resume``
        and no shard collects them (and computes whatever is missing)."""
        cfg, done = self.cfg, self._journal()
        limit = cfg.max_draws or 2 * cfg.attacks
        share, planted = -(-cfg.attacks // shards), 0
        for index in range(shard, limit, shards):
            if planted >= share:
                break
            a = draw(cfg.split, index, self.world.tasks, families=cfg.families)
            self.say(f"{cfg.split} shard {shard}: attack {a.id}", index / limit)
            planted += bool(self._case(done, a.id, partial(self.attack_case, a))["planted"])
        seeds = clean_seeds(cfg.split, cfg.clean)
        for i in range(shard, cfg.clean, shards):
            self.say(f"{cfg.split} shard {shard}: clean fine-tune {i}", i / max(1, cfg.clean))
            self._case(done, f"clean-{seeds[i]}", partial(self.clean_case, i, seeds[i]))

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        cfg = self.cfg
        done = self._journal()
        rows: list[dict[str, Any]] = []
        cleans: list[dict[str, Any]] = []
        seeds = clean_seeds(cfg.split, cfg.clean)
        limit = cfg.max_draws or 2 * cfg.attacks  # draws until ``attacks`` planted, at most

        def more_attacks() -> bool:
            return sum(r["planted"] for r in rows) < cfg.attacks and len(rows) < limit

        # attacks and clean fine-tunes alternate, so an interrupted run has both kinds
        while more_attacks() or len(cleans) < cfg.clean:
            if more_attacks():
                a = draw(cfg.split, len(rows), self.world.tasks, families=cfg.families)
                self.say(f"{cfg.split}: attack {a.id}", len(rows) / limit)
                rows.append(self._case(done, a.id, partial(self.attack_case, a)))
            if len(cleans) < cfg.clean:
                i, seed = len(cleans), seeds[len(cleans)]
                self.say(f"{cfg.split}: clean fine-tune {i}", i / max(1, cfg.clean))
                cleans.append(self._case(done, f"clean-{seed}", partial(self.clean_case, i, seed)))
        merge_only = ["dam"] if self._dam() else []
        return {"split": cfg.split, "attacks": rows, "clean": cleans,
                "defences": [d.name for d in self.defences], "aliases": self.alias,
                "merge_only": merge_only,
                "seconds": round(time.perf_counter() - t0, 1)}
