"""``mergeshield bench paper``: run the experiments on a zoo, write tables, plots and JSON.

Computation lives in the experiment modules; this module chooses the configuration (quick or
default), builds the zoo when none is given, and writes every file under ``out``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch

from mergeshield import __version__
from mergeshield.errors import ConfigError
from mergeshield.experiments import (
    bv_arithmetic,
    bv_similarity,
    claims,
    detection,
    ibvs_baselines,
    merge_attacks,
    plots,
    tables,
)
from mergeshield.experiments.dam import DAMConfig
from mergeshield.experiments.merge_attackers import Attackers, MergeAttackConfig
from mergeshield.experiments.zoo_models import ZooAccess
from mergeshield.zoo import Scale, ZooConfig, build_zoo

Progress = Callable[[str, float], None]
EXPERIMENTS = {1: "bv-arithmetic", 2: "bv-similarity", 3: "merge-attacks", 4: "inherent-triggers",
               5: "ibvs", 6: "detection"}


@dataclass(frozen=True)
class PaperConfig:
    out: Path
    zoo: Path | None = None  # an existing zoo; None or missing manifest: build one first
    quick: bool = False  # CI size: reduced grids, the quick zoo
    scale: Literal["cpu", "gpu"] = "cpu"  # gpu: the zoo's GPU scale (a ~25 M-parameter ViT)
    seed: int = 0  # zoo build and every new fine-tune (experiment 2 uses seed, seed + 1)
    only: tuple[int, ...] = (1, 2, 3, 4, 5, 6)  # which experiments to run
    arithmetic: bv_arithmetic.ArithmeticConfig | None = None  # None: arithmetic_config(quick)
    similarity: bv_similarity.SimilarityConfig | None = None  # None: similarity_config(...)
    merging: MergeAttackConfig | None = None  # experiments 3, 4 and 5; None: merge_config(...)


def arithmetic_config(quick: bool) -> bv_arithmetic.ArithmeticConfig:
    """Experiment 1's configuration: the same λ grid in both modes (evaluation is cheap)."""
    return bv_arithmetic.ArithmeticConfig()


def similarity_config(quick: bool, seed: int, zoo_cfg: ZooConfig) -> bv_similarity.SimilarityConfig:
    """Experiment 2: the full 2×2×2×2 grid, or the reference + one change per factor (quick);
    fine-tunes as long as the zoo's own."""
    return bv_similarity.SimilarityConfig(seeds=(seed, seed + 1), full_grid=not quick,
                                          finetune=zoo_cfg.finetune, head_seed=seed)


def merge_config(quick: bool, seed: int, zoo_cfg: ZooConfig) -> MergeAttackConfig:
    """Experiments 3 + 4 (one pass): ViT, attacked task mnist, the zoo's fine-tune settings for
    BadMerging and the SBV pairs; quick: 2 λ, 2 BVs for SBV, 100 patch steps, 500 test images."""
    if quick:
        return MergeAttackConfig(lambdas=(0.5, 1.0), sbv_seeds=(seed + 1,), patch_steps=100,
                                 finetune=zoo_cfg.finetune, max_eval=500, seed=seed)
    return MergeAttackConfig(sbv_seeds=(seed + 1, seed + 2), patch_steps=300,
                             finetune=zoo_cfg.finetune, seed=seed)


def ibvs_config(m: MergeAttackConfig, quick: bool) -> ibvs_baselines.IBVSConfig:
    """Experiment 5: experiment 3's configuration ``m`` (so its attackers are reused), defended
    at the middle merge λ of ``m``, SBV at p = 10%; DAM trains its mask 300 steps (quick: 100)."""
    return ibvs_baselines.IBVSConfig(merge=m, merge_lambda=m.lambdas[(len(m.lambdas) - 1) // 2],
                                     dam=DAMConfig(steps=100 if quick else 300))


def _previous(out: Path, only: tuple[int, ...]) -> dict[str, Any]:
    """What an earlier results.json holds for experiments this run does not redo."""
    path = out / "results.json"
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    keep = {EXPERIMENTS[i] for i in EXPERIMENTS if i not in only}
    olds = old.get("experiments", {})
    exps = {k: olds.get(v.get("same_pass_as"), v) if isinstance(v, dict) else v  # unshare
            for k, v in olds.items() if k in keep}
    return {"experiments": exps,
            "timings_s": {k: v for k, v in old.get("timings_s", {}).items() if k in exps},
            "files": [f for f in old.get("files", []) if f.startswith(tuple(exps))],
            "carried_over": {k: {"created_at": old.get("created_at"), "run": old.get("run"),
                                 **old.get("carried_over", {}).get(k, {})} for k in exps}}


@contextmanager
def _zoo(cfg: PaperConfig, progress: Progress | None) -> Iterator[tuple[ZooAccess, bool]]:
    """The zoo to read, and whether it was built by this run (in a temporary folder if no
    --zoo was given)."""
    if cfg.zoo is not None and (cfg.zoo / "manifest.json").is_file():
        zoo = ZooAccess(cfg.zoo, _device(cfg))
        if cfg.scale == "gpu" and zoo.scale != "gpu":
            raise ConfigError(f"{cfg.zoo} is not a GPU-scale zoo: give --zoo a new folder")
        yield zoo, False
        return
    zoo_cfg = ZooConfig.for_scale(_zoo_scale(cfg), cfg.seed)
    if cfg.zoo is not None:
        build_zoo(cfg.zoo, zoo_cfg, progress=progress)
        yield ZooAccess(cfg.zoo, _device(cfg)), True
        return
    with tempfile.TemporaryDirectory(prefix="mergeshield-zoo-") as tmp:
        build_zoo(tmp, zoo_cfg, progress=progress)
        yield ZooAccess(Path(tmp), _device(cfg)), True


def _zoo_scale(cfg: PaperConfig) -> Scale:
    return "gpu" if cfg.scale == "gpu" else "quick" if cfg.quick else "default"


def _device(cfg: PaperConfig) -> str:
    return "cuda" if cfg.scale == "gpu" else "cpu"


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def run_paper(cfg: PaperConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the selected experiments and write their files; return what ``results.json`` holds."""
    unknown = sorted(set(cfg.only) - set(EXPERIMENTS))
    if unknown:
        raise ConfigError(f"no experiment {unknown}: choose from {sorted(EXPERIMENTS)}")
    if cfg.scale == "gpu" and cfg.quick:
        raise ConfigError("--scale gpu is a full run: leave out --quick")
    if cfg.scale == "gpu" and not torch.cuda.is_available():
        raise ConfigError("--scale gpu needs a CUDA device, and torch sees none here")
    cfg.out.mkdir(parents=True, exist_ok=True)
    previous = _previous(cfg.out, cfg.only)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "mergeshield": __version__, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "platform": platform.platform()},
        "run": {"quick": cfg.quick, "scale": cfg.scale, "seed": cfg.seed,
                "only": list(cfg.only)},
        "timings_s": {}, "experiments": {},
    }
    with _zoo(cfg, progress) as (zoo, built):
        zoo_cfg = ZooConfig.for_scale(zoo.scale, int(zoo.manifest["seed"]))
        results["zoo"] = {"path": None if built and cfg.zoo is None else str(zoo.root),
                          "built_by_this_run": built, "manifest_quick": zoo.manifest["quick"],
                          "manifest_seed": zoo.manifest["seed"], "config": _jsonable(zoo_cfg)}
        results["timings_s"]["zoo"] = round(time.perf_counter() - t_start, 1)
        where = (f"Zoo: {'quick' if zoo.manifest['quick'] else 'default'} (seed "
                 f"{zoo.manifest['seed']}); run: {'--quick' if cfg.quick else 'default'}, "
                 f"seed {cfg.seed}. Written by `mergeshield bench paper`.")
        results["where"] = where
        if 1 in cfg.only:
            t0 = time.perf_counter()
            a_cfg = cfg.arithmetic or arithmetic_config(cfg.quick)
            curves = bv_arithmetic.run(zoo, a_cfg, progress)
            results["experiments"]["bv-arithmetic"] = {
                "config": _jsonable(a_cfg), "curves": [c.to_json() for c in curves]}
            (cfg.out / "bv-arithmetic.md").write_text(tables.arithmetic_markdown(curves, where))
            for family in sorted({c.family for c in curves}):
                plots.injection_curves(curves, family, cfg.out / f"bv-arithmetic-{family}.png")
            results["timings_s"]["bv-arithmetic"] = round(time.perf_counter() - t0, 1)
            _save(cfg, results, previous, t_start)
        if 2 in cfg.only:
            t0 = time.perf_counter()
            s_cfg = cfg.similarity or similarity_config(cfg.quick, cfg.seed, zoo_cfg)
            res = bv_similarity.run(zoo, s_cfg, progress)
            results["experiments"]["bv-similarity"] = {"config": _jsonable(s_cfg),
                                                       **res.to_json()}
            (cfg.out / "bv-similarity.md").write_text(tables.similarity_markdown(res, where))
            labels = [f"b{i} {s.id}" for i, s in enumerate(res.specs)]
            plots.heatmap(res.cosine, labels, "cosine(BV_a, BV_b)",
                          cfg.out / "bv-similarity-cosine.png", vmin=-1.0, vmax=1.0)
            plots.heatmap([[r.rate for r in row] for row in res.transfer], labels,
                          "ASR of b's trigger on clean_b + BV_a", vmin=0.0, vmax=1.0,
                          path=cfg.out / "bv-similarity-transfer.png",
                          xlabel="b (trigger, target, clean model)", ylabel="a (BV added)")
            results["timings_s"]["bv-similarity"] = round(time.perf_counter() - t0, 1)
            _save(cfg, results, previous, t_start)
        attackers: Attackers | None = None  # experiment 3's, handed to experiment 5
        if 3 in cfg.only or 4 in cfg.only:
            attackers = _merging(cfg, zoo, zoo_cfg, where, results, progress)
            _save(cfg, results, previous, t_start)
        if 5 in cfg.only:
            t0 = time.perf_counter()
            i_cfg = ibvs_config(cfg.merging or merge_config(cfg.quick, cfg.seed, zoo_cfg),
                                cfg.quick)
            reuse = attackers if attackers and attackers.config == i_cfg.merge else None
            ires = ibvs_baselines.run(zoo, i_cfg, progress, reuse)
            results["experiments"]["ibvs"] = {"config": _jsonable(i_cfg), **ires.to_json()}
            (cfg.out / "ibvs.md").write_text(tables.ibvs_markdown(ires, where))
            results["timings_s"]["ibvs"] = round(time.perf_counter() - t0, 1)
            _save(cfg, results, previous, t_start)
        if 6 in cfg.only:
            t0 = time.perf_counter()
            n = 4 if cfg.quick else 20  # clean and backdoored fine-tunes each
            det = detection.run_detection(zoo.root, n_clean=n, n_backdoored=n,
                                          quick=cfg.quick, seed=cfg.seed, device=_device(cfg))
            results["experiments"]["detection"] = det
            (cfg.out / "detection.md").write_text(where + "\n\n" + detection.to_markdown(det))
            results["timings_s"]["detection"] = round(time.perf_counter() - t0, 1)
            _save(cfg, results, previous, t_start)
    return _save(cfg, results, previous, t_start)


def _save(cfg: PaperConfig, results: dict[str, Any], previous: dict[str, Any],
          t_start: float) -> dict[str, Any]:
    """Write results.json and claims.md as they stand, merged with the earlier run's experiments
    this run does not redo; called after every experiment, so a run stopped late keeps what it
    finished."""
    out = dict(results)
    out["experiments"] = {**previous.get("experiments", {}), **results["experiments"]}
    out["timings_s"] = {**previous.get("timings_s", {}), **results["timings_s"],
                        "total": round(time.perf_counter() - t_start, 1)}
    if previous.get("carried_over"):
        out["carried_over"] = previous["carried_over"]  # experiments from an earlier run
    verdicts = claims.check(out["experiments"], "quick" if cfg.quick else "default")
    out["claims"] = [v.to_json() for v in verdicts]
    (cfg.out / "claims.md").write_text(claims.markdown(verdicts, results["where"]))
    out["files"] = sorted(set(previous.get("files", [])) | {
        p.name for p in cfg.out.iterdir()
        if p.name.startswith(tuple(EXPERIMENTS[i] for i in cfg.only))}) + ["claims.md",
                                                                           "results.json"]
    (cfg.out / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def _merging(cfg: PaperConfig, zoo: ZooAccess, zoo_cfg: ZooConfig, where: str,
             results: dict[str, Any], progress: Progress | None) -> Attackers:
    """Experiments 3 and 4 in one pass (4 reads the merged weights 3 builds); returns the
    attackers, for experiment 5."""
    t0 = time.perf_counter()
    m_cfg = cfg.merging or merge_config(cfg.quick, cfg.seed, zoo_cfg)
    res = merge_attacks.run(zoo, m_cfg, progress)
    data = {"config": _jsonable(m_cfg), **res.to_json()}
    seconds = round(time.perf_counter() - t0, 1)
    if 3 in cfg.only:
        results["experiments"]["merge-attacks"] = data
        (cfg.out / "merge-attacks.md").write_text(tables.merge_attacks_markdown(res, where))
        plots.merge_attacks(res, cfg.out / "merge-attacks.png")
        results["timings_s"]["merge-attacks"] = seconds
    if 4 in cfg.only:
        results["experiments"]["inherent-triggers"] = (
            {"same_pass_as": "merge-attacks"} if 3 in cfg.only else data)
        (cfg.out / "inherent-triggers.md").write_text(tables.inherent_markdown(res, where))
        plots.inherent(res, cfg.out / "inherent-triggers.png")
        results["timings_s"]["inherent-triggers"] = (
            round(time.perf_counter() - t0 - seconds, 1) if 3 in cfg.only else seconds)
    return res.built
