"""One self-contained HTML page for a scan report: inline CSS, inline SVG charts, data-URI images.

Nothing is loaded from elsewhere, and a Content-Security-Policy forbids it. Every string taken from
the report is escaped: repo ids, trigger ids and specs are chosen by whoever uploaded the model.
"""

from __future__ import annotations

import html
import json
import os
import re
from typing import Any

from mergeshield.report.schema import ModelInput, RateModel, ScanReport, SweepSummary
from mergeshield.report.svg import bar_chart, line_chart
from mergeshield.report.verdict import fmt_rate

_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_STATUS = {
    "backdoor_suspected": "Backdoor suspected",
    "no_backdoor_found": "No backdoor found",
    "inconclusive": "Inconclusive",
}
_CSS = """
:root{--fg:#1a1a1a;--muted:#555;--line:#d0d0d0;--bg:#fff;--soft:#f5f5f5}
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:var(--bg);max-width:62rem;margin:0 auto;padding:1rem}
h1{font-size:1.5rem;margin:.2rem 0}h2{font-size:1.2rem;margin-top:2rem;
border-bottom:1px solid var(--line)}h3{font-size:1rem}
.muted{color:var(--muted)}code,pre{font:13px/1.4 ui-monospace,Menlo,Consolas,monospace;
overflow-wrap:anywhere}pre{background:var(--soft);padding:.6rem;overflow-x:auto;white-space:pre-wrap}
.scroll{overflow-x:auto;margin:.5rem 0}
table{border-collapse:collapse;min-width:100%}
th,td{border:1px solid var(--line);padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:var(--soft)}td.num{white-space:nowrap}
.verdict{border-left:.5rem solid;padding:.6rem 1rem;border-radius:.3rem}
.verdict h2{border:0;margin:.2rem 0}
.sev-CRITICAL{border-color:#7f1d1d;background:#fde2e2}.sev-HIGH{border-color:#c2410c;background:#ffedd5}
.sev-MEDIUM{border-color:#b45309;background:#fef3c7}.sev-LOW{border-color:#1d4ed8;background:#e0ecff}
.sev-none{border-color:#15803d;background:#dcfce7}.sev-inconclusive{border-color:#6b7280;
background:#eef0f3}
.badge{display:inline-block;padding:0 .4rem;border-radius:.3rem;font-size:.8rem;font-weight:600;
color:#fff}.badge.sev-CRITICAL{background:#7f1d1d}.badge.sev-HIGH{background:#c2410c}
.badge.sev-MEDIUM{background:#b45309}.badge.sev-LOW{background:#1d4ed8}
img.preview{image-rendering:pixelated;width:64px;height:64px;border:1px solid var(--line)}
figure{margin:1rem 0}svg{max-width:100%;height:auto;display:block}
.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:.3rem 1rem;font-size:.85rem}
.swatch{display:inline-block;width:1.2rem;height:.25rem;vertical-align:middle;margin-right:.3rem}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _rate(rate: RateModel | None) -> str:
    return '<span class="muted">—</span>' if rate is None else _e(fmt_rate(rate))


def _table(head: list[str], rows: list[list[str]], *, raw: bool = False) -> str:
    """A scrolling table; cells are escaped unless ``raw`` (then the caller escaped them)."""
    cell = (lambda c: c) if raw else _e
    th = "".join(f'<th scope="col">{_e(h)}</th>' for h in head)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return (
        f'<div class="scroll"><table><thead><tr>{th}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _verdict(report: ScanReport) -> str:
    v = report.verdict
    sev = v.severity.value if v.severity else {"inconclusive": "inconclusive"}.get(v.status, "none")
    label = _STATUS[v.status] + (f" ({v.severity.value})" if v.severity else "")
    # findings first, each with its severity and rule; then the reasons that are not findings
    items = [
        f'<li><span class="badge sev-{f.severity.value}">{_e(f.severity.value)}</span> '
        f"<code>{_e(f.id)}</code> <strong>{_e(f.title)}</strong>: {_e(f.message)}</li>"
        for f in report.findings
    ]
    shown = {f.message for f in report.findings}
    items += [f"<li>{_e(r)}</li>" for r in v.reasons if r not in shown]
    return (
        f'<section class="verdict sev-{sev}" aria-labelledby="verdict"><h2 id="verdict">'
        f"Verdict: {_e(label)}</h2><ul>{''.join(items)}</ul></section>"
    )


def _preview(png: str | None, trigger_id: str) -> str:
    if not png or not _B64.fullmatch(png):
        return '<span class="muted">—</span>'
    return (
        f'<img class="preview" src="data:image/png;base64,{png}" width="64" height="64" '
        f'alt="{_e(f"Trigger {trigger_id} stamped on a sample input")}">'
    )


def _triggers(report: ScanReport) -> str:
    m = report.metrics
    parts = ["<h2>Clean accuracy</h2>"]
    parts.append(
        _table(
            ["Base backbone + suspect head", "Suspect", "Cleaned"],
            [
                [
                    _rate(m.clean_accuracy_reference),
                    _rate(m.clean_accuracy_before),
                    _rate(m.clean_accuracy_after),
                ]
            ],
            raw=True,
        )
    )
    if not m.triggers:
        return "".join(parts)
    rows = [
        [
            f"<code>{_e(t.id)}</code><details><summary>spec</summary><pre>"
            f"{_e(json.dumps(t.spec, indent=1, sort_keys=True))}</pre></details>",
            _e(t.source),
            f"{t.target} <code>{_e(t.target_class)}</code>",
            _preview(t.preview_png, t.id),
            _rate(t.asr_reference),
            _rate(t.asr_before),
            _rate(t.asr_after),
        ]
        for t in m.triggers
    ]
    head = ["Trigger", "Source", "Target", "Preview", "ASR base", "ASR suspect", "ASR cleaned"]
    parts += ["<h2>Triggers (attack success rate)</h2>", _table(head, rows, raw=True)]
    return "".join(parts)


def _sweep(sweep: SweepSummary) -> str:
    pts = sorted(sweep.points, key=lambda p: p.lam)
    series = [("clean accuracy", [(p.lam, p.clean_accuracy.rate) for p in pts])]
    ids = list(dict.fromkeys(k for p in pts for k in p.asr))
    series += [(f"ASR {i}", [(p.lam, p.asr[i].rate) for p in pts if i in p.asr]) for i in ids]
    chart = line_chart(
        series,
        marker=sweep.chosen_lambda,
        label=f"Lambda sweep: clean accuracy and attack success rate against lambda; "
        f"chosen lambda {sweep.chosen_lambda:g}",
    )
    return (
        "<h2>λ sweep (IBVS)</h2>"
        f"<p>Chosen λ = <strong>{sweep.chosen_lambda:g}</strong> — {_e(sweep.policy)}.</p>"
        f"<figure>{chart}</figure>"
    )


def _task_vector(report: ScanReport) -> str:
    tv = report.task_vector
    if tv is None:
        return ""
    top = sorted(tv.per_tensor, key=lambda s: s.relative_norm, reverse=True)[:40]
    # shorten labels by the names' shared dotted prefix ("vit.encoder.layer."), said in a caption
    prefix = os.path.commonprefix([s.name for s in top]) if len(top) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]
    chart = bar_chart(
        [(s.name[len(prefix) :], s.relative_norm) for s in top],
        label=f"Relative task-vector norm of the {len(top)} most changed tensors",
    )
    caption = f"<figcaption>Tensor names after <code>{_e(prefix)}</code></figcaption>"
    stats = [
        ["Tensors", f"{tv.n_tensors:,}"],
        ["Parameters", f"{tv.n_parameters:,}"],
        ["Norm ‖τ‖", f"{tv.norm:.4g}"],
        ["Base norm", f"{tv.base_norm:.4g}"],
    ]
    if report.injection:
        inj = report.injection
        stats += [
            ["Injection BV norm", f"{inj.bv_norm:.4g}"],
            ["cos(BV_inj, τ)", f"{inj.cosine_with_task_vector:.3f}"],
            ["Injection recipe", json.dumps(inj.recipe, sort_keys=True)],
            ["Recipe hash", inj.recipe_hash + (" (cached)" if inj.cached else "")],
        ]
    skipped = [[s.name, s.reason] for s in tv.skipped]
    return (
        "<h2>Task vector</h2>"
        + _table(["", "Value"], stats)
        + "<h3>Relative norm per tensor (largest first)</h3>"
        + f"<figure>{chart}{caption if prefix else ''}</figure>"
        + ("<h3>Skipped tensors</h3>" + _table(["Tensor", "Reason"], skipped) if skipped else "")
    )


def _layers(report: ScanReport) -> str:
    tv = report.task_vector
    if tv is None or not tv.per_layer:
        return ""
    chart = bar_chart(
        [(layer.name, layer.relative_norm) for layer in tv.per_layer],
        label=f"Relative task-vector norm of each of the {len(tv.per_layer)} layers, in order",
    )
    rows = [[layer.name, f"{layer.n_tensors}", f"{layer.numel:,}", f"{layer.norm:.4g}",
             f"{layer.relative_norm:.4g}"] for layer in tv.per_layer]
    return (
        "<h2>Task-vector norm per layer</h2>"
        f"<figure>{chart}<figcaption>‖τ‖ of each layer relative to the base layer's norm"
        "</figcaption></figure>"
        "<details><summary>Per-layer numbers</summary>"
        + _table(["Layer", "Tensors", "Parameters", "Norm ‖τ‖", "Relative"], rows)
        + "</details>"
    )


def _model_rows(role: str, m: ModelInput) -> list[list[str]]:
    return [
        [
            role,
            m.source,
            m.kind,
            m.revision_requested or "—",
            m.revision or "—",
            m.family or "—",
            m.architecture or "—",
        ]
    ]


def _provenance(report: ScanReport) -> str:
    head = ["Role", "Source", "Kind", "Requested", "Resolved", "Family", "Architecture"]
    models = _model_rows("suspect", report.suspect) + _model_rows("base", report.base)
    files = [
        [role, f.path, f"{f.size:,}", f.sha256]
        for role, m in (("suspect", report.suspect), ("base", report.base))
        for f in m.files
    ]
    adapter = report.output.adapter if report.output else None
    if report.output:
        files += [["output", f.path, f"{f.size:,}", f.sha256] for f in report.output.files]
    if adapter:
        files += [["adapter", f.path, f"{f.size:,}", f.sha256] for f in adapter.files]
    run = [
        ["Scan id", report.scan_id],
        ["Created", report.created_at],
        ["Scanner version", report.scanner_version],
        ["Schema version", report.schema_version],
        ["Config hash", report.config_hash],
        ["Device", report.device],
    ]
    if report.output:
        run.append(["Output folder", report.output.directory])
    if adapter:  # the suspect was a LoRA adapter: the cleaned result as one, or why not
        run.append(["Adapter", f"{adapter.directory} — {adapter.message}" if adapter.directory
                    else adapter.message])
    ev = report.evaluation
    if ev:
        run.append(
            [
                "Evaluation data",
                f"{ev.name} ({ev.source}), split {ev.split}, "
                f"{ev.size:,} images, {len(ev.classes)} classes, sha256 {ev.sha256}",
            ]
        )
    timings = [[k, f"{v:.2f} s"] for k, v in report.timings.items()]
    return (
        "<h2>Provenance</h2>"
        + _table(head, models)
        + "<h3>Files (sha256)</h3>"
        + _table(["Role", "Path", "Bytes", "sha256"], files)
        + "<h3>Run</h3>"
        + _table(["", "Value"], run)
        + "<h3>Timings</h3>"
        + _table(["Stage", "Time"], timings)
        + "<h3>Configuration</h3><pre>"
        + _e(json.dumps(report.config, indent=2, sort_keys=True))
        + "</pre>"
    )


def _incomplete(report: ScanReport) -> str:
    if not report.incomplete:
        return ""
    rows = [[r.code, r.message] for r in report.incomplete]
    return "<h2>Incomplete</h2><p>Parts of the scan could not be measured:</p>" + _table(
        ["Stage", "Reason"], rows
    )


def _cleaning(report: ScanReport) -> str:
    """The cleaned checkpoint's status, the sentence shown next to its download."""
    c = report.cleaning
    if c is None:
        return ""
    role = ' role="alert"' if c.status == "not_removed" else ""
    return (f'<section aria-labelledby="cleaning-h" class="cleaning cleaning-{_e(c.status)}">'
            f'<h2 id="cleaning-h">Cleaned checkpoint</h2>'
            f'<p{role}><strong>'
            f'{_e(c.status.replace("_", " "))}</strong>: {_e(c.message)}</p>'
            f'<p class="muted">Applied: {_e(" → ".join(c.steps))}</p></section>')


def sections(report: ScanReport) -> dict[str, str]:
    """The report's sections as escaped HTML fragments, in reading order (verdict first); the
    dashboard places them in its own page, ``to_html`` in a standalone one."""
    return {
        "verdict": _verdict(report),
        "cleaning": _cleaning(report),
        "triggers": _triggers(report),
        "sweep": _sweep(report.sweep) if report.sweep else "",
        "layers": _layers(report),
        "task_vector": _task_vector(report),
        "provenance": _provenance(report),
        "incomplete": _incomplete(report),
    }


def to_html(report: ScanReport) -> str:
    """The report as one self-contained, escaped, phone-readable HTML page."""
    body: list[Any] = [
        "<header><h1>MergeShield scan report</h1>",
        f'<p class="muted">Suspect <code>{_e(report.suspect.source)}</code> '
        f"against base <code>{_e(report.base.source)}</code> · scan <code>"
        f"{_e(report.scan_id)}</code> · {_e(report.created_at)}</p></header><main>",
        *sections(report).values(),
        "</main>",
    ]
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        f"<title>{_e(_STATUS[report.verdict.status])} — {_e(report.suspect.source)} — "
        f"MergeShield</title><style>{_CSS}</style></head><body>"
        + "".join(body)
        + "</body></html>\n"
    )
