"""merge_defence.py: how much of each cleaned model's correction a defended merge takes."""

from __future__ import annotations

from mergeshield.merge_defence import SCALES, ScaleTried, choose


def _tried(*rows: tuple[float, float, bool]) -> list[ScaleTried]:
    return [ScaleTried(scale=s, cost_points={"a": -1.0, "b": worst}, removed=ok)
            for s, worst, ok in rows]


def test_the_largest_safe_scale_within_the_budget_is_taken() -> None:
    got = choose(_tried((1.0, 6.1, True), (0.75, 1.8, True), (0.5, 0.9, True),
                        (0.25, 0.2, False)), budget_points=2.0)
    assert (got.scale, got.within_budget) == (0.75, True)
    assert "0.75" in got.message and "1.8 points" in got.message


def test_over_the_budget_the_gentlest_safe_scale_and_by_how_much() -> None:
    got = choose(_tried((1.0, 6.1, True), (0.75, 4.7, True), (0.5, 3.1, True),
                        (0.25, 0.3, False)), budget_points=2.0)
    assert (got.scale, got.within_budget) == (0.5, False)
    assert "over the budget by 1.1 points" in got.message


def test_no_safe_scale_or_nothing_measured_merges_the_whole_correction() -> None:
    none_safe = choose(_tried(*((s, 0.0, False) for s in SCALES)), budget_points=2.0)
    assert (none_safe.scale, none_safe.within_budget) == (1.0, None)
    assert "still responds" in none_safe.message
    unmeasured = choose([], budget_points=2.0)
    assert (unmeasured.scale, unmeasured.tried) == (1.0, [])
    assert "nothing could be measured" in unmeasured.message
