"""The claims ``bench paper --check`` asserts: measured from results.json, skipped when not run,
and held by the quick run of experiment 5 on the test zoo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mergeshield.cli import main
from mergeshield.experiments import claims
from mergeshield.experiments.dam import DAMConfig
from mergeshield.experiments.ibvs_baselines import IBVSConfig
from mergeshield.experiments.merge_attackers import MergeAttackConfig
from mergeshield.zoo import ZooConfig
from tests.support.zoo import Zoo


def _rate(r: float) -> dict[str, Any]:
    return {"hits": round(r * 100), "total": 100, "rate": r, "ci95": [r, r]}


def _curve(attack: str, asr0: float, asr1: float, base1: float) -> dict[str, Any]:
    def pt(start: str, lam: float, asr: float) -> dict[str, Any]:
        return {"start": start, "lambda": lam, "asr": _rate(asr), "clean_accuracy": _rate(0.8)}
    return {"attack": attack, "points": [pt("clean", 0.0, asr0), pt("clean", 1.0, asr1),
                                         pt("base", 1.0, base1)]}


def _by_id(verdicts: list[claims.Verdict]) -> dict[str, claims.Verdict]:
    return {v.claim.id: v for v in verdicts}


def _merged_asr(results: dict[str, Any], attacker: str) -> float:
    return float(next(p for p in results["experiments"]["ibvs"]["points"]
                      if p["attacker"] == attacker and p["method"] == "task_arithmetic"
                      and p["defence"] == "none")["asr"]["rate"])


def test_a_removal_over_a_merge_the_backdoor_did_not_survive_is_not_measurable() -> None:
    def point(defence: str, lam: float, asr: float) -> dict[str, Any]:
        return {"attacker": "badnets", "method": "task_arithmetic", "defence": defence,
                "lambda_d": lam, "asr": _rate(asr), "mean_accuracy": 0.6}

    weak = {"points": [point("none", 0.0, 0.059), point("random:s0", 1.0, 0.036),
                       point("ibvs:per_class", 1.0, 0.009)]}
    got = _by_id(claims.check({"ibvs": weak}))
    for cid in ("random-does-not", "ibvs-badnets"):
        assert got[cid].held is None and got[cid].value is None
        assert "did not survive the merge (ASR 0.059" in (got[cid].reason or "")
    assert "not measurable: the merged badnets" in claims.markdown(list(got.values()), "h")
    strong = {"points": [point("none", 0.0, 0.8), point("random:s0", 1.0, 0.36)]}
    assert _by_id(claims.check({"ibvs": strong}))["random-does-not"].held is False  # 0.45


def test_measured_claims_hold_or_fail_and_missing_ones_are_not_run() -> None:
    strong = {"curves": [_curve("badnets", 0.02, 0.95, 0.9), _curve("blended", 0.05, 0.8, 0.4)]}
    weak = {"curves": [_curve("badnets", 0.02, 0.1, 0.1)]}
    got = _by_id(claims.check({"bv-arithmetic": strong}))
    assert got["injection"].held is True
    assert got["injection"].value == pytest.approx((0.93 + 0.75) / 2)
    assert got["transplant"].held is True and got["accuracy-kept"].held is True
    assert got["transfer-seed"].held is None and got["transfer-seed"].value is None  # not run
    assert _by_id(claims.check({"bv-arithmetic": weak}))["injection"].held is False
    # a run of experiment 5 without BadMerging: that claim is not run, never passed
    exp5 = {"points": [{"attacker": "badnets", "method": "task_arithmetic", "defence": "none",
                        "lambda_d": 0.0, "asr": _rate(0.5), "mean_accuracy": 0.6}]}
    assert _by_id(claims.check({"ibvs": exp5}))["badmerging-resists-ibvs"].held is None


def test_claims_markdown_lists_every_claim() -> None:
    text = claims.markdown(claims.check({}), "header")
    assert all(f"| {c.id} |" in text for c in claims.CLAIMS if "quick" in c.scales)
    assert "| sbv-stronger |" not in text  # a default-scale claim: not asserted on --quick
    assert "| sbv-stronger |" in claims.markdown(claims.check({}, "default"), "header")
    assert "not run" in text and "**no**" in text  # disagreements with the paper are marked


def test_quick_ibvs_claims_hold_on_the_test_zoo(zoo: Zoo, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Experiment 5 at quick size (BadNets and Blended only, to keep CI short): IBVS keeps clean
    accuracy, and same-norm random directions do not remove the merged backdoor where one
    survived the merge; whether IBVS removes it is measured but not asserted (it flipped between
    CPUs and zoo recipes). A removal claim over a merge the backdoor did not survive is reported
    as not measurable, never as held or failed: two builds of this zoo on one Xeon measured a
    merged BadNets ASR of 0.059, where a random direction's 0.036 read as a 38 % cut."""
    from mergeshield.experiments import runner

    def small(_: MergeAttackConfig, quick: bool) -> IBVSConfig:
        m = MergeAttackConfig(lambdas=(0.5,), sbv_seeds=(), patch_steps=50, max_eval=300,
                              finetune=ZooConfig.for_speed(True).finetune, train_images=1000)
        return IBVSConfig(merge=m, merge_lambda=0.5, attacks=("badnets", "blended"),
                          lambdas=(0.0, 1.0), dam=DAMConfig(steps=5, images=64))

    monkeypatch.setattr(runner, "ibvs_config", small)
    # through the CLI with --check: every claim held → exit 0
    assert main(["bench", "paper", "--quick", "--out", str(tmp_path), "--zoo", str(zoo.root),
                 "--only", "5", "--check"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    got = {c["id"]: c for c in results["claims"]}
    assert got["ibvs-accuracy"]["held"] is True, got["ibvs-accuracy"]
    survived = {a: _merged_asr(results, a) >= claims.MIN_MERGED_ASR for a in ("badnets",
                                                                             "blended")}
    for cid, attacker in (("random-does-not", "badnets"), ("ibvs-badnets", "badnets"),
                          ("ibvs-blended", "blended")):
        if survived[attacker]:  # measured: held for the stable claim, reported for the others
            assert got[cid]["measured"] is not None, got[cid]
            assert got[cid]["held"] is True or not got[cid]["stable"], got[cid]
        else:
            assert got[cid]["held"] is None and "did not survive" in got[cid]["reason"]
    assert got["ibvs-badnets"]["stable"] is False and got["ibvs-blended"]["stable"] is False
    assert got["badmerging-resists-ibvs"]["held"] is None  # BadMerging was not in this run
    assert "| ibvs-badnets |" in (tmp_path / "claims.md").read_text()
    defences = {p["defence"] for p in results["experiments"]["ibvs"]["points"]}
    assert {"before:per_class", "inside:per_class", "ibvs:types", "dam"} <= defences
    assert "DAM (learned mask)" in (tmp_path / "ibvs.md").read_text()

