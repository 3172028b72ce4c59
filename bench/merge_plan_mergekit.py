"""``mergeshield merge-plan`` without the defence against mergekit's own merge of the same plan.

Issue 17: undefended (``mergeshield: {policy: include}``), a plan's merge matches ``mergekit-yaml``
on the same YAML (mergekit's keys only) to float tolerance. For each plan over the quick zoo's ViTs
(base ``vit-base``; the clean MNIST, digits and MNIST-rot90 fine-tunes) it runs, each as its own
process, ``mergeshield merge-plan``, the lower-level ``mergeshield merge`` with the plan's weights,
and ``mergekit-yaml`` from a separate venv (``--mergekit-venv``, made by ``--setup-mergekit``), then
compares every tensor of the outputs. A tensor is equal when max|a − b| ≤ REL_TOL · max|b| (b:
mergekit's; fp32). A plan's TIES is mergekit's form (``task_vectors.ties_mergekit``); TIES rows
add a diagnosis of the lower-level ``merge`` (the paper's ``ties``): it run on each tensor alone
(mergekit trims each tensor by itself) tells the trim scope from the other causes.

Writes ``docs/benchmarks/merge-plan-mergekit.md`` and ``.json``. Without mergekit it says so in one
line and exits 0, comparing nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from mergeshield import checkpoints
from mergeshield.errors import UnsupportedModelError
from mergeshield.models import family_for
from mergeshield.task_vectors import TaskVector, ties

ROOT = Path(__file__).resolve().parents[1]
BASE = "vit-base"
FINETUNES = ("vit-mnist-clean", "vit-digits-clean", "vit-mnist-rot90-clean")
REL_TOL = 1e-6  # fp32: |a − b| ≤ 1e-6 · max|mergekit's tensor|, a few ulps of the tensor's scale
# mergekit 0.1.5 finds a model's tensors through transformers' model layout; from transformers 5.9
# on, ViT's layout (vit.layers.N.attention.q_proj) is not the checkpoint's (vit.encoder.layer.N.
# attention.attention.query) and mergekit finds no conversion for it by model type, so it silently
# writes a ViT merge without its encoder layers (8 of 72 tensors)
MERGEKIT_PINS = ("mergekit", "transformers<5.9")


@dataclass(frozen=True)
class Plan:
    name: str
    method: str  # task_arithmetic | ties
    weights: tuple[float, ...]  # one per fine-tune, in FINETUNES' order
    density: float | None = None  # TIES: the share of each task vector kept
    normalize: bool | None = None  # None: mergekit's default (task arithmetic False, TIES True)

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in ".-" else "_" for c in self.name)

    def mergekit(self, zoo: Path) -> dict[str, Any]:
        """The plan as mergekit reads it."""
        extra = {} if self.density is None else {"density": self.density}
        return {"merge_method": self.method, "base_model": str(zoo / "models" / BASE),
                "models": [{"model": str(zoo / "models" / m),
                            "parameters": {"weight": w, **extra}}
                           for m, w in zip(FINETUNES, self.weights, strict=True)],
                **({} if self.normalize is None else {"parameters": {"normalize": self.normalize}}),
                "dtype": "float32"}

    def merge_args(self, zoo: Path) -> list[str]:
        """The same merge through ``mergeshield merge`` (normalised weights given as such)."""
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
    wall = {  # merge-plan exits 1 when a scan flags a model; the merge is written either way
        "merge-plan": timed(py + ["merge-plan", str(d / "plan.yaml"), "--device", "cpu",
                                  "--out", str(d / "merge-plan")], env, ok=(0, 1)),
        "merge": timed(py + ["merge", *plan.merge_args(zoo), "--out", str(d / "merge")], env),
        "mergekit": timed([str(venv / "bin" / "mergekit-yaml"), str(d / "mergekit.yaml"),
                           "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
                           str(d / "mergekit")], env),
    }
    row: dict[str, Any] = {"plan": plan.name, "mergekit_yaml": mk_plan, "tools": wall}
    failed = [t for t, r in wall.items() if "error" in r]
    for name, ours, ref in (("merge-plan vs mergekit", "merge-plan", "mergekit"),
                            ("merge vs mergekit", "merge", "mergekit"),
                            ("merge-plan vs merge", "merge-plan", "merge")):
        if ours not in failed and ref not in failed:
            row[name] = compare(d / ours, d / ref, backbone)
    if plan.method == "ties" and "mergekit" not in failed:
        row["ties_diagnosis"] = ties_diagnosis(zoo, plan, d / "mergekit", backbone)
    scans = [json.loads(f.read_text()) for f in (d / "merge-plan").glob("scans/*/report.json")]
    row["scans"] = {"verdicts": [r["verdict"]["status"] for r in scans],
                    "seconds": round(sum(sum(r["timings"].values()) for r in scans), 3)}
    return row


# -- report ---------------------------------------------------------------------------------------
CAUSES = """\
mergekit's TIES (`merge_methods/generalized_task_arithmetic.py`, `sparsify.py`) against the
paper's form in `mergeshield/task_vectors.py`, `ties` (what `mergeshield merge --method ties`
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
        f"{v['torch']}, transformers {v['transformers']}). Command: `{result['command']}`.", "",
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
        walls = " / ".join(f"{w[t]['wall_s']:.1f}" + (" (failed)" if "error" in w[t] else "")
                           for t in ("merge-plan", "merge", "mergekit"))
        if c is None:
            lines.append(f"| {r['plan']} | – | – | – | not compared | – | – | {walls} |")
            continue
        b, h = c["backbone"], c["heads"]
        others = [r[k]["verdict"] if k in r else "–"
                  for k in ("merge vs mergekit", "merge-plan vs merge")]
        lines.append(f"| {r['plan']} | {c['all']['tensors']} | {_f(b['max_abs'])} / "
                     f"{_f(b['max_rel'])} / {b['over']} of {b['tensors']} | "
                     f"{h['over']} of {h['tensors']} ({_f(h['max_abs'])}) | {c['verdict']} | "
                     f"{others[0]} | {others[1]} | {walls} |")
    scan_s = [r["scans"]["seconds"] for r in result["plans"]] or [0.0]
    lines += ["", f"merge-plan's wall time includes one scan per model: each ends `inconclusive` "
              f"(no evaluation data), {min(scan_s):.2f}–{max(scan_s):.2f} s for a plan's three "
              "scans together. Wall times are whole processes, imports included, on a shared "
              "machine."]
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


def summary(row: dict[str, Any]) -> str:
    """One line per plan: merge-plan against mergekit, and each tool's wall time."""
    c, w = row.get("merge-plan vs mergekit"), row["tools"]
    walls = ", ".join(f"{t} {r['wall_s']:.1f}s" for t, r in w.items())
    if c is None:
        failed = "; ".join(f"{t} failed: {r['error'][-200:]}" for t, r in w.items() if "error" in r)
        return f"not compared ({failed}) [{walls}]"
    return (f"{c['all']['tensors']} tensors, backbone max abs {_f(c['backbone']['max_abs'])}: "
            f"{c['verdict']} [{walls}]")


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
        "command": "python bench/merge_plan_mergekit.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
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
