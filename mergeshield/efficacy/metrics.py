"""Sums of the bench's per-case JSON: per defence, per attack family and overall.

Every rate keeps hits / total and its 95 % Wilson interval. Relative ASR cut of one attack:
(ASR_before − ASR_after) / ASR_before; in merges also the excess cut, (before − after) /
(before − floor) clipped to [0, 1], floor = the clean merge's ASR of the same trigger (the merge
alone already weakens a backdoor, so part of its ASR is no backdoor at all); clean-accuracy
cost: points lost (before − after), merge setting: per merged task, then the mean and the worst
over tasks. AUC: the probability that a planted attack scores above a clean fine-tune (ties count
half; Mann–Whitney).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from mergeshield.evaluation import Rate
from mergeshield.report.verdict import RESIDUAL_ASR


def _r(d: dict[str, Any]) -> float:
    return float(d["rate"])


def _rate(hits: int, total: int) -> dict[str, Any]:
    return Rate(hits, total).to_model().model_dump(mode="json")


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return statistics.fmean(xs) if xs else None


def _cut(before: float, after: float) -> float:
    return (before - after) / before if before > 0 else 0.0


def single(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """Single-checkpoint numbers of defence ``name`` over planted-attack ``rows``."""
    b = [_r(r["own_asr"]) for r in rows]
    a = [_r(r["defences"][name]["asr"]) for r in rows]
    cost = [100 * (_r(r["clean_accuracy"]) - _r(r["defences"][name]["accuracy"])) for r in rows]
    ft = [_r(r["defences"][name]["comeback_finetune_asr"]) for r in rows]
    return {"attacks": len(rows), "asr_before": _mean(b), "asr_after": _mean(a),
            "relative_cut": _mean(_cut(x, y) for x, y in zip(b, a, strict=True)),
            "accuracy_cost_points": _mean(cost), "worst_cost_points": max(cost, default=None),
            "asr_after_comeback_finetune": _mean(ft),
            "seconds": _mean(r["defences"][name]["seconds"] for r in rows)}


def merge(rows: list[dict[str, Any]], name: str, method: str) -> dict[str, Any]:
    """Merge-setting numbers of ``name`` for merges by ``method``."""
    ms = [r["merge"][method] for r in rows]
    b = [_r(m["before"]["asr"]) for m in ms]
    a = [_r(m["defences"][name]["asr"]) for m in ms]
    costs = [[100 * (_r(m["before"]["accuracy"][t]) - _r(acc))
              for t, acc in m["defences"][name]["accuracy"].items()] for m in ms]
    floor = [_r(m["clean_merge_asr"]) for m in ms]
    single_rows = [r["defences"][name] for r in rows if name in r["defences"]]
    back = [_r(d["comeback_merge_asr"][method]) for d in single_rows]  # none: merge-only
    within = sum(100 * (x - f) <= 5 for x, f in zip(back, floor, strict=False))
    # the merge alone weakens a backdoor: the cut of the ASR above the clean merge's (its floor)
    excess = [max(0.0, min(1.0, (x - y) / (x - f))) if x > f else 0.0
              for x, y, f in zip(b, a, floor, strict=True)]
    return {"attacks": len(rows), "asr_before": _mean(b), "asr_after": _mean(a),
            "relative_cut": _mean(_cut(x, y) for x, y in zip(b, a, strict=True)),
            "excess_cut": _mean(excess),
            "accuracy_cost_points_mean": _mean(statistics.fmean(c) for c in costs),
            "accuracy_cost_points_worst": max((max(c) for c in costs), default=None),
            "clean_merge_asr": _mean(floor), "comeback_merge_asr": _mean(back),
            "comeback_within_5_points": _rate(within, len(back)) if back else None}


def detection(rows: list[dict[str, Any]], cleans: list[dict[str, Any]],
              name: str) -> dict[str, Any] | None:
    """TPR over planted attacks, FPR over clean fine-tunes, AUC of the score, and how many
    ``removed`` verdicts the hidden trigger contradicts (its ASR still at the residual rule's
    floor, ``RESIDUAL_ASR``, or above; None where the rows do not say: repairs,
    and runs before the bench recorded the cleaning status); None: no detector."""
    pos = [r["defences"][name] for r in rows]
    neg = [c["defences"][name] for c in cleans if name in c["defences"]]
    if not pos or pos[0].get("flagged") is None:
        return None
    clean_cost = [100 * (_r(c["accuracy"]) - _r(c["defences"][name]["accuracy"]))
                  for c in cleans if name in c["defences"]]
    said = [p for p in pos if p.get("detail", {}).get("cleaning") == "removed"]
    # a flag names targets: at the attack's own is what the repair needs (None: rows before
    # the bench recorded the findings' targets)
    aimed = [(r["attack"].get("target"), r["defences"][name]) for r in rows]
    at_target = _rate(sum(bool(p["flagged"]) and t in p["detail"]["targets"] for t, p in aimed),
                      len(aimed)) if all("targets" in p.get("detail", {}) for _, p in aimed) \
        else None
    return {"tpr": _rate(sum(bool(p["flagged"]) for p in pos), len(pos)),
            "tpr_at_target": at_target,
            "fpr": _rate(sum(bool(n["flagged"]) for n in neg), len(neg)),
            "auc": auc([p["score"] for p in pos], [n["score"] for n in neg]),
            "clean_model_cost_points": _mean(clean_cost),
            "removed_yet_working": _rate(sum(_r(p["asr"]) >= RESIDUAL_ASR for p in said),
                                         len(said)) if said else None}


def summarise(result: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """Per defence: overall and per attack family, both settings, detection, comebacks."""
    rows = [r for r in result["attacks"] if r["planted"]]
    families = sorted({r["attack"]["family"] for r in result["attacks"]})
    planting = {f: _rate(sum(r["planted"] for r in result["attacks"]
                             if r["attack"]["family"] == f),
                         sum(r["attack"]["family"] == f for r in result["attacks"]))
                for f in families}
    out: dict[str, Any] = {"planted": planting, "defences": {},
                           "aliases": dict(result.get("aliases", {}))}
    for name in result["defences"]:
        groups = {"overall": rows, **{f: [r for r in rows if r["attack"]["family"] == f]
                                      for f in families}}
        out["defences"][name] = {
            g: {"single": single(rs, name) if rs else None,
                "merge": {m: merge(rs, name, m) for m in methods} if rs else None,
                "detection": detection(rs, result["clean"], name) if rs else None}
            for g, rs in groups.items()}
    for name in result.get("merge_only", []):  # merge-time defences (DAM): TA rows only
        groups = {"overall": rows, **{f: [r for r in rows if r["attack"]["family"] == f]
                                      for f in families}}
        out["defences"][name] = {
            g: {"single": None, "detection": None,
                "merge": {m: merge(rs, name, m) for m in methods
                          if rs and name in rs[0]["merge"][m]["defences"]} or None}
            for g, rs in groups.items()}
    return out
