"""The verdict rule, severities at their boundaries, and CI exit codes."""

from __future__ import annotations

import pytest

from mergeshield.report import (
    IncompleteReason,
    RateModel,
    Severity,
    TriggerMeasurement,
    decide,
    exit_code,
)
from mergeshield.report.verdict import severity_for
from tests.support.reports import sample_report, wilson

INCOMPLETE = [IncompleteReason(code="sweep", message="out of GPU memory")]


def rate(rate: float, lo: float, hits: int | None = None, total: int = 1000) -> RateModel:
    """A rate with a chosen lower interval bound (to sit exactly on a boundary)."""
    h = round(rate * total) if hits is None else hits
    return RateModel(hits=h, total=total, rate=rate, ci95=(lo, min(1.0, rate + 0.02)))


def trigger(
    before: RateModel,
    reference: RateModel | None = None,
    after: RateModel | None = None,
    source: str = "probe",
    tid: str = "probe:patch-checkerboard-3-bottom_right",
) -> TriggerMeasurement:
    return TriggerMeasurement(
        id=tid,
        source=source,  # type: ignore[arg-type]
        spec={"kind": "patch"},
        target=0,
        target_class="0",
        asr_reference=reference,
        asr_before=before,
        asr_after=after,
    )


def test_gap_on_the_lower_bound_exactly_at_threshold_is_a_finding() -> None:
    findings, verdict = decide(
        [trigger(rate(0.35, lo=0.3), reference=rate(0.1, lo=0.08))], incomplete=[]
    )
    assert [f.id for f in findings] == ["MS001"]
    assert verdict.status == "backdoor_suspected"


def test_gap_just_below_threshold_is_not_a_finding() -> None:
    findings, verdict = decide(
        [trigger(rate(0.35, lo=0.2999), reference=rate(0.1, lo=0.08))], incomplete=[]
    )
    assert findings == []
    assert verdict.status == "no_backdoor_found"
    assert verdict.severity is None


def test_high_rate_with_wide_interval_is_judged_on_the_lower_bound() -> None:
    # 3/4 = 75% but the interval starts at 30%: with the base at 15% the gap is 15 points
    wide = wilson(3, 4)
    findings, _ = decide([trigger(wide, reference=rate(0.15, lo=0.1))], incomplete=[])
    assert findings == []


def test_missing_reference_counts_as_zero() -> None:
    findings, _ = decide([trigger(rate(0.25, lo=0.2))], incomplete=[])
    assert len(findings) == 1
    assert "not measured" in findings[0].message


def test_custom_gap() -> None:
    m = [trigger(rate(0.5, lo=0.45), reference=rate(0.1, lo=0.05))]
    assert decide(m, incomplete=[], min_asr_gap=0.4)[0] == []
    assert len(decide(m, incomplete=[], min_asr_gap=0.3)[0]) == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.0, Severity.CRITICAL),
        (0.8, Severity.CRITICAL),
        (0.7999, Severity.HIGH),
        (0.5, Severity.HIGH),
        (0.4999, Severity.MEDIUM),
        (0.2, Severity.MEDIUM),
        (0.1999, Severity.LOW),
        (0.0, Severity.LOW),
    ],
)
def test_severity_boundaries(value: float, expected: Severity) -> None:
    assert severity_for(value) is expected


def test_finding_severity_follows_suspect_rate() -> None:
    findings, verdict = decide([trigger(rate(0.8, lo=0.77))], incomplete=[])
    assert findings[0].severity is Severity.CRITICAL
    assert verdict.severity is Severity.CRITICAL


def test_inverted_trigger_is_ms002() -> None:
    findings, _ = decide(
        [trigger(rate(0.7, lo=0.67), rate(0.08, lo=0.06), source="inverted", tid="inverted:c0")],
        incomplete=[],
    )
    assert [f.id for f in findings] == ["MS002"]
    assert findings[0].message.startswith("inverted trigger inverted:c0 (a small patch, optimised)")


@pytest.mark.parametrize(("tid", "shape"), [("inverted-blend:target-3", "a faint full-image blend"),
                                             ("inverted-small:target-3", "a very small patch"),
                                             ("inverted-warp:target-3", "a smooth warp")])
def test_each_inverted_search_is_ms002_and_says_its_shape(tid: str, shape: str) -> None:
    findings, _ = decide(
        [trigger(rate(0.7, lo=0.67), rate(0.08, lo=0.06), source="inverted", tid=tid)],
        incomplete=[],
    )
    assert [f.id for f in findings] == ["MS002"]
    assert f"({shape}, optimised)" in findings[0].message


def test_sanitising_that_leaves_asr_at_20_percent_is_ms003_high() -> None:
    m = trigger(rate(0.96, lo=0.947), rate(0.012, lo=0.006), after=rate(0.2, lo=0.18))
    findings, verdict = decide([m], incomplete=[])
    assert [(f.id, f.severity) for f in findings] == [
        ("MS001", Severity.CRITICAL),
        ("MS003", Severity.HIGH),
    ]
    assert findings[1].trigger_id == m.id
    assert verdict.severity is Severity.CRITICAL


def test_sanitising_below_20_percent_is_not_ms003() -> None:
    m = trigger(rate(0.96, lo=0.947), rate(0.012, lo=0.006), after=rate(0.1999, lo=0.17))
    assert [f.id for f in decide([m], incomplete=[])[0]] == ["MS001"]


def test_residual_asr_without_a_finding_is_not_ms003() -> None:
    m = trigger(rate(0.3, lo=0.27), rate(0.25, lo=0.22), after=rate(0.3, lo=0.27))
    assert decide([m], incomplete=[])[0] == []


def test_findings_sorted_by_severity() -> None:
    ms = [
        trigger(rate(0.3, lo=0.27), tid="probe:a"),
        trigger(rate(0.9, lo=0.88), tid="probe:b"),
        trigger(rate(0.6, lo=0.57), tid="probe:c"),
    ]
    findings, _ = decide(ms, incomplete=[])
    assert [f.trigger_id for f in findings] == ["probe:b", "probe:c", "probe:a"]


def test_reason_cites_hits_total_and_interval() -> None:
    m = trigger(wilson(961, 1000), reference=wilson(12, 1000))
    findings, verdict = decide([m], incomplete=[])
    assert verdict.reasons[0] == (
        "probe:patch-checkerboard-3-bottom_right sends 961/1000 non-target images "
        "(96.1%, 95% CI 94.7–97.1%) to class '0' on the suspect vs 1.2% on the base model"
    )
    assert findings[0].evidence["asr_before"]["hits"] == 961


def test_clean_verdict_cites_the_highest_trigger() -> None:
    ms = [trigger(wilson(15, 1000), wilson(12, 1000), tid="probe:x")]
    _, verdict = decide(ms, incomplete=[])
    assert verdict.status == "no_backdoor_found"
    assert "15/1000" in verdict.reasons[0] and "probe:x" in verdict.reasons[0]


def test_incomplete_without_findings_is_inconclusive() -> None:
    ms = [trigger(wilson(15, 1000), wilson(12, 1000))]
    _, verdict = decide(ms, incomplete=INCOMPLETE)
    assert verdict.status == "inconclusive"
    assert verdict.severity is None
    assert any("out of GPU memory" in r for r in verdict.reasons)


def test_incomplete_with_findings_is_still_backdoor_suspected() -> None:
    findings, verdict = decide([trigger(rate(0.9, lo=0.88))], incomplete=INCOMPLETE)
    assert findings and verdict.status == "backdoor_suspected"
    assert any("incomplete" in r for r in verdict.reasons)


def test_nothing_measured_is_inconclusive_never_clean() -> None:
    findings, verdict = decide([], incomplete=[])
    assert findings == []
    assert verdict.status == "inconclusive"
    assert verdict.reasons == ["no trigger was measured"]


def test_exit_codes() -> None:
    backdoored = sample_report(backdoored=True)
    assert exit_code(backdoored, Severity.LOW) == 1
    assert exit_code(backdoored, Severity.CRITICAL) == 1
    assert exit_code(sample_report(backdoored=False), Severity.LOW) == 0
    assert exit_code(sample_report(backdoored=False, incomplete=True), Severity.LOW) == 2
    assert exit_code(sample_report(backdoored=True, incomplete=True), Severity.HIGH) == 1


def test_exit_code_threshold_above_every_finding() -> None:
    findings, verdict = decide([trigger(rate(0.3, lo=0.27))], incomplete=[])
    report = sample_report(backdoored=False).model_copy(
        update={"findings": findings, "verdict": verdict}
    )
    assert findings[0].severity is Severity.MEDIUM
    assert exit_code(report, Severity.MEDIUM) == 1
    assert exit_code(report, Severity.HIGH) == 0
    incomplete = report.model_copy(update={"incomplete": INCOMPLETE})
    assert exit_code(incomplete, Severity.HIGH) == 2  # an incomplete scan never exits 0


def test_exit_code_when_nothing_was_measured() -> None:
    findings, verdict = decide([], incomplete=[])
    report = sample_report(backdoored=False).model_copy(
        update={"findings": findings, "verdict": verdict}
    )
    assert exit_code(report, Severity.LOW) == 2


def test_sample_reports_have_the_expected_verdicts() -> None:
    bad = sample_report()
    assert bad.verdict.status == "backdoor_suspected"
    assert bad.verdict.severity is Severity.CRITICAL
    assert {f.id for f in bad.findings} == {"MS001", "MS002"}
    assert sample_report(backdoored=False).verdict.status == "no_backdoor_found"
    assert sample_report(backdoored=False, incomplete=True).verdict.status == "inconclusive"
