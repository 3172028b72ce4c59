"""``mergeshield merge-plan`` without the defence against mergekit's own merge of the same plan.

Issue 17: undefended (``mergeshield: {policy: include}``), a plan's merge matches ``mergekit-yaml``
on the same YAML (mergekit's keys only) to float tolerance. For each plan over the quick zoo's ViTs
(base ``vit-base``; the clean MNIST, digits and MNIST-rot90 fine-tunes) it runs, each as its own
process, ``mergeshield merge-plan``, the lower-level ``mergeshield merge`` with the plan's weights,
and ``mergekit-yaml`` from a separate venv (``--mergekit-venv``, made by ``--setup-mergekit``), then
compares every tensor of the outputs. A tensor is equal when max|a − b| ≤ REL_TOL · max|b| (b:
mergekit's; fp32). A plan's TIES is mergekit's form (``merge_methods.ties_mergekit``); TIES rows
add a diagnosis of the lower-level ``merge`` (the paper's ``ties``): it run on each tensor alone
(mergekit trims each tensor by itself) tells the trim scope from the other causes.

DARE (``dare_ties``, ``dare_linear``; ``mergeshield merge`` has none): at density 1 nothing is
drawn and the merges must be equal. Below 1 MergeShield draws its own drops (per tensor and model,
``mergeshield.seed`` 0) where mergekit draws from torch's global generator, so the tensors differ
and their statistics are compared instead: per backbone tensor and over the backbone, the share
of entries equal to the base's and the mean and std of merged − base, MergeShield's (seed 0) and
mergekit's at ``--random-seed 0`` each against mergekit's at seeds 1..10, run together in one
more process (``MERGEKIT_SEEDS``; z: the distance from those seeds' mean in their standard
deviations, widened by √(1 + 1/10); equal within Z_TOL). A replay then redraws mergekit's seed-0
merge outside mergekit (``replay``), to show how it draws.

Writes ``docs/benchmarks/merge-plan-mergekit.md`` and ``.json``. Without mergekit it says so in one
line and exits 0, comparing nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from mergeshield import checkpoints
from mergeshield.errors import UnsupportedModelError
from mergeshield.merge_methods import dare_drop, dare_mergekit, l1_rescaled, ties
from mergeshield.models import family_for
from mergeshield.task_vectors import TaskVector

ROOT = Path(__file__).resolve().parents[1]
BASE = "vit-base"
FINETUNES = ("vit-mnist-clean", "vit-digits-clean", "vit-mnist-rot90-clean")
REL_TOL = 1e-6  # fp32: |a − b| ≤ 1e-6 · max|mergekit's tensor|, a few ulps of the tensor's scale
# mergekit 0.1.5: the version these comparisons (and DARE's replay of its draws) were made with.
# It finds a model's tensors through transformers' model layout; from transformers 5.9 on, ViT's
# layout (vit.layers.N.attention.q_proj) is not the checkpoint's (vit.encoder.layer.N.attention.
# attention.query) and mergekit finds no conversion for it by model type, so it silently writes a
# ViT merge without its encoder layers (8 of 72 tensors)
MERGEKIT_PINS = ("mergekit==0.1.5", "transformers<5.9")
REF_SEEDS = tuple(range(1, 11))  # mergekit --random-seed values a random DARE plan is judged by
# |z| bound per statistic and tensor: z is Student-t with 9 dof under "the same distribution";
# P(|t9| > 7) = 6e-5, so over the 3 × 71 statistics of a plan (the quick zoo's 70 backbone
# tensors and the backbone as a whole) a false alarm has about 1 % chance
Z_TOL = 7.0


@dataclass(frozen=True)
class Plan:
    name: str
    method: str  # task_arithmetic | ties | dare_ties | dare_linear
    weights: tuple[float, ...]  # one per fine-tune, in FINETUNES' order
    density: float | None = None  # TIES: the share of each task vector kept; DARE: its chance
    normalize: bool | None = None  # None: mergekit's default (TIES True, the others False)
    rescale: bool | None = None  # None: mergekit's default (DARE True, the others False)

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in ".-" else "_" for c in self.name)

    @property
    def dare(self) -> bool:
        return self.method.startswith("dare_")

    @property
    def random(self) -> bool:
        """Drops drawn at random: the merges are compared by their statistics."""
        return self.dare and (self.density or 1.0) < 1.0

    def mergekit(self, zoo: Path) -> dict[str, Any]:
        """The plan as mergekit reads it."""
        extra = {} if self.density is None else {"density": self.density}
        shared = {k: v for k, v in (("normalize", self.normalize), ("rescale", self.rescale))
                  if v is not None}
        return {"merge_method": self.method, "base_model": str(zoo / "models" / BASE),
                "models": [{"model": str(zoo / "models" / m),
                            "parameters": {"weight": w, **extra}}
                           for m, w in zip(FINETUNES, self.weights, strict=True)],
                **({"parameters": shared} if shared else {}), "dtype": "float32"}

    def merge_args(self, zoo: Path) -> list[str] | None:
        """The same merge through ``mergeshield merge`` (normalised weights given as such);
        None for DARE: that command draws each model's drops under its position, a plan under
        its name, so below density 1 the two differ by design and are not compared."""
        if self.dare:
            return None
        w = list(self.weights)
        if self.method == "task_arithmetic" and self.normalize:
            w = [x / sum(w) for x in w]
        args = [str(zoo / "models" / m) for m in FINETUNES] + [
            "--base", str(zoo / "models" / BASE), "--method", self.method,
            "--weights", ",".join(repr(x) for x in (w[:1] if self.method == "ties" else w))]
        return args + (["--keep", repr(self.density)] if self.density is not None else [])


PLANS = (
    Plan("task_arithmetic w=0.5", "task_arithmetic", (0.5, 0.5, 0.5)),
    Plan("task_arithmetic w=0.6,0.4,0.2 normalize", "task_arithmetic", (0.6, 0.4, 0.2),
         normalize=True),
    Plan("ties d=0.2 w=1", "ties", (1.0, 1.0, 1.0), density=0.2),
    Plan("ties d=0.5 w=1", "ties", (1.0, 1.0, 1.0), density=0.5),
    Plan("ties d=0.5 w=0.5", "ties", (0.5, 0.5, 0.5), density=0.5),
    Plan("ties d=0.5 w=1 normalize=false", "ties", (1.0, 1.0, 1.0), density=0.5,
         normalize=False),
    Plan("dare_ties d=1 w=1", "dare_ties", (1.0, 1.0, 1.0), density=1.0),
    Plan("dare_ties d=1 w=0.6,0.4,0.2 normalize", "dare_ties", (0.6, 0.4, 0.2), density=1.0,
         normalize=True),
    Plan("dare_linear d=1 w=0.5", "dare_linear", (0.5, 0.5, 0.5), density=1.0),
    Plan("dare_ties d=0.5 w=1", "dare_ties", (1.0, 1.0, 1.0), density=0.5),
    Plan("dare_ties d=0.2 w=0.6,0.4,0.2 normalize", "dare_ties", (0.6, 0.4, 0.2), density=0.2,
         normalize=True),
    Plan("dare_linear d=0.3 w=0.5", "dare_linear", (0.5, 0.5, 0.5), density=0.3),
    Plan("dare_ties d=0.5 w=1 rescale=false", "dare_ties", (1.0, 1.0, 1.0), density=0.5,
         rescale=False),
)


# -- mergekit in its own venv ---------------------------------------------------------------------
def mergekit_versions(venv: Path, setup: bool) -> dict[str, str] | None:
    """mergekit's, torch's and transformers' versions in ``venv`` (made first when ``setup``), or
    None after one line saying why nothing is compared."""
    if setup and not (venv / "bin" / "mergekit-yaml").exists():
        print(f"creating {venv} with {' '.join(MERGEKIT_PINS)} (pip, from the package index)",
              flush=True)
        # torch first, at this environment's version: a bare `pip install mergekit` pulls a
        # multi-GB CUDA torch, where this pin finds the CPU build the local index has
        torch_pin = "torch==" + importlib.metadata.version("torch").split("+")[0]
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        made_here = not venv.exists()
        for cmd in ([sys.executable, "-m", "venv", str(venv)], pip + [torch_pin],
                    pip + list(MERGEKIT_PINS)):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                why = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
                if made_here:  # a later --setup-mergekit starts over
                    shutil.rmtree(venv, ignore_errors=True)
                print(f"mergekit: could not be installed into {venv} ({why}); nothing compared",
                      flush=True)
                return None
    if not (venv / "bin" / "mergekit-yaml").exists():
        print(f"mergekit: not installed at {venv} (--setup-mergekit installs it); nothing "
              "compared", flush=True)
        return None
    probe = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
             "('mergekit', 'torch', 'transformers')}))")
    got = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True,
                         text=True)
    if got.returncode != 0:
        print(f"mergekit: {venv} is broken ({got.stderr.strip()[-200:]}); nothing compared")
        return None
    versions: dict[str, str] = json.loads(got.stdout)
    return versions


# mergekit-yaml's body (scripts/run_yaml.py) once per (seed, output) pair of argv[2:]
MERGEKIT_SEEDS = """\
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
text = open(sys.argv[1], encoding="utf-8").read()
config = MergeConfiguration.model_validate(yaml.safe_load(text))
for seed, out in zip(sys.argv[2::2], sys.argv[3::2]):
    options = MergeOptions(random_seed=int(seed), copy_tokenizer=False, write_model_card=False,
                           quiet=True)
    options.apply_global_options()
    run_merge(config, out, options=options, config_source=text)
"""


def timed(cmd: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """Run ``cmd`` (a fresh process, imports included in its wall time)."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    out: dict[str, Any] = {"wall_s": round(time.perf_counter() - t0, 2), "rc": done.returncode}
    if done.returncode not in ok:
        out["error"] = done.stderr.strip()[-1500:]
    return out


# -- comparison -----------------------------------------------------------------------------------
def _open(folder: Path) -> checkpoints.Checkpoint:
    return checkpoints.open_checkpoint(checkpoints.resolve(str(folder)))


def backbone_of(zoo: Path) -> Callable[[str], bool]:
    """Which tensors MergeShield merges (the rest, heads, come from the base)."""
    cfg = checkpoints.resolve(str(zoo / "models" / BASE)).config
    try:
        return family_for(cfg, cfg).is_backbone
    except UnsupportedModelError:
        return lambda _name: True


def compare(ours: Path, ref: Path, backbone: Callable[[str], bool]) -> dict[str, Any]:
    """Every tensor of ``ours`` against ``ref`` (mergekit's, or the other MergeShield output)."""
    rows: dict[str, tuple[float, float]] = {}  # name -> (max |a − b|, max |b|)
    with _open(ours) as a, _open(ref) as b:
        res: dict[str, Any] = {"only_ours": sorted(set(a) - set(b)),
                               "only_ref": sorted(set(b) - set(a)), "mismatched": []}
        for k in (k for k in a if k in b):
            x, y = a[k], b[k]
            if x.shape != y.shape or x.dtype != y.dtype:
                res["mismatched"].append(f"{k}: {x.dtype}{list(x.shape)} vs {y.dtype}"
                                         f"{list(y.shape)}")
                continue
            if x.numel():
                rows[k] = (float((x.float() - y.float()).abs().max()), float(y.abs().max()))
    for part, keep in (("all", lambda _k: True), ("backbone", backbone),
                       ("heads", lambda k: not backbone(k))):
        mine = {k: v for k, v in rows.items() if keep(k)}
        over = sorted(k for k, (d, s) in mine.items() if d > REL_TOL * s)
        res[part] = {"tensors": len(mine),
                     "max_abs": max((d for d, _ in mine.values()), default=0.0),
                     "max_rel": max((d / s if s else (0.0 if d == 0 else float("inf"))
                                     for d, s in mine.values()), default=0.0),
                     "over": len(over), "over_examples": over[:3]}
    res["verdict"] = verdict(res)
    return res


def verdict(c: dict[str, Any]) -> str:
    if c["only_ours"] or c["only_ref"] or c["mismatched"]:
        return (f"differs: tensor sets ({len(c['only_ours'])} only ours, {len(c['only_ref'])} "
                f"only the reference's, {len(c['mismatched'])} of other shape or dtype)")
    if not c["all"]["over"]:
        return "equal"
    if not c["backbone"]["over"]:
        return f"backbone equal; {c['heads']['over']} head tensors differ"
    return f"differs: {c['all']['over']} of {c['all']['tensors']} tensors"


def ties_diagnosis(zoo: Path, plan: Plan, mergekit_out: Path,
                   backbone: Callable[[str], bool]) -> dict[str, Any]:
    """MergeShield's ``ties`` run on each backbone tensor alone (so its trim ranks entries within
    the tensor, as mergekit's does) at scale w and at scale 1, against mergekit's output."""
    density = plan.density or 1.0
    with ExitStack() as stack:
        base = stack.enter_context(_open(zoo / "models" / BASE))
        fts = [stack.enter_context(_open(zoo / "models" / m)) for m in FINETUNES]
        ref = stack.enter_context(_open(mergekit_out))
        keys = [k for k in base if backbone(k)]
        # entries kept per tensor: MergeShield round(d·n), mergekit int(d·n)
        rounding = {k for k in keys if round(density * base[k].numel())
                    != int(density * base[k].numel())}
        out: dict[str, Any] = {"tensors": len(keys), "k_rounding_differs": len(rounding)}
        for label, scale in (("at_weight", plan.weights[0]), ("at_1", 1.0)):
            if scale == 1.0 and "at_weight" in out and plan.weights[0] == 1.0:
                out[label] = out["at_weight"]
                continue
            over, worst = [], 0.0
            for k in keys:
                tvs = [TaskVector.between(base, ft, [k]) for ft in fts]
                mine = (base[k].float() + ties(tvs, keep=density, scale=scale)[k]).to(
                    base[k].dtype)
                d, s = float((mine - ref[k]).abs().max()), float(ref[k].abs().max())
                worst = max(worst, d / s if s else d)
                if d > REL_TOL * s:
                    over.append(k)
            out[label] = {"scale": scale, "over": len(over), "max_rel": worst,
                          "over_all_k_rounding": set(over) <= rounding}
    return out


STATS = ("equal", "mean", "std")  # share of entries equal to the base's; mean, std of θ − θ_base


def dare_statistics(merged: Path, base: Mapping[str, Tensor], keys: list[str]
                    ) -> dict[str, tuple[float, float, float]]:
    """Per backbone tensor, and over the backbone (``"backbone"``): STATS of ``merged``."""
    out, diffs = {}, []
    with _open(merged) as m:
        for k in keys:
            d = (m[k].double() - base[k].double()).flatten()
            out[k] = (float((d == 0).double().mean()), float(d.mean()), float(d.std()))
            diffs.append(d)
    d = torch.cat(diffs)
    out["backbone"] = (float((d == 0).double().mean()), float(d.mean()), float(d.std()))
    return out


def dare_comparison(zoo: Path, ours: Path, mergekit0: Path, refs: list[Path],
                    backbone: Callable[[str], bool]) -> dict[str, Any]:
    """MergeShield's merge (seed 0) and mergekit's at seed 0, each by its statistics against
    mergekit's at REF_SEEDS: per statistic, the largest |z| over the tensors and the backbone."""
    with _open(zoo / "models" / BASE) as b:
        keys = [k for k in b if backbone(k)]
        base = {k: b[k] for k in keys}
    runs = {"ours": dare_statistics(ours, base, keys),
            "mergekit": dare_statistics(mergekit0, base, keys)}
    ref = [dare_statistics(r, base, keys) for r in refs]
    widen = math.sqrt(1 + 1 / len(ref))
    out: dict[str, Any] = {"ref_seeds": list(REF_SEEDS), "tensors": len(keys)}
    for who, got in runs.items():
        worst: dict[str, Any] = {}
        for i, stat in enumerate(STATS):
            zs = {}
            for k in [*keys, "backbone"]:
                xs = torch.tensor([r[k][i] for r in ref], dtype=torch.float64)
                mu, sd = float(xs.mean()), float(xs.std())
                gap = got[k][i] - mu
                zs[k] = gap / (sd * widen) if sd > 0 else (0.0 if gap == 0 else math.inf)
            k_max = max(zs, key=lambda k: abs(zs[k]))
            worst[stat] = {"max_abs_z": abs(zs[k_max]), "at": k_max,
                           "backbone_z": zs["backbone"]}
        out[who] = {"backbone": dict(zip(STATS, got["backbone"], strict=True)), "z": worst,
                    "within_tol": all(w["max_abs_z"] <= Z_TOL for w in worst.values())}
    out["ref_backbone"] = {s: {"mean": statistics.fmean(r["backbone"][i] for r in ref),
                               "sd": statistics.stdev(r["backbone"][i] for r in ref)}
                           for i, s in enumerate(STATS)}
    return out


def replay(zoo: Path, plan: Plan, mergekit_out: Path, seed: int) -> dict[str, Any]:
    """mergekit's DARE draws redrawn here: one CPU generator seeded with ``seed`` (what
    ``--random-seed`` does: ``transformers.set_seed`` → ``torch.manual_seed``), one
    ``torch.bernoulli`` per model in the plan's order per tensor, the tensors in the order of
    their names (mergekit's schedule: a lexicographic topological sort keyed by tensor name),
    every tensor mergekit merges (the heads too); each merged tensor against mergekit's."""
    gen = torch.Generator().manual_seed(seed)
    density = plan.density or 1.0
    rescale = plan.rescale is not False
    with ExitStack() as stack:
        base = stack.enter_context(_open(zoo / "models" / BASE))
        fts = [stack.enter_context(_open(zoo / "models" / m)) for m in FINETUNES]
        ref = stack.enter_context(_open(mergekit_out))
        over, worst = [], 0.0
        for k in sorted(ref):
            dropped = []
            for ft in fts:
                t = TaskVector.between(base, ft, [k])[k]
                kept = dare_drop(t, density, gen)
                dropped.append(TaskVector.from_tensors(
                    {k: l1_rescaled(t, kept) if rescale and kept is not t else kept}))
            mixed = dare_mergekit(dropped, [1.0] * len(fts), list(plan.weights),
                                  consensus=plan.method == "dare_ties",
                                  normalize=plan.normalize is True)[k]
            mine = (base[k].float() + mixed).to(base[k].dtype)
            d, s = float((mine - ref[k]).abs().max()), float(ref[k].abs().max())
            worst = max(worst, d / s if s else d)
            if d > REL_TOL * s:
                over.append(k)
        return {"seed": seed, "tensors": len(ref), "over": len(over), "max_rel": worst,
                "over_examples": over[:3]}


def run_plan(plan: Plan, zoo: Path, work: Path, venv: Path,
             backbone: Callable[[str], bool]) -> dict[str, Any]:
    d = work / plan.slug
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    mk_plan = plan.mergekit(zoo)
    (d / "mergekit.yaml").write_text(yaml.safe_dump(mk_plan, sort_keys=False))
    (d / "plan.yaml").write_text(yaml.safe_dump(
        {**mk_plan, "mergeshield": {"policy": "include"}}, sort_keys=False))
    py = [sys.executable, "-m", "mergeshield.cli"]
    env = {**os.environ, "MERGESHIELD_CACHE_DIR": str(work / "cache")}

    def mergekit_cmd(out: str, seed: int = 0) -> list[str]:
        return [str(venv / "bin" / "mergekit-yaml"), str(d / "mergekit.yaml"),
                "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
                "--random-seed", str(seed), str(d / out)]

    merge_args = plan.merge_args(zoo)
    wall = {  # merge-plan exits 1 when a scan flags a model; the merge is written either way
        "merge-plan": timed(py + ["merge-plan", str(d / "plan.yaml"), "--device", "cpu",
                                  "--out", str(d / "merge-plan")], env, ok=(0, 1)),
        **({} if merge_args is None else {
            "merge": timed(py + ["merge", *merge_args, "--out", str(d / "merge")], env)}),
        "mergekit": timed(mergekit_cmd("mergekit"), env),
    }
    row: dict[str, Any] = {"plan": plan.name, "mergekit_yaml": mk_plan, "tools": wall,
                           "random": plan.random}
    failed = [t for t, r in wall.items() if "error" in r]
    for name, ours, ref in (("merge-plan vs mergekit", "merge-plan", "mergekit"),
                            ("merge vs mergekit", "merge", "mergekit"),
                            ("merge-plan vs merge", "merge-plan", "merge")):
        if {ours, ref} <= set(wall) - set(failed):
            row[name] = compare(d / ours, d / ref, backbone)
    if plan.method == "ties" and "mergekit" not in failed:
        row["ties_diagnosis"] = ties_diagnosis(zoo, plan, d / "mergekit", backbone)
    if plan.random and not failed:
        # the reference seeds in one process (as mergekit-yaml does each: its options applied,
        # then run_merge); seed 0 again first, which must give mergekit-yaml's seed-0 merge
        seeds = (0, *REF_SEEDS)
        refs = timed([str(venv / "bin" / "python"), "-c", MERGEKIT_SEEDS, str(d / "mergekit.yaml"),
                      *(x for s in seeds for x in (str(s), str(d / f"mergekit-seed{s}")))], env)
        row["mergekit_seeds"] = refs
        if "error" not in refs:
            row["mergekit_seed0_again"] = compare(d / "mergekit-seed0", d / "mergekit",
                                                  lambda _k: True)["verdict"]
            row["dare"] = dare_comparison(zoo, d / "merge-plan", d / "mergekit",
                                          [d / f"mergekit-seed{s}" for s in REF_SEEDS], backbone)
            row["replay"] = replay(zoo, plan, d / "mergekit", 0)
    scans = [json.loads(f.read_text()) for f in (d / "merge-plan").glob("scans/*/report.json")]
    row["scans"] = {"verdicts": [r["verdict"]["status"] for r in scans],
                    "seconds": round(sum(sum(r["timings"].values()) for r in scans), 3)}
    return row


# -- report ---------------------------------------------------------------------------------------
CAUSES = """\
mergekit's TIES (`merge_methods/generalized_task_arithmetic.py`, `sparsify.py`) against the
paper's form in `mergeshield/merge_methods.py`, `ties` (what `mergeshield merge --method ties`
runs). A plan computes mergekit's form instead (`ties_mergekit`, chosen by `MergePlan.merge_config`
since these causes were found: the table above shows it equal), so only the lower-level `merge`
differs:

1. **Trim scope.** mergekit keeps the top `int(density · n)` entries of each tensor's delta
   (`sparsify.magnitude`: `argsort` of |δ| within the tensor). MergeShield's `ties` calls
   `top_k(v, keep)` with its default `scope="global"`: one magnitude threshold over all backbone
   tensors of the task vector, so a tensor with large deltas keeps more than `density` of its
   entries and one with small deltas fewer (possibly none).
2. **How many entries are kept.** MergeShield keeps `max(1, round(keep · n))` entries (and every
   entry tied at the threshold); mergekit exactly `max(1, int(density · n))`: at density 0.2 a
   64-entry bias keeps 13 entries here, 12 there.
3. **The weight under `normalize`** (TIES' default in mergekit: true). mergekit multiplies each
   delta by its weight, elects the sign of Σ w·δ, and divides Σ w·δ·mask by Σ w·mask: one weight
   for every model cancels, so the merge is the disjoint mean whatever the weight. MergeShield
   multiplies the disjoint mean by the weight (`ties(..., scale=w)`): equal only at weight 1.
4. **`normalize: false`.** mergekit then adds the agreeing entries, Σ w·δ·mask, undivided; the
   paper's `ties` always takes the disjoint mean (a plan's `ties_mergekit` reads `normalize`).
5. **A zero sum in the sign election.** mergekit elects + where Σ w·δ ≥ 0; `torch.sign` gives 0
   there, and MergeShield then keeps no entry. It only matters where the trimmed deltas cancel
   exactly. `int8_mask` only changes the mask's dtype; `rescale` is off for TIES by default.

Task arithmetic (θ_base + Σ w·τ, `normalize`: the weights over their sum) is the same formula on
both sides, up to rounding order."""


def explained_by(r: dict[str, Any]) -> str:
    """Which causes (numbered as in CAUSES) the diagnosis accounts the backbone's difference to."""
    at_w, at_1 = r["ties_diagnosis"]["at_weight"], r["ties_diagnosis"]["at_1"]
    if not at_w["over"] or at_w["over_all_k_rounding"]:
        return "1" + (" + 2" if at_w["over"] else "")
    if not at_1["over"] or at_1["over_all_k_rounding"]:
        return "1 + 3" + (" + 2" if at_1["over"] else "")
    if r["mergekit_yaml"].get("parameters", {}).get("normalize") is False:
        return "not 1–3 alone: 4 (normalize: false)"
    return "not 1–3 alone"


def _f(x: float) -> str:
    return f"{x:.3g}"


def write_docs(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "merge-plan-mergekit.json").write_text(json.dumps(result, indent=2) + "\n")
    v, m = result["mergekit"], result["machine"]
    lines = [
        "# `mergeshield merge-plan` (undefended) against mergekit", "",
        f"Written by `bench/merge_plan_mergekit.py` on {m['date']}: {m['nproc']} CPUs, torch "
        f"{m['torch']}, Python {m['python']}; mergekit {v['mergekit']} in its own venv (torch "
        f"{v['torch']}, transformers {v['transformers']}). Command: `` {result['command']} ``.",
        "",
        f"Plans over the quick zoo (`{result['zoo']}`): base `{BASE}`, fine-tunes "
        + ", ".join(f"`{x}`" for x in FINETUNES) + ", fp32 (`dtype: float32`). Each plan runs as "
        "`mergeshield merge-plan` with `mergeshield: {policy: include}` (every model merged as "
        "it is; its scans have no evaluation data), as `mergeshield merge` with the same "
        "weights, and as `mergekit-yaml` on the YAML without the `mergeshield:` section. Every "
        f"tensor is compared. Tolerance: a tensor is equal when max|a − b| ≤ {REL_TOL:g} · "
        "max|mergekit's tensor| (max rel below is that ratio; the worst tensor). Backbone: "
        "the tensors MergeShield merges; heads (`classifier.*`): what it takes from the base.",
        "", "| plan | tensors | backbone: max abs / max rel / over tol | heads: over tol "
        "(max abs) | merge-plan vs mergekit | merge vs mergekit | merge-plan vs merge | wall s: "
        "merge-plan / merge / mergekit |", "|---|---|---|---|---|---|---|---|"]
    for r in result["plans"]:
        c, w = r.get("merge-plan vs mergekit"), r["tools"]
        walls = " / ".join("–" if t not in w else f"{w[t]['wall_s']:.1f}"
                           + (" (failed)" if "error" in w[t] else "")
                           for t in ("merge-plan", "merge", "mergekit"))
        if c is None:
            lines.append(f"| {r['plan']} | – | – | – | not compared | – | – | {walls} |")
            continue
        b, h = c["backbone"], c["heads"]
        others = [r[k]["verdict"] if k in r else "–"
                  for k in ("merge vs mergekit", "merge-plan vs merge")]
        verdict = (f"{c['verdict']} (random drops: by statistics below)" if r["random"]
                   else c["verdict"])
        lines.append(f"| {r['plan']} | {c['all']['tensors']} | {_f(b['max_abs'])} / "
                     f"{_f(b['max_rel'])} / {b['over']} of {b['tensors']} | "
                     f"{h['over']} of {h['tensors']} ({_f(h['max_abs'])}) | {verdict} | "
                     f"{others[0]} | {others[1]} | {walls} |")
    scan_s = [r["scans"]["seconds"] for r in result["plans"]] or [0.0]
    lines += ["", f"merge-plan's wall time includes one scan per model: each ends `inconclusive` "
              f"(no evaluation data), {min(scan_s):.2f}–{max(scan_s):.2f} s for a plan's three "
              "scans together. Wall times are whole processes, imports included, on a shared "
              "machine. DARE plans have no `mergeshield merge` (–)."]
    lines += dare_section(result["plans"])
    diag = [r for r in result["plans"] if "ties_diagnosis" in r]
    if diag:
        lines += ["", "## TIES: why `mergeshield merge` (the paper's TIES) differs", "",
                  "MergeShield's paper-form `ties` run on each backbone tensor alone (its trim "
                  "then ranks entries within the tensor, as mergekit's does), at the plan's weight "
                  "and at weight 1, against mergekit's output: tensors over tolerance, the worst "
                  "max rel, and whether those left over are all tensors where round(d·n) ≠ "
                  "int(d·n); the causes (below) that account for the backbone's difference.", "",
                  "| plan | backbone tensors | round ≠ int | per tensor, × w: over / max rel / "
                  "all rounding? | per tensor, × 1: over / max rel / all rounding? | causes |",
                  "|---|---|---|---|---|---|"]
        for r in diag:
            g = r["ties_diagnosis"]
            cells = [f"{s['over']} / {_f(s['max_rel'])} / "
                     + ("–" if not s["over"] else "yes" if s["over_all_k_rounding"] else "no")
                     for s in (g["at_weight"], g["at_1"])]
            lines.append(f"| {r['plan']} | {g['tensors']} | {g['k_rounding_differs']} | "
                         f"{cells[0]} | {cells[1]} | {explained_by(r)} |")
        lines += ["", "## Causes", "", CAUSES]
    lines += ["", "## Notes", "",
              "- Heads: mergekit merges every tensor, the `classifier.*` head too; MergeShield "
              "merges the backbone and writes the base's head (`mergeshield/merging.py`: each "
              "task's head belongs to its own task), so the head tensors differ by design.",
              f"- mergekit's venv pins {', '.join(f'`{p}`' for p in MERGEKIT_PINS)}: with "
              "transformers ≥ 5.9, mergekit 0.1.5 infers ViT's tensors from transformers' new "
              "ViT layout, finds no conversion from the checkpoint's names by model type, marks "
              "the encoder layers optional and writes a merge of 8 of the 72 tensors, without "
              "an error."] + [f"- {n}" for n in result["notes"]]
    (out / "merge-plan-mergekit.md").write_text("\n".join(lines) + "\n")


DARE_DRAWS = """\
How mergekit 0.1.5 draws (`sparsify.bernoulli`, `merge_methods/generalized_task_arithmetic.py`,
`graph.py`, `options.py`): per merged tensor, per model in the plan's order, one
`torch.bernoulli(torch.full_like(delta, density))` on torch's *global* generator, which only
`mergekit-yaml --random-seed N` seeds (`transformers.set_seed` → `torch.manual_seed`; without it
torch seeds that generator anew in each process, so two runs of one plan differ). The tensors
run in its scheduler's order (`build_schedule`: networkx's lexicographic topological sort keyed
by each task's tensor name, so by name), every tensor it merges, heads included. `rescale` (on by
default for DARE) scales each model's kept delta back to its L1 norm (`RescaleNorm.l1`), not by
1/density. The replay column redraws mergekit's seed-0 merge that way outside mergekit: all
tensors equal means the description is exact. MergeShield could equal it only by drawing one
stream across the whole model in mergekit's order, on CPU (on CUDA mergekit draws from the CUDA
generator): a tensor's drop would then depend on every tensor named before it, heads included,
and on which tensors mergekit's architecture tables make it merge. It draws per tensor and model
instead (`merge_methods.dare_generator`: SHA-256 of the seed, the tensor's name and the model's
name in the plan), so the merges agree in distribution, not entry for entry."""


def dare_section(rows: list[dict[str, Any]]) -> list[str]:
    dare = [r for r in rows if "dare" in r]
    if not dare:
        return []
    n = dare[0]["dare"]["tensors"]
    lines = ["", "## DARE below density 1: by statistics", "",
             "Per plan: over the backbone, the share of entries equal to the base's and the std "
             "of merged − base, for MergeShield's merge (`mergeshield.seed` 0), mergekit's at "
             "`--random-seed 0` and mergekit's at seeds "
             f"{REF_SEEDS[0]}..{REF_SEEDS[-1]} (mean ± sd); then, per statistic (equal share, "
             f"mean, std of merged − base), the largest |z| over the {n} backbone tensors and "
             "the backbone as a whole, z = (x − mean of the reference seeds) / (their sd · √(1 + "
             f"1/{len(REF_SEEDS)})), for MergeShield and, as a calibration, for mergekit's seed "
             f"0. Tolerance: every |z| ≤ {Z_TOL:g} (Student t, {len(REF_SEEDS) - 1} dof: a "
             f"{Z_TOL:g} has p = 6e-5, about 1 % over a plan's {3 * (n + 1)} statistics).", "",
             "| plan | equal to base: ours / mergekit 0 / mergekit 1..10 | std(θ − θ_base): ours / "
             "mergekit 0 / mergekit 1..10 | ours: max \\|z\\| equal / mean / std | mergekit 0: "
             "max \\|z\\| equal / mean / std | within tolerance | replay of mergekit 0: tensors "
             "equal |", "|---|---|---|---|---|---|---|"]
    for r in dare:
        g, ref = r["dare"], r["dare"]["ref_backbone"]

        def cell(stat: str, g: dict[str, Any] = g, ref: dict[str, Any] = ref) -> str:
            return (f"{g['ours']['backbone'][stat]:.4g} / {g['mergekit']['backbone'][stat]:.4g}"
                    f" / {ref[stat]['mean']:.4g} ± {ref[stat]['sd']:.2g}")

        zs = {who: " / ".join(f"{g[who]['z'][s]['max_abs_z']:.2f}" for s in STATS)
              for who in ("ours", "mergekit")}
        ok = " / ".join("yes" if g[who]["within_tol"] else "no" for who in ("ours", "mergekit"))
        rp = r["replay"]
        lines.append(f"| {r['plan']} | {cell('equal')} | {cell('std')} | {zs['ours']} | "
                     f"{zs['mergekit']} | {ok} | {rp['tensors'] - rp['over']} of "
                     f"{rp['tensors']} (max rel {_f(rp['max_rel'])}) |")
    again = "; ".join(f"{r['plan']}: {r.get('mergekit_seed0_again', '–')}" for r in dare)
    lines += ["", "mergekit's seeds ran in one process per plan (`mergekit-yaml`'s body, "
              "`MERGEKIT_SEEDS`, per seed), seed 0 first again; against `mergekit-yaml "
              f"--random-seed 0`: {again}.",
              "", "Within tolerance: ours / mergekit 0. Where a largest |z| lies (tensor): "
              + "; ".join(f"{r['plan']}: " + ", ".join(
                  f"{s} {r['dare']['ours']['z'][s]['at']}" for s in STATS) for r in dare),
              "", DARE_DRAWS]
    return lines


def summary(row: dict[str, Any]) -> str:
    """One line per plan: merge-plan against mergekit, and each tool's wall time."""
    c, w = row.get("merge-plan vs mergekit"), row["tools"]
    walls = ", ".join(f"{t} {r['wall_s']:.1f}s" for t, r in w.items())
    if c is None:
        failed = "; ".join(f"{t} failed: {r['error'][-200:]}" for t, r in w.items() if "error" in r)
        return f"not compared ({failed}) [{walls}]"
    dare = row.get("dare")
    stats = "" if dare is None else (
        f"; by statistics: ours {'within' if dare['ours']['within_tol'] else 'OUTSIDE'} "
        f"tolerance (max |z| " + "/".join(f"{dare['ours']['z'][s]['max_abs_z']:.2f}"
                                         for s in STATS)
        + f"), replay {row['replay']['tensors'] - row['replay']['over']} of "
        f"{row['replay']['tensors']} equal")
    return (f"{c['all']['tensors']} tensors, backbone max abs {_f(c['backbone']['max_abs'])}: "
            f"{c['verdict']}{stats} [{walls}]")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--zoo", type=Path, default=os.environ.get("MERGESHIELD_TEST_ZOO"),
                   help="a quick zoo (default $MERGESHIELD_TEST_ZOO; its ViTs built in "
                   "--workdir when absent)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/msbench-merge-plan"))
    p.add_argument("--mergekit-venv", type=Path,
                   default=Path.home() / ".cache" / "mergeshield" / "mergekit-venv")
    p.add_argument("--setup-mergekit", action="store_true",
                   help="create --mergekit-venv with mergekit from the package index if absent")
    p.add_argument("--only", nargs="+", choices=[q.slug for q in PLANS], metavar="PLAN",
                   help="plans to run (default: all): " + ", ".join(q.slug for q in PLANS))
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    p.add_argument("--note", action="append", default=[])
    args = p.parse_args(argv)
    versions = mergekit_versions(args.mergekit_venv, args.setup_mergekit)
    if versions is None:
        return
    zoo = args.zoo
    if zoo is None or not (Path(zoo) / "manifest.json").is_file():
        zoo = args.workdir / "zoo"
        print(f"building the quick zoo's ViTs in {zoo} (about 2 min)", flush=True)
        # imported here: the zoo loads transformers' image processors (warnings on stderr),
        # which a run with a zoo given, or without mergekit, does not need
        from mergeshield.zoo import ZooConfig, build_zoo

        build_zoo(zoo, replace(ZooConfig.for_speed(quick=True), families=("vit",)))
    zoo = Path(zoo).resolve()
    backbone = backbone_of(zoo)
    result: dict[str, Any] = {
        "command": shlex.join(["python", "bench/merge_plan_mergekit.py",
                               *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "torch": importlib.metadata.version("torch"),
                    "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")},
        "mergekit": versions, "zoo": str(zoo), "rel_tol": REL_TOL, "plans": [],
        "notes": args.note}
    for plan in PLANS:
        if args.only and plan.slug not in args.only:
            continue
        row = run_plan(plan, zoo, args.workdir, args.mergekit_venv, backbone)
        result["plans"].append(row)
        print(f"{plan.name:40s} {summary(row)}", flush=True)
    write_docs(args.out, result)
    print(f"wrote {args.out / 'merge-plan-mergekit.md'} and .json (mergekit "
          f"{versions['mergekit']})", flush=True)


if __name__ == "__main__":
    main()
