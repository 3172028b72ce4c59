"""Does the suspect's task vector lean towards the defender's own backdoor vector? (issue 12)

    python bench/detection_task_vector.py --zoo /work/zoo-default --split dev --prep
    python bench/detection_task_vector.py --zoo /work/zoo-default --split dev --shard 0/2 &
    python bench/detection_task_vector.py --zoo /work/zoo-default --split dev --shard 1/2 &
    wait; python bench/detection_task_vector.py --split dev --render

Experiment 6 (docs/results/detection.md) found the plain cosine of BV_inj with the suspect's task
vector τ the best single detection score on the paper's zoo (AUC 0.988 against the scan gap's
0.940), but on one task its clean values sit 0.05–0.1 apart from another's, so a single line does
not hold across tasks. This bench measures task-vector scores on the efficacy bench's attack space
(the same draws, seeds and planting as ``mergeshield bench efficacy``) and the split's clean
fine-tunes, each computed only from what a scan has: the base θ_0, the suspect θ, and the paired
injection a default scan trains (θ_inj_clean, θ_inj_bd; BV_inj = θ_inj_bd − θ_inj_clean):

* ``cos``: cos(BV_inj, τ), τ = θ − θ_0 (the report's ``injection.cosine_with_task_vector`` is
  a focused variant of it);
* ``cos_perp``: the same after projecting τ_inj_clean = θ_inj_clean − θ_0 out of both vectors:
  the part of a fine-tune that the defender's own clean fine-tune explains (the task) removed;
* ``cos_layers``: the mean over backbone tensors of the per-tensor cosine (every layer weighs
  the same, not the largest);
* ``coef``: ⟨τ, BV_inj⟩ / ‖BV_inj‖² (how much of BV_inj τ carries; scale-dependent).

Beside the split's clean fine-tunes (the zoo's recipe with new seeds, as experiment 6 and the
efficacy bench use them), clean fine-tunes of six other recipes per task (``VARIANTS``: lr × 0.3
or × 3, 2 or 15 epochs, half the rows, weight decay): a scanner does not know how a suspect was
trained, and a score that moves with the recipe flags honest fine-tunes. ``--scan`` runs the
product (a default ``pipeline.scan``) on those too, for its verdict beside the scores.

``--prep`` trains each task's pair once (the scan's default ``InjectionRecipe`` on the task's
training rows) and saves it under ``<work>/``; the shards read it. Per-model scores go to
``<out>/detection-tv-<split>-<shard>.json``, the page (AUC per score, per task ranges, the best
line at a clean false-positive rate ≤ 5 %) to ``<out>/detection-tv-<split>.md``.
Run it on the dev split only: the test splits are scored once, by ``mergeshield bench efficacy``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mergeshield.efficacy.attacks import clean_seeds, draw_split
from mergeshield.efficacy.defences import Case, ScanDefence
from mergeshield.efficacy.world import Backbone, World
from mergeshield.experiments.detection import roc_auc
from mergeshield.ibvs import InjectionRecipe, build_injection_bv
from mergeshield.models import Classifier

SCORES = ("cos", "cos_perp", "cos_layers", "coef", "cos_task", "ratio")
# clean fine-tunes trained otherwise than the zoo's (a scanner does not know a suspect's recipe):
# (name, lr factor, epochs, share of the training rows)
VARIANTS = (("lr0.3", 0.3, 5, 1.0), ("lr3", 3.0, 5, 1.0), ("ep2", 1.0, 2, 1.0),
            ("ep15", 1.0, 15, 1.0), ("half", 1.0, 5, 0.5), ("wd", 1.0, 5, 1.0))


def prep(w: World, work: Path) -> None:
    """Train each task's injection pair as a default scan does and save its backbones."""
    work.mkdir(parents=True, exist_ok=True)
    for task in w.tasks:
        t0 = time.perf_counter()
        make = w.family.task_classifier(w.zoo.weights(w.base_name, w.ref), w.data[task].train,
                                        device=torch.device("cpu"))
        kept: list[tuple[Classifier, Classifier]] = []

        def keep(clean: Classifier, bd: Classifier, kept: list[Any] = kept) -> None:
            kept.append((clean, bd))

        build_injection_bv(make, w.data[task].train, InjectionRecipe(), held_out=w.test(task),
                           inspect=keep)
        clean, bd = kept[0]
        torch.save({"clean": _backbone(w, clean), "bd": _backbone(w, bd)},
                   work / f"inj-{task}.pt")
        print(task, f"{time.perf_counter() - t0:.1f} s", flush=True)


def _backbone(w: World, clf: Classifier) -> Backbone:
    state = clf.backbone_state()
    return {k: state[k].detach().clone() for k in w.keys}


def scores(w: World, tau: Backbone, inj: dict[str, Backbone]) -> dict[str, float]:
    """Every score of one task vector against the task's injection pair."""
    bv = {k: inj["bd"][k] - inj["clean"][k] for k in w.keys}
    c = {k: inj["clean"][k] - w.base[k] for k in w.keys}

    def dot(a: Backbone, b: Backbone) -> float:
        return sum(float(a[k].flatten().double() @ b[k].flatten().double()) for k in w.keys)

    def perp(a: Backbone) -> Backbone:
        s = dot(a, c) / dot(c, c)
        return {k: a[k] - s * c[k] for k in w.keys}

    def cos(a: Backbone, b: Backbone) -> float:
        d = (dot(a, a) * dot(b, b)) ** 0.5
        return dot(a, b) / d if d > 0 else 0.0

    per_tensor = [float(torch.nn.functional.cosine_similarity(
        tau[k].flatten().double(), bv[k].flatten().double(), dim=0))
        for k in w.keys if float(bv[k].norm()) > 0 and float(tau[k].norm()) > 0]
    # τ ≈ a·τ_inj_clean + b·BV_inj (least squares): b / a is BV_inj's share per unit of task
    g = torch.tensor([[dot(c, c), dot(c, bv)], [dot(c, bv), dot(bv, bv)]], dtype=torch.float64)
    a, b = torch.linalg.solve(g, torch.tensor([dot(tau, c), dot(tau, bv)], dtype=torch.float64))
    return {"cos": cos(bv, tau), "cos_perp": cos(perp(bv), perp(tau)),
            "cos_layers": statistics.fmean(per_tensor), "coef": dot(tau, bv) / dot(bv, bv),
            "cos_task": cos(c, tau), "ratio": float(b / a), "tau_norm": dot(tau, tau) ** 0.5}


def run(zoo: Path, split: str, n_attacks: int, n_clean: int, shard: tuple[int, int],
        work: Path, out: Path) -> None:
    torch.set_num_threads(1)
    w = World(zoo)
    inj = {t: torch.load(work / f"inj-{t}.pt") for t in w.tasks}
    i_shard, n_shards = shard
    path = out / f"detection-tv-{split}-{i_shard}.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    done = {r["id"] for r in rows}
    jobs: list[tuple[str, Any]] = [("attack", a) for i, a in
                                   enumerate(draw_split(split, n_attacks, w.tasks))
                                   if i % n_shards == i_shard]
    jobs += [("clean", (j, s)) for j, s in enumerate(clean_seeds(split, n_clean))
             if j % n_shards == i_shard]
    jobs += [("variant", (j, v)) for j, v in enumerate(
             (v, t) for v in VARIANTS for t in w.tasks) if j % n_shards == i_shard]
    for kind, job in jobs:
        t0 = time.perf_counter()
        if kind == "attack":
            if job.id in done:
                continue
            backbone = w.plant(job)
            own = w.asr(job.task, backbone, w.trigger(job), job.target).rate
            row: dict[str, Any] = {"id": job.id, "family": job.family, "task": job.task,
                                   "target": job.target, "own_asr": own}
            task = job.task
        elif kind == "variant":
            j, ((name, lr, epochs, share), task) = job
            row = {"id": f"{split}-clean-{name}-{task}", "family": "clean", "task": task,
                   "variant": name}
            if row["id"] in done:
                continue
            backbone = w.finetune(task, _variant_train(w, task, share),
                                  clean_seeds(split, 100 + j)[-1],
                                  cfg=_variant_cfg(w, name, lr, epochs))
        else:
            j, seed = job
            task = w.tasks[j % len(w.tasks)]
            row = {"id": f"{split}-clean-{j:03d}", "family": "clean", "task": task}
            if row["id"] in done:
                continue
            backbone = w.finetune(task, w.data[task].train, seed)
        row["accuracy"] = w.accuracy(task, backbone).rate
        tau = {k: backbone[k] - w.base[k] for k in w.keys}
        row.update(scores(w, tau, inj[task]))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        path.write_text(json.dumps(rows))
        print(row["id"], row.get("own_asr", "-"), {s: round(row[s], 4) for s in SCORES},
              f"{row['seconds']} s", flush=True)


def scan_variants(zoo: Path, split: str, shard: tuple[int, int], work: Path, out: Path) -> None:
    """The product's verdict on the clean fine-tunes of other recipes (``VARIANTS``): a default
    ``pipeline.scan`` of each, as ``mergeshield bench efficacy`` runs it."""
    torch.set_num_threads(1)
    w = World(zoo)
    product = ScanDefence("product", {}, work / "bv-cache")
    path = out / f"detection-tv-{split}-scan-{shard[0]}.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    done = {r["id"] for r in rows}
    for j, ((name, lr, epochs, share), task) in enumerate((v, t) for v in VARIANTS
                                                          for t in w.tasks):
        rid = f"{split}-clean-{name}-{task}"
        if j % shard[1] != shard[0] or rid in done:
            continue
        t0 = time.perf_counter()
        backbone = w.finetune(task, _variant_train(w, task, share), clean_seeds(split, 101 + j)[-1],
                              cfg=_variant_cfg(w, name, lr, epochs))
        folder = w.save(task, backbone, work / "variants" / rid)
        got = product(w, Case(task, backbone, folder, work / "scans" / rid, 0))
        rows.append({"id": rid, "task": task, "variant": name,
                     "accuracy": w.accuracy(task, backbone).rate, "flagged": got.flagged,
                     "score": got.score, "targets": got.detail["targets"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        path.write_text(json.dumps(rows))
        print(rows[-1], flush=True)


def _variant_train(w: World, task: str, share: float) -> Any:
    train = w.data[task].train
    return train.subset(slice(0, None, 2)) if share < 1 else train


def _variant_cfg(w: World, name: str, lr: float, epochs: int) -> Any:
    ft = w.cfg.finetune
    return replace(ft, lr=ft.lr * lr, epochs=epochs,
                   min_steps=ft.min_steps if epochs >= ft.epochs else 0,
                   weight_decay=0.05 if name == "wd" else 0.0)


def _line(values: list[float]) -> float:
    """The score a flag must exceed for a false-positive rate ≤ 5 % on ``values``."""
    v = sorted(values)
    return v[max(0, int(len(v) * 0.95) - 1)] if v else 0.0


def render(split: str, out: Path) -> str:
    rows = [r for f in sorted(out.glob(f"detection-tv-{split}-[0-9]*.json"))
            for r in json.loads(f.read_text())]
    planted = [r for r in rows if r["family"] != "clean" and r["own_asr"] >= 0.8]
    clean = [r for r in rows if r["family"] == "clean"]
    models = planted + clean
    lines = [f"# Task-vector scores on the `{split}` split", "",
             f"Written by `python bench/detection_task_vector.py --split {split} --render`: "
             f"{len(planted)} planted attacks (own ASR ≥ 80 %, of "
             f"{sum(r['family'] != 'clean' for r in rows)} drawn) and {len(clean)} clean "
             "fine-tunes.", "",
             "Each score against the zoo-recipe clean fine-tunes (the split's clean seeds: "
             "what experiment 6 and the efficacy bench use) and against all clean fine-tunes "
             "(with the other recipes, `VARIANTS`); the line is the lowest value above 95 % of "
             "the clean ones (a false-positive rate ≤ 5 %).", "",
             "| score | AUC (zoo recipe) | line | TPR | AUC (all clean) | line | TPR | "
             "clean range (all) | planted range |", "|---|---|---|---|---|---|---|---|---|"]
    zoo_clean = [r for r in clean if "variant" not in r]
    for s in SCORES:
        cells = []
        for pool in (zoo_clean, clean):
            ms = planted + pool
            auc = roc_auc([r[s] for r in ms], [r["family"] != "clean" for r in ms])
            line = _line([r[s] for r in pool])
            cells.append(f"{auc:.3f} | {line:.4f} | {sum(r[s] > line for r in planted)}"
                         f"/{len(planted)}")
        cv = sorted(r[s] for r in clean)
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {cv[0]:.4f} … {cv[-1]:.4f} | "
                     f"{min(r[s] for r in planted):.4f} … {max(r[s] for r in planted):.4f} |")
    lines += ["", "Per task (clean min … max; planted min … max):", "",
              "| task | score | clean | planted |", "|---|---|---|---|"]
    for task in sorted({r["task"] for r in models}):
        for s in SCORES:
            c = [r[s] for r in clean if r["task"] == task]
            p = [r[s] for r in planted if r["task"] == task]
            if c and p:
                lines.append(f"| {task} | {s} | {min(c):.4f} … {max(c):.4f} | "
                             f"{min(p):.4f} … {max(p):.4f} |")
    lines += ["", "| model | family | task | own ASR | acc | " + " | ".join(SCORES) + " | ‖τ‖ |",
              "|---|---|---|---|---|" + "---|" * (len(SCORES) + 1)]
    for r in sorted(models, key=lambda r: (r["family"] == "clean", r["task"], r["id"])):
        lines.append(f"| {r['id']} | {r['family']} | {r['task']} | "
                     f"{r.get('own_asr', float('nan')):.2f} | {r['accuracy']:.3f} | "
                     + " | ".join(f"{r[s]:.4f}" for s in SCORES) + f" | {r['tau_norm']:.3f} |")
    scanned = [r for f in sorted(out.glob(f"detection-tv-{split}-scan-*.json"))
               for r in json.loads(f.read_text())]
    if scanned:  # the product's verdict on the same recipes, beside the task-vector line
        line = _line([r["cos"] for r in clean if "variant" not in r])
        by_id = {r["id"]: r for r in clean}
        lines += ["", "Clean fine-tunes of other recipes: the product's verdict (`pipeline.scan`,"
                  " defaults) against `cos` above the line drawn on the zoo-recipe clean "
                  f"fine-tunes ({line:.4f}):", "",
                  "| model | accuracy | scan flagged (target) | scan score | cos | cos flags |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(scanned, key=lambda r: r["id"]):
            tv = float(by_id[r["id"]]["cos"]) if r["id"] in by_id else float("nan")
            lines.append(f"| {r['id']} | {r['accuracy']:.3f} | "
                         f"{'yes ' + str(r['targets']) if r['flagged'] else 'no'} | "
                         f"{r['score']:.2f} | {tv:.4f} | {'yes' if tv > line else 'no'} |")
        lines.append(f"| **flagged** | | {sum(r['flagged'] for r in scanned)}/{len(scanned)} "
                     f"| | | {sum(by_id[r['id']]['cos'] > line for r in scanned)}"
                     f"/{len(scanned)} |")
    page = "\n".join(lines) + "\n"
    (out / f"detection-tv-{split}.md").write_text(page)
    return page


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path("zoo"))
    ap.add_argument("--split", default="dev")
    ap.add_argument("--attacks", type=int, default=24)
    ap.add_argument("--clean", type=int, default=24)
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--work", type=Path, default=None, help="default <zoo>/detection-tv-work")
    ap.add_argument("--out", type=Path, default=Path("docs/efficacy"))
    ap.add_argument("--prep", action="store_true", help="train the injection pairs and stop")
    ap.add_argument("--scan", action="store_true",
                    help="scan the clean fine-tunes of other recipes with the product")
    ap.add_argument("--render", action="store_true", help="only write the page from the shards")
    args = ap.parse_args()
    work = args.work or args.zoo / "detection-tv-work"
    if args.prep:
        torch.set_num_threads(1)
        prep(World(args.zoo), work)
        return
    if args.scan:
        i, n = (int(x) for x in args.shard.split("/"))
        scan_variants(args.zoo, args.split, (i, n), work, args.out)
        return
    if not args.render:
        i, n = (int(x) for x in args.shard.split("/"))
        run(args.zoo, args.split, args.attacks, args.clean, (i, n), work, args.out)
    print(render(args.split, args.out))


if __name__ == "__main__":
    main()
