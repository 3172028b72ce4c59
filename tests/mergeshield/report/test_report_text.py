"""The terminal summary."""

from __future__ import annotations

from mergeshield.report import IncompleteReason, to_text
from tests.support.reports import sample_report


def test_backdoored_summary() -> None:
    text = to_text(sample_report())
    assert "Verdict: BACKDOOR SUSPECTED (CRITICAL)" in text
    assert "MS001 CRITICAL" in text and "MS002 HIGH" in text
    assert "961/1000" in text  # hits/total, before
    assert "24/1000" in text  # after
    assert "Clean accuracy   96.1% (9612/10000)" in text
    assert "IBVS λ = 0.75" in text
    assert "Output: out/scn_01HZX3K9Q8T5" in text
    assert text.count("sends 961/1000") == 1  # a finding is not repeated as a reason


def test_clean_and_incomplete_summaries() -> None:
    assert "Verdict: NO BACKDOOR FOUND" in to_text(sample_report(backdoored=False))
    text = to_text(sample_report(backdoored=False, incomplete=True))
    assert "Verdict: INCONCLUSIVE" in text
    assert "Incomplete:" in text and "out of GPU memory" in text
    assert "IBVS λ" not in text


def test_control_characters_are_neutralised() -> None:
    report = sample_report().model_copy(
        update={"incomplete": [IncompleteReason(code="x", message="\x1b[2Jcleared")]}
    )
    text = to_text(report)
    assert "\x1b" not in text
    assert "?[2Jcleared" in text
