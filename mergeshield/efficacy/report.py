"""Tables (markdown) and the cut-vs-cost plot of a bench run's summary."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from mergeshield.report.verdict import RESIDUAL_ASR  # noqa: E402

# the targets (test split): TPR ≥ 0.95 at FPR ≤ 0.05, cut ≥ 90 % at ≤ 2 points, comeback
# within 5 points of the clean merge's ASR
TARGETS = {"tpr": 0.95, "fpr": 0.05, "cut": 0.90, "cost": 2.0, "comeback": 5.0}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _pts(x: float | None) -> str:
    return "–" if x is None else f"{x:+.1f}"


def _rate(d: dict[str, Any] | None) -> str:
    if d is None:
        return "–"
    lo, hi = d["ci95"]
    return f"{d['hits']}/{d['total']} ({100 * d['rate']:.0f}%, {100 * lo:.0f}–{100 * hi:.0f})"


def single_table(summary: dict[str, Any], group: str = "overall") -> list[str]:
    lines = ["| defence | ASR before → after | rel. cut | acc. cost (mean / worst, pts) | "
             "ASR after clean FT | TPR | FPR | AUC | clean-model cost | s / case |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, groups in summary["defences"].items():
        g = groups.get(group)
        if not g or not g["single"]:
            continue
        s, d = g["single"], g["detection"]
        lines.append(
            f"| {name} | {_pct(s['asr_before'])} → {_pct(s['asr_after'])} | "
            f"{_pct(s['relative_cut'])} | {_pts(s['accuracy_cost_points'])} / "
            f"{_pts(s['worst_cost_points'])} | {_pct(s['asr_after_comeback_finetune'])} | "
            f"{_rate(d['tpr']) if d else '–'} | {_rate(d['fpr']) if d else '–'} | "
            f"{'–' if not d or d['auc'] is None else format(d['auc'], '.3f')} | "
            f"{_pts(d['clean_model_cost_points']) if d else '–'} | {s['seconds']:.0f} |")
    return lines


def merge_table(summary: dict[str, Any], method: str, group: str = "overall") -> list[str]:
    lines = [f"| defence ({method}) | ASR before → after | rel. cut | excess cut | acc. cost "
             "mean / worst task (pts) | clean merge ASR | cleaned + clean TVs ASR | "
             "within 5 pts |", "|---|---|---|---|---|---|---|---|"]
    for name, groups in summary["defences"].items():
        g = groups.get(group)
        if not g or not g["merge"] or method not in g["merge"]:
            continue
        m = g["merge"][method]
        lines.append(
            f"| {name} | {_pct(m['asr_before'])} → {_pct(m['asr_after'])} | "
            f"{_pct(m['relative_cut'])} | {_pct(m['excess_cut'])} | "
            f"{_pts(m['accuracy_cost_points_mean'])} / "
            f"{_pts(m['accuracy_cost_points_worst'])} | {_pct(m['clean_merge_asr'])} | "
            f"{_pct(m['comeback_merge_asr'])} | {_rate(m['comeback_within_5_points'])} |")
    return lines


def assurance_lines(summary: dict[str, Any]) -> list[str]:
    """Per detecting defence, how often its ``removed`` was wrong about the hidden trigger."""
    out = []
    for name, groups in summary["defences"].items():
        d = (groups.get("overall") or {}).get("detection") or {}
        if d.get("tpr_at_target"):
            out.append(f"`{name}` flagged {d['tpr']['hits']} planted attacks, "
                       f"{d['tpr_at_target']['hits']} of them at the attack's own target: "
                       f"{_rate(d['tpr_at_target'])} of all planted.")
        r = d.get("removed_yet_working")
        if r:
            out.append(f"`{name}` said `removed` on {r['total']} cleaned checkpoints; the hidden "
                       f"trigger (which the scan never saw) still reached ≥ {RESIDUAL_ASR:.0%} ASR "
                       f"on {r['hits']} of them: {_rate(r)} false assurance.")
    return out + [""] if out else []


def family_table(summary: dict[str, Any]) -> list[str]:
    fams = list(summary["planted"])
    lines = ["| defence | " + " | ".join(f"{f} cut / cost" for f in fams) + " |",
             "|---|" + "---|" * len(fams)]
    for name, groups in summary["defences"].items():
        cells = []
        for f in fams:
            s = (groups.get(f) or {}).get("single")
            cells.append("–" if not s else
                         f"{_pct(s['relative_cut'])} / {_pts(s['accuracy_cost_points'])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _fmt(x: float, points: bool) -> str:
    return f"{x:+.1f}" if points else f"{100 * x:.1f}%"


def targets_table(summary: dict[str, Any], methods: Sequence[str],
                  name: str = "product") -> list[str]:
    """The issue's targets for ``name``: measured, and by how much a miss misses."""
    g = summary["defences"].get(name, {}).get("overall")
    if not g or not g["single"]:
        return []
    s, d = g["single"], g["detection"]
    rows = []
    if d is not None:
        rows += [("detection TPR", d["tpr"]["rate"], TARGETS["tpr"], True),
                 ("detection FPR", d["fpr"]["rate"], TARGETS["fpr"], False)]
    rows += [("single: mean relative ASR cut", s["relative_cut"], TARGETS["cut"], True),
             ("single: mean accuracy cost (pts)", s["accuracy_cost_points"], TARGETS["cost"],
              False)]
    for m in methods:
        mm = g["merge"][m]
        within = mm["comeback_within_5_points"]["rate"]
        rows += [(f"merge {m}: mean excess ASR cut", mm["excess_cut"], TARGETS["cut"], True),
                 (f"merge {m}: mean accuracy cost over tasks (pts)",
                  mm["accuracy_cost_points_mean"], TARGETS["cost"], False),
                 (f"merge {m}: cleaned + clean TVs within 5 pts of clean merge", within, 1.0,
                  True)]
    lines = [f"| target ({name}) | measured | goal | met / gap |", "|---|---|---|---|"]
    for label, value, goal, higher in rows:
        pts = label.endswith("(pts)")
        op = "≥" if higher else "≤"
        met = value >= goal if higher else value <= goal
        gap = "met" if met else f"misses by {_fmt(abs(goal - value), pts).lstrip('+')}"
        lines.append(f"| {label} | {_fmt(value, pts)} | {op} {_fmt(goal, pts)} | {gap} |")
    return lines


def markdown(split: str, summary: dict[str, Any], methods: Sequence[str],
             meta: dict[str, Any]) -> str:
    """The split's results page (tables only; the method is in README.md)."""
    planted = ", ".join(f"{f} {_rate(r)}" for f, r in summary["planted"].items())
    family = meta.get("family", "vit")
    name = split.removesuffix(f"-{family}")
    out = [f"# Efficacy bench: {split} split", "",
           f"Written by `mergeshield bench efficacy --split {name}"
           f"{'' if family == 'vit' else ' --family ' + family}` on the {family.upper()} "
           "family "
           f"({meta.get('case_seconds', meta['wall_seconds']) / 60:.1f} min of computing over "
           f"its cases, summed over the processes that ran them (this one: "
           f"{meta['wall_seconds'] / 60:.1f} min wall), on {meta['machine']}, "
           f"{meta['torch_threads']} torch thread(s), zoo `{meta['zoo']}`, "
           f"{meta['planted']} planted attacks of {meta['drawn']} drawn, "
           f"{meta['clean']} clean fine-tunes). Costs are clean-accuracy points lost "
           "(negative = gained). Rates: hits/total (rate, 95 % Wilson interval).", "",
           f"Planted (own ASR ≥ {meta['min_asr']:.0%}) per family: {planted}.", "",
           "## The issue's targets", "", *targets_table(summary, methods), "",
           "## Single checkpoint", "", *single_table(summary), "", *assurance_lines(summary),
           "Per attack family (relative cut / cost in points):", "", *family_table(summary), ""]
    for m in methods:
        lam = meta["ties_scale"] if m == "ties" else meta["merge_lambda"]
        out += [f"## Merge: {m} (λ = {lam}) over every task, one attacked", "",
                *merge_table(summary, m), ""]
    out += ["`excess cut`: of the ASR above the clean merge's ASR of the same trigger (the "
            "merge alone weakens a backdoor). `cleaned + clean TVs ASR`: the single-setting "
            "cleaned checkpoint merged with the "
            "zoo's clean task vectors (does the backdoor come back?); `within 5 pts`: of the "
            "clean merge's ASR of the same hidden trigger. `ASR after clean FT`: the cleaned "
            "checkpoint after a short fine-tune on clean data.", ""]
    return "\n".join(out)


def plot(summary: dict[str, Any], methods: Sequence[str], path: Path, title: str) -> None:
    """Relative hidden-ASR cut vs clean-accuracy cost per defence: single (o), merges (s, ^)."""
    fig, ax = plt.subplots(figsize=(7, 4.8))
    markers = ["s", "^", "v", "D"]
    for i, (name, groups) in enumerate(summary["defences"].items()):
        g = groups.get("overall")
        if not g:
            continue
        color = f"C{i % 10}"
        for j, m in enumerate(methods):
            mm = (g["merge"] or {}).get(m)
            if mm:
                ax.scatter(mm["accuracy_cost_points_mean"], 100 * mm["excess_cut"], color=color,
                           marker=markers[j % len(markers)], s=40, alpha=0.7,
                           label=None if g["single"] else f"{name} (merge only)")
        s = g["single"]
        if not s:
            continue
        shared = summary.get("aliases", {}).get(name, name)
        label = name if shared == name else f"{name} (= {shared})"
        ax.scatter(s["accuracy_cost_points"], 100 * s["relative_cut"], color=color, marker="o",
                   s=60 if shared == name else 140, label=label, zorder=3 if shared == name else 2)
    ax.axhline(100 * TARGETS["cut"], color="grey", ls="--", lw=1)
    ax.axvline(TARGETS["cost"], color="grey", ls="--", lw=1)
    ax.set(xlabel="clean-accuracy cost (points; merges: mean over tasks)",
           ylabel="hidden-ASR cut (%; merges: excess)",
           title=title)
    ax.text(0.01, 0.02, "o single checkpoint, " + ", ".join(
        f"{markers[j % len(markers)]} merge {m}" for j, m in enumerate(methods)),
        transform=ax.transAxes, fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
