"""The qualitative claims ``bench paper --check`` asserts on its own results.

Each claim names the paper's statement (arXiv:2510.08016, or BadMerging's for its attack), what
this scale shows, and a threshold with margin that the measured numbers must clear. A claim whose
experiment (or the rows it reads) did not run is reported as not run, never as passed. Some
claims record a *disagreement* with the paper
(``agrees_with_paper=False``): they assert what we measured, so that a change which starts to
reproduce the paper (or breaks an experiment) is noticed instead of silently rewriting the tables.

The thresholds come from the quick run (one seed) with room for seed noise; the measured value is
printed next to each, and ``claims.md`` lists them all.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Results = dict[str, Any]  # results.json's "experiments"


@dataclass(frozen=True)
class Claim:
    id: str
    experiment: str  # key in results.json's "experiments"
    paper: str  # the paper's statement
    expect: str  # what is asserted here, in words
    agrees_with_paper: bool
    measure: Callable[[dict[str, Any]], float]  # experiment JSON → the measured value
    threshold: float
    above: bool  # holds when measured ≥ threshold (else ≤)
    scales: tuple[str, ...] = ("quick", "default")  # runs it is asserted on (--quick or not)
    # False: measured and reported, never a reason for --check to fail, because the same seed
    # gave opposite results on two CPUs of one kind (a claim that flips is no claim: style.md 17)
    stable: bool = True

    def holds(self, value: float) -> bool:
        return value >= self.threshold if self.above else value <= self.threshold


class NotMeasurable(Exception):  # noqa: N818 - an outcome of a measurement, not a failure
    """The claim's precondition failed in this run (e.g. no merged backdoor to remove), so the
    run is no evidence either way; the message says why."""


# A removal is measured as a fraction of the undefended merged ASR: under this, the merged
# backdoor did not survive the merge, and the fraction is one of two numbers near chance (a quick
# CI run measured 0.036 / 0.059 = 0.615 for a random direction; issue 12)
MIN_MERGED_ASR = 0.5


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    value: float | None  # None: the experiment, or the rows the claim reads, did not run
    held: bool | None
    reason: str | None = None  # why a claim that ran was not measurable (held is None)

    def to_json(self) -> dict[str, Any]:
        c = self.claim
        return {"id": c.id, "experiment": c.experiment, "paper": c.paper, "expect": c.expect,
                "agrees_with_paper": c.agrees_with_paper, "threshold": c.threshold,
                "direction": ">=" if c.above else "<=", "measured": self.value, "held": self.held,
                "stable": c.stable, "reason": self.reason}


# -- measurements over each experiment's JSON -------------------------------------------------
def _point(curve: dict[str, Any], start: str, lam: float) -> dict[str, Any]:
    return next(p for p in curve["points"] if p["start"] == start and p["lambda"] == lam)


def _injection_gain(exp: dict[str, Any]) -> float:
    """Mean over curves of ASR(clean + 1·BV) − ASR(clean + 0·BV)."""
    return statistics.fmean(_point(c, "clean", 1.0)["asr"]["rate"]
                            - _point(c, "clean", 0.0)["asr"]["rate"] for c in exp["curves"])


def _transplant(exp: dict[str, Any]) -> float:
    """Mean ASR of base + 1·BV over the BadNets curves."""
    return statistics.fmean(_point(c, "base", 1.0)["asr"]["rate"]
                            for c in exp["curves"] if c["attack"] == "badnets")


def _ca_cost_at_one(exp: dict[str, Any]) -> float:
    """Mean clean-accuracy drop of clean + 1·BV against clean + 0·BV."""
    return statistics.fmean(_point(c, "clean", 0.0)["clean_accuracy"]["rate"]
                            - _point(c, "clean", 1.0)["clean_accuracy"]["rate"]
                            for c in exp["curves"])


def _transfer(factor: str) -> Callable[[dict[str, Any]], float]:
    return lambda exp: float(exp["summary"][factor]["mean_transfer_asr"])


def _merge_asr(exp: dict[str, Any], attacker: str) -> list[float]:
    """ASR of the attacker's own trigger over its merges that keep the model usable (mean clean
    accuracy ≥ 30%: TA at λ = 1 over three tasks collapses every merge to about 20%)."""
    return [p["asr"]["attack"]["rate"] for p in exp["points"]
            if p["attacker"] == attacker and p["mean_accuracy"] >= 0.3]


def _badmerging_lead(exp: dict[str, Any]) -> float:
    """Mean ASR of BadMerging-On minus mean ASR of BadNets over the usable merges."""
    return (statistics.fmean(_merge_asr(exp, "badmerging"))
            - statistics.fmean(_merge_asr(exp, "badnets")))


def _sbv_lead(exp: dict[str, Any]) -> float:
    """Best SBV/SBV_SC ASR over the usable merges minus the best BadNets ASR."""
    sbv = [r for a in {p["attacker"] for p in exp["points"]} if a.startswith("sbv")
           for r in _merge_asr(exp, a)]
    return max(sbv) - max(_merge_asr(exp, "badnets"))


def _inherent_gap(exp: dict[str, Any]) -> float:
    """ASR of the universal patch minus a random patch of the same size, on the base."""
    base = next(s for s in exp["singles"] if s["name"] == "base")
    return float(base["asr"]["universal"]["rate"] - base["asr"]["random"]["rate"])


def _ibvs_points(exp: dict[str, Any], attacker: str, method: str, defence: str,
                 lam: float) -> list[dict[str, Any]]:
    return [p for p in exp["points"] if p["attacker"] == attacker and p["method"] == method
            and (p["defence"] == defence or p["defence"].startswith(defence + ":"))
            and p["lambda_d"] == lam]


def _undefended(exp: dict[str, Any], attacker: str) -> float:
    """The merged (TA) backdoor's ASR before any defence; NotMeasurable under MIN_MERGED_ASR."""
    none = float(_ibvs_points(exp, attacker, "task_arithmetic", "none", 0.0)[0]["asr"]["rate"])
    if none < MIN_MERGED_ASR:
        raise NotMeasurable(f"the merged {attacker} backdoor did not survive the merge (ASR "
                            f"{none:.3f} < {MIN_MERGED_ASR}): nothing to remove")
    return none


def _ibvs_removal(attacker: str) -> Callable[[dict[str, Any]], float]:
    """ASR after IBVS (default recipe, λ_d = 1, TA) as a fraction of the undefended ASR."""
    def measure(exp: dict[str, Any]) -> float:
        none = _undefended(exp, attacker)
        after = _ibvs_points(exp, attacker, "task_arithmetic", "ibvs:per_class", 1.0)
        return float(after[0]["asr"]["rate"] / none)
    return measure


def _random_removal(exp: dict[str, Any]) -> float:
    """Smallest ASR after a same-norm random direction (λ_d = 1, TA, BadNets), as a fraction of
    the undefended ASR."""
    none = _undefended(exp, "badnets")
    rand = _ibvs_points(exp, "badnets", "task_arithmetic", "random", 1.0)
    return float(min(p["asr"]["rate"] for p in rand) / none)


def _ibvs_accuracy_cost(exp: dict[str, Any]) -> float:
    """Mean clean-accuracy drop of IBVS (default recipe, λ_d = 1) over attackers and merges."""
    drops = []
    for a in {p["attacker"] for p in exp["points"]}:
        for m in {p["method"] for p in exp["points"]}:
            none = _ibvs_points(exp, a, m, "none", 0.0)
            after = _ibvs_points(exp, a, m, "ibvs:per_class", 1.0)
            if none and after:
                drops.append(none[0]["mean_accuracy"] - after[0]["mean_accuracy"])
    return statistics.fmean(drops)


def _badmerging_after_ibvs(exp: dict[str, Any]) -> float:
    return float(_ibvs_points(exp, "badmerging", "task_arithmetic", "ibvs:per_class",
                              1.0)[0]["asr"]["rate"])


CLAIMS: tuple[Claim, ...] = (
    Claim("injection", "bv-arithmetic", "adding λ·BV to a clean fine-tune injects the backdoor",
          "mean ASR gain from λ=0 to λ=1 over all curves ≥ 0.4", True, _injection_gain, 0.4, True),
    Claim("transplant", "bv-arithmetic", "a BV transplants the backdoor onto other models",
          "mean ASR of base + 1·BV over the BadNets curves ≥ 0.5", True, _transplant, 0.5, True),
    Claim("accuracy-kept", "bv-arithmetic", "clean accuracy stays flat while ASR rises",
          "mean clean-accuracy drop at λ=1 ≤ 0.1 (over-scaled BVs at λ=2 do cost accuracy)",
          True, _ca_cost_at_one, 0.1, False),
    Claim("transfer-seed", "bv-similarity", "BVs transfer across seeds",
          "mean transfer ASR across seed ≥ 0.5", True, _transfer("seed"), 0.5, True),
    Claim("transfer-location", "bv-similarity", "BVs transfer across trigger locations",
          "mean transfer ASR across location ≤ 0.3: NOT reproduced at this scale", False,
          _transfer("location"), 0.3, False),
    Claim("no-transfer-target", "bv-similarity", "BVs transfer weakly across target classes",
          "mean transfer ASR across target ≤ 0.15", True, _transfer("target"), 0.15, False),
    Claim("no-transfer-task", "bv-similarity", "BVs transfer weakly across tasks",
          "mean transfer ASR across task ≤ 0.15", True, _transfer("task"), 0.15, False),
    Claim("badmerging-survives", "merge-attacks", "BadMerging survives merging better than "
          "BadNets", "mean ASR lead of BadMerging-On over BadNets on usable merges ≥ 0.3", True,
          _badmerging_lead, 0.3, True),
    Claim("sbv-not-stronger", "merge-attacks", "SBV is stronger than a single BV after merging",
          "best SBV ASR − best BadNets ASR over usable merges ≤ 0: NOT reproduced with 2 BVs "
          "and 1-point budget of the quick run", False, _sbv_lead, 0.0, False, ("quick",)),
    Claim("sbv-stronger", "merge-attacks", "SBV is stronger than a single BV after merging",
          "best SBV ASR − best BadNets ASR over usable merges ≥ 0.2 (3 BVs)", True,
          _sbv_lead, 0.2, True, ("default",)),
    Claim("inherent-trigger", "inherent-triggers", "a universal patch on the base is an "
          "inherent trigger", "ASR gap universal − random patch on the base ≥ 0.05", True,
          _inherent_gap, 0.05, True),
    Claim("ibvs-badnets", "ibvs", "IBVS removes a merged backdoor",
          "BadNets under TA: ASR after IBVS (λ_d=1) ≤ 0.5 × undefended; UNSTABLE, reported only: "
          "0.000 on the 4-epoch quick zoo of one CPU, 0.677 on the 8-epoch zoo (backdoors that "
          "took) of another (issue 12)", True,
          _ibvs_removal("badnets"), 0.5, False, stable=False),
    Claim("ibvs-blended", "ibvs", "IBVS removes a merged backdoor",
          "Blended under TA: ASR after IBVS (λ_d=1) ≤ 0.5 × undefended; UNSTABLE, reported only: "
          "the same seed measured 0.094 on one CPU and 0.821 on another (issue 12)", True,
          _ibvs_removal("blended"), 0.5, False, ("quick",), stable=False),
    Claim("blended-resists-ibvs", "ibvs", "IBVS removes a merged backdoor",
          "Blended under TA: ASR after IBVS (λ_d=1) ≥ 0.7 × undefended: NOT reproduced at "
          "default scale (the merged Blended backdoor is weak, ~13%, and IBVS barely moves it)",
          False, _ibvs_removal("blended"), 0.7, True, ("default",)),
    Claim("random-does-not", "ibvs", "the effect is the BV's direction, not its norm",
          "BadNets under TA: every same-norm random direction keeps ≥ 0.7 × undefended ASR",
          True, _random_removal, 0.7, True),
    Claim("ibvs-accuracy", "ibvs", "IBVS keeps clean accuracy",
          "mean clean-accuracy drop at λ_d=1 over attackers and merges ≤ 0.05", True,
          _ibvs_accuracy_cost, 0.05, False),
    Claim("badmerging-resists-ibvs", "ibvs", "IBVS also removes BadMerging",
          "BadMerging-On under TA keeps ASR ≥ 0.7 after IBVS (λ_d=1): NOT reproduced", False,
          _badmerging_after_ibvs, 0.7, True),
    Claim("detection-auc", "detection", "(ours) the scan separates backdoored from clean "
          "fine-tunes without the trigger", "ROC AUC of the scan's gap ≥ 0.8", True,
          lambda exp: float(exp["auc"]["scan_gap"]), 0.8, True),
    Claim("detection-fpr", "detection", "(ours) the verdict rarely flags a clean fine-tune",
          "false-positive rate of the verdict ≤ 0.25", True,
          lambda exp: float(exp["verdict_rates"]["fpr"]), 0.25, False),
)


def check(experiments: Results, scale: str = "quick") -> list[Verdict]:
    """Every claim of ``scale`` against the experiments that ran (a claim of a missing one is
    reported as not run)."""
    out = []
    for c in CLAIMS:
        if scale not in c.scales:
            continue
        exp = experiments.get(c.experiment)
        if isinstance(exp, dict) and "same_pass_as" in exp:  # 4 shares 3's JSON
            exp = experiments.get(exp["same_pass_as"])
        if exp is None:
            out.append(Verdict(c, None, None))
            continue
        try:
            value = float(c.measure(exp))
        except (LookupError, StopIteration, ValueError):  # the run lacks this claim's rows
            out.append(Verdict(c, None, None))  # (e.g. fewer attackers or λ than the default)
            continue
        except NotMeasurable as why:
            out.append(Verdict(c, None, None, str(why)))
            continue
        out.append(Verdict(c, value, c.holds(value)))
    return out


def markdown(verdicts: list[Verdict], header: str) -> str:
    def result(v: Verdict) -> str:
        if v.held is None:
            return f"not measurable: {v.reason}" if v.reason else "not run"
        return "holds" if v.held else "**FAILS**"

    rows = [f"| {v.claim.id} | {v.claim.paper} | {v.claim.expect} | "
            f"{'—' if v.value is None else f'{v.value:.3f}'} | {result(v)}"
            f"{'' if v.claim.stable else ' (unstable: not asserted)'} | "
            f"{'yes' if v.claim.agrees_with_paper else '**no**'} |" for v in verdicts]
    return "\n".join([
        "# Claims checked by `bench paper --check`", "", header, "",
        "Each row: the paper's statement, the threshold asserted at this scale (with margin), the "
        "measured value and whether it holds. 'agrees with paper: no' rows assert what we measured "
        "where it differs from the paper.", "",
        "| claim | paper | asserted here | measured | result | agrees with paper |",
        "|---|---|---|---|---|---|", *rows, ""])
