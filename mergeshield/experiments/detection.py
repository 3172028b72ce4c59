"""Experiment 6, detection: can the scan tell a backdoored fine-tune from a clean one?

A population of new ViT fine-tunes of the zoo's base (clean ones, and backdoored ones with varied
BadNets patches, Blended triggers, targets and seeds) is saved to a temporary folder and scanned by
``pipeline.scan`` exactly as the product does it (probe panel, trigger inversion, injection
triggers, ``decide``). Nothing about the planted trigger is given to the scan. Per model, scores:

* ``scan_gap``: max over the trigger-agnostic candidates (probe panel + inverted trigger) of
  suspect ASR − reference ASR (the inverted trigger's reference is its baseline in measure.py);
  ``probe_gap`` and ``inverted_gap`` are its two parts;
* ``bv_cosine_focused``: cosine(focus(BV_inj, τ), τ), the report's ``cosine_with_task_vector``;
  ``bv_cosine``: cosine of the plain BV_inj (from the scan's cache) with τ;
* ``tau_norm`` and ``tau_kurtosis``: statistics of the task vector τ = θ_suspect − θ_base.

ROC AUC per score (rank formula) and the verdict's TPR/FPR (``backdoor_suspected`` = positive).
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mergeshield import bv_cache, checkpoints
from mergeshield.evaluation import attack_success_rate
from mergeshield.experiments.zoo_models import ZooAccess
from mergeshield.models.hf_image import HFImageClassifier
from mergeshield.pipeline import ScanContext, ScanRequest, scan
from mergeshield.task_vectors import TaskVector, cosine
from mergeshield.training import FinetuneConfig, finetune
from mergeshield.triggers import BlendedTrigger, PatchTrigger, Trigger, poison, trigger_id

TASKS = ("mnist", "digits", "mnist-rot90")
SCORES = ("scan_gap", "probe_gap", "inverted_gap", "bv_cosine_focused", "bv_cosine",
          "tau_norm", "tau_kurtosis")
POISON_RATE = 0.1
# BadNets patches (pattern × size × location, some off the probe panel's corners) and Blended
TRIGGERS: tuple[dict[str, Any], ...] = (
    {"kind": "patch", "pattern": "checkerboard", "size": 3, "location": "bottom_right"},
    {"kind": "blended", "pattern": "noise", "alpha": 0.2},
    {"kind": "patch", "pattern": "solid", "size": 3, "location": "top_left"},
    {"kind": "patch", "pattern": "random", "size": 4, "location": "top_right"},
    {"kind": "blended", "pattern": "stripes", "alpha": 0.15},
    {"kind": "patch", "pattern": "checkerboard", "size": 4, "location": "bottom_left"},
    {"kind": "patch", "pattern": "random", "size": 3, "location": "center"},
    {"kind": "patch", "pattern": "solid", "size": 4, "location": (10, 14)},
)


def roc_auc(scores: list[float], labels: list[bool]) -> float:
    """P(score of a positive > score of a negative), ties counting ½ (Mann–Whitney U / n⁺n⁻)."""
    if len(scores) != len(labels):
        raise ValueError("scores and labels differ in length")
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs at least one positive and one negative")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average 1-based ranks over runs of tied scores
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels, strict=True) if y)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def rates(predicted: list[bool], labels: list[bool]) -> dict[str, float]:
    """Confusion counts with TPR = TP / positives and FPR = FP / negatives (0 when none)."""
    pairs = list(zip(predicted, labels, strict=True))
    tp = sum(p and y for p, y in pairs)
    fp = sum(p and not y for p, y in pairs)
    fn = sum(not p and y for p, y in pairs)
    tn = sum(not p and not y for p, y in pairs)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "tpr": tp / (tp + fn) if tp + fn else 0.0, "fpr": fp / (fp + tn) if fp + tn else 0.0}


def kurtosis(tau: TaskVector) -> float:
    """Excess kurtosis of every entry of τ (0 for a Gaussian; heavy tails > 0)."""
    x = torch.cat([tau[k].flatten().double() for k in tau])
    z = x - x.mean()
    var = float((z * z).mean())
    return float((z ** 4).mean()) / (var * var) - 3.0 if var > 0 else 0.0


def population(n_clean: int, n_backdoored: int, seed: int) -> list[dict[str, Any]]:
    """The fine-tunes to build: task, seed, and for backdoored ones trigger and target."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(n_clean):
        out.append({"kind": "clean", "task": TASKS[i % len(TASKS)], "seed": seed + i,
                    "trigger": None, "target": None})
    for i in range(n_backdoored):
        spec = dict(TRIGGERS[i % len(TRIGGERS)])
        spec["seed"] = rng.randrange(1000)  # random patch / noise pattern
        out.append({"kind": "backdoored", "task": TASKS[(i + 1) % len(TASKS)],
                    "seed": seed + 100 + i, "trigger": spec, "target": rng.randrange(10)})
    return out


def _trigger(spec: dict[str, Any]) -> Trigger:
    return (PatchTrigger if spec["kind"] == "patch" else BlendedTrigger).model_validate(spec)


def _score(report: Any, tau: TaskVector, cache: Path) -> dict[str, float]:
    def gap(sources: set[str]) -> float:
        return max((m.asr_before.rate - (m.asr_reference.rate if m.asr_reference else 0.0)
                    for m in report.metrics.triggers if m.source in sources), default=0.0)

    bv = bv_cache.load(cache, report.injection.recipe_hash)
    assert bv is not None
    return {"scan_gap": gap({"probe", "inverted"}), "probe_gap": gap({"probe"}),
            "inverted_gap": gap({"inverted"}),
            "bv_cosine_focused": float(report.injection.cosine_with_task_vector),
            "bv_cosine": cosine(bv.restrict(tau), tau),
            "tau_norm": float(report.task_vector.norm), "tau_kurtosis": kurtosis(tau)}


def run_detection(zoo_root: str | Path, *, n_clean: int = 20, n_backdoored: int = 20,
                  quick: bool = False, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Fine-tune, save and scan the population; per-model rows, ROC AUC per score, verdict rates."""
    zoo = ZooAccess(Path(zoo_root), device)
    base_entry = zoo.base_of_family("vit")
    some = next(m["name"] for m in zoo.manifest["models"]
                if m["family"] == "vit" and m["base"] is not None)
    family, keys = zoo.family(some), zoo.backbone(some)
    base = zoo.weights(base_entry["name"], some)
    base_dir = str(zoo.root / base_entry["path"])
    base_src = checkpoints.resolve(base_dir)
    # the zoo's own fine-tune (5 epochs, >= 300 steps); quick: 120 steps, enough to plant most
    ft = FinetuneConfig(epochs=3, lr=1e-3, min_steps=120) if quick else FinetuneConfig(
        epochs=5, lr=1e-3, min_steps=300)
    max_eval, inversion_steps = (300, 40) if quick else (500, 60)
    makers = {t: family.task_classifier(base, zoo.task(t).train, device=zoo.device, seed=0)
              for t in TASKS}
    rows: list[dict[str, Any]] = []
    t_ft = t_scan = 0.0
    with tempfile.TemporaryDirectory(prefix="mergeshield-detection-") as tmp:
        cache = Path(tmp) / "cache"
        for n, spec in enumerate(population(n_clean, n_backdoored, seed)):
            t0 = time.perf_counter()
            task = zoo.task(spec["task"])
            trig = _trigger(spec["trigger"]) if spec["trigger"] else None
            train = task.train
            if trig is not None:
                train, _ = poison(train, trig, spec["target"], POISON_RATE, seed=spec["seed"])
            clf = makers[spec["task"]]()
            theta = finetune(clf, train, replace(ft, seed=spec["seed"]))
            test = task.test.subset(slice(0, max_eval))
            true_asr = (attack_success_rate(clf, test, trig, spec["target"]).rate
                        if trig is not None else None)
            assert isinstance(clf, HFImageClassifier)
            folder = Path(tmp) / f"m{n}"
            checkpoints.save_checkpoint(folder, clf.checkpoint_state(), config=base_src.config,
                                        metadata={"format": "pt"})
            t1 = time.perf_counter()
            report = scan(ScanRequest(suspect=str(folder), base=base_dir,
                                      evaluation=str(zoo.root / "datasets" / spec["task"]),
                                      max_eval=max_eval, inversion=True,
                                      inversion_steps=inversion_steps, seed=seed),
                          ScanContext(cache_dir=cache, device=device))
            tau = TaskVector.between(base, theta, keys).materialize()
            rows.append({**spec, "id": f"{spec['kind']}-{n}",
                         "trigger_id": trigger_id(trig) if trig is not None else None,
                         "true_asr": true_asr,
                         "clean_accuracy": report.metrics.clean_accuracy_before.rate,  # type: ignore[union-attr]
                         "scores": _score(report, tau, cache),
                         "verdict": report.verdict.status,
                         "rules": sorted({f.id for f in report.findings})})
            t_ft, t_scan = t_ft + t1 - t0, t_scan + time.perf_counter() - t1
    labels = [r["kind"] == "backdoored" for r in rows]
    return {
        "config": {"n_clean": n_clean, "n_backdoored": n_backdoored, "quick": quick,
                   "seed": seed, "tasks": list(TASKS), "poison_rate": POISON_RATE,
                   "finetune": {"epochs": ft.epochs, "min_steps": ft.min_steps, "lr": ft.lr,
                                "batch_size": ft.batch_size},
                   "max_eval": max_eval, "inversion_steps": inversion_steps,
                   "min_asr_gap": ScanRequest.model_fields["min_asr_gap"].default},
        "models": rows,
        "auc": {s: roc_auc([r["scores"][s] for r in rows], labels) for s in SCORES},
        "verdict_rates": rates([r["verdict"] == "backdoor_suspected" for r in rows], labels),
        "seconds": {"finetune": round(t_ft, 1), "scan": round(t_scan, 1),
                    "total": round(t_ft + t_scan, 1)},
    }


def to_markdown(result: dict[str, Any]) -> str:
    """The AUC table, the verdict's TPR/FPR, and one row per model."""
    v, cfg = result["verdict_rates"], result["config"]
    lines = ["| score | ROC AUC |", "|---|---|"]
    lines += [f"| {s} | {a:.3f} |" for s, a in result["auc"].items()]
    lines += ["", f"Scan verdict (`backdoor_suspected`, min_asr_gap={cfg['min_asr_gap']}): "
              f"TPR {v['tpr']:.2f} ({v['tp']}/{v['tp'] + v['fn']}), "
              f"FPR {v['fpr']:.2f} ({v['fp']}/{v['fp'] + v['tn']}).", "",
              "| model | task | trigger | target | seed | true ASR | clean acc | scan gap | "
              "probe gap | inverted gap | BV cos (focused) | BV cos | ‖τ‖ | kurtosis τ | "
              "verdict | rules |",
              "|" + "---|" * 16]
    for r in result["models"]:
        s = r["scores"]
        asr = "–" if r["true_asr"] is None else f"{r['true_asr']:.2f}"
        lines.append(
            f"| {r['id']} | {r['task']} | {r['trigger_id'] or '–'} | "
            f"{'–' if r['target'] is None else r['target']} | {r['seed']} | {asr} | "
            f"{r['clean_accuracy']:.2f} | {s['scan_gap']:.2f} | {s['probe_gap']:.2f} | "
            f"{s['inverted_gap']:.2f} | {s['bv_cosine_focused']:.3f} | {s['bv_cosine']:.3f} | "
            f"{s['tau_norm']:.2f} | {s['tau_kurtosis']:.1f} | {r['verdict']} | "
            f"{', '.join(r['rules']) or '–'} |")
    return "\n".join(lines) + "\n"
