"""A compact plain-text summary of a scan, for terminals and CI logs."""

from __future__ import annotations

from mergeshield.report.schema import ModelInput, RateModel, ScanReport

_STATUS = {
    "backdoor_suspected": "BACKDOOR SUSPECTED",
    "no_backdoor_found": "NO BACKDOOR FOUND",
    "inconclusive": "INCONCLUSIVE",
}


def _safe(text: str) -> str:
    """Strip control characters (attacker-chosen ids must not drive the terminal)."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _short(rate: RateModel | None) -> str:
    if rate is None:
        return "—"
    return f"{rate.rate:.1%} ({rate.hits}/{rate.total})"


def _model(m: ModelInput) -> str:
    return m.source + (f"@{m.revision}" if m.revision else "")


def to_text(report: ScanReport) -> str:
    """Verdict, findings, clean accuracy and ASR before/after, chosen λ and the output folder."""
    v = report.verdict
    head = _STATUS[v.status] + (f" ({v.severity.value})" if v.severity else "")
    lines = [
        f"MergeShield {report.scanner_version} — scan {report.scan_id}",
        f"Suspect: {_model(report.suspect)}",
        f"Base:    {_model(report.base)}",
        "",
        f"Verdict: {head}",
    ]
    shown = {f.message for f in report.findings}  # listed below as findings
    lines += [f"  - {reason}" for reason in v.reasons if reason not in shown]
    if report.findings:
        lines += ["", f"Findings ({len(report.findings)}):"]
        lines += [f"  {f.id} {f.severity.value:<8} {f.message}" for f in report.findings]
    m = report.metrics
    if m.clean_accuracy_before or m.triggers:
        lines += ["", "                 before (suspect)        after (cleaned)"]
    if m.clean_accuracy_before:
        before, after = _short(m.clean_accuracy_before), _short(m.clean_accuracy_after)
        lines.append(f"Clean accuracy   {before:<23} {after}")
    for t in m.triggers:
        lines.append(f"ASR {t.id}")
        lines.append(f"                 {_short(t.asr_before):<23} {_short(t.asr_after)}")
    if report.sweep:
        lines += ["", f"IBVS λ = {report.sweep.chosen_lambda:g} ({report.sweep.policy})"]
    if report.incomplete:
        lines += ["", "Incomplete:"]
        lines += [f"  - {r.code}: {r.message}" for r in report.incomplete]
    if report.cleaning:
        c = report.cleaning
        lines += ["", f"Cleaned checkpoint: {c.status.replace('_', ' ').upper()} — {c.message}"]
    if report.output:
        lines += ["", f"Output: {report.output.directory}"]
        if report.output.adapter:  # the suspect was a LoRA adapter: the adapter form, or why not
            lines.append(f"Adapter: {report.output.adapter.message}")
    return "\n".join(_safe(line) for line in lines) + "\n"
