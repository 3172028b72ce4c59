"""Markdown tables of the experiments' results (pure: results in, text out)."""

from __future__ import annotations

from collections.abc import Sequence

from mergeshield.evaluation import Rate
from mergeshield.experiments.bv_arithmetic import ArithmeticCurve
from mergeshield.experiments.bv_similarity import FACTORS, SimilarityResult

_EXPECTED = {"location": "strong", "seed": "strong", "target": "weak", "task": "weak"}


def rate_cell(r: Rate) -> str:
    """``hits/total (rate%)``: the denominator is always shown."""
    return f"{r.hits}/{r.total} ({r.rate:.1%})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def arithmetic_markdown(curves: Sequence[ArithmeticCurve], header: str) -> str:
    """One row per model × λ: ASR and clean accuracy of clean + λ·BV and base + λ·BV."""
    rows = []
    for c in curves:
        lams = sorted({p.lam for p in c.points})
        starts = [s for s in ("clean", "base") if any(p.start == s for p in c.points)]
        for lam in lams:
            cells = [c.model, c.attack, str(c.target), f"{lam:g}"]
            for s in ("clean", "base"):
                if s in starts:
                    p = c.point(s, lam)
                    cells += [rate_cell(p.asr), rate_cell(p.clean_accuracy)]
                else:
                    cells += ["–", "–"]
            rows.append(cells)
    lines = [
        "# Experiment 1: BV arithmetic (the injection curve)", "", header, "",
        "BV = θ_backdoored − θ_clean of each backdoored zoo fine-tune (same seed and batch "
        "order). ASR is the model's own planted trigger → target over the non-target test "
        "images; clean accuracy is on the whole test split of the model's task. 95% Wilson "
        "intervals are in `results.json`.", "",
        *_table(["model", "attack", "target", "λ", "ASR clean+λ·BV", "CA clean+λ·BV",
                 "ASR base+λ·BV", "CA base+λ·BV"], rows),
    ]
    return "\n".join(lines) + "\n"


def similarity_markdown(res: SimilarityResult, header: str) -> str:
    """BV list, cosine matrix, transfer matrix and the per-factor summary."""
    ids = [f"b{i}" for i in range(len(res.specs))]
    bv_rows = [[ids[i], s.task, s.location, str(s.seed), str(s.target), f"{res.bv_norms[i]:.3f}",
                rate_cell(res.clean_accuracy[i][0]), rate_cell(res.clean_accuracy[i][1]),
                rate_cell(res.clean_asr[i]), rate_cell(res.transfer[i][i])]
               for i, s in enumerate(res.specs)]
    cos_rows = [[ids[i], *(f"{x:.2f}" for x in row)] for i, row in enumerate(res.cosine)]
    tr_rows = [[f"+BV {ids[i]}", *(f"{r.rate:.0%}" for r in row)]
               for i, row in enumerate(res.transfer)]
    sum_rows = [[f, str(s["pairs"]), f"{s['mean_cosine']:.2f}",
                 f"{s['transfer_hits']}/{s['transfer_total']} ({s['mean_transfer_asr']:.1%})",
                 _EXPECTED[f]] for f in FACTORS if (s := res.summary.get(f))]
    lines = [
        "# Experiment 2: BV similarity and transfer", "", header, "",
        "Each BV comes from a new paired (clean, backdoored) fine-tune from the zoo's base "
        "(BadNets patch; factors: trigger location, seed, target class, task).", "",
        "## The BVs", "",
        *_table(["BV", "task", "location", "seed", "target", "‖BV‖", "CA clean",
                 "CA backdoored", "ASR clean", "ASR backdoored"], bv_rows),
        "", "## Cosine similarity (global)", "", *_table(["", *ids], cos_rows),
        "", "## Transfer: ASR of column b's trigger → target on clean_b + row a's BV", "",
        "The diagonal is the backdoored fine-tune itself; counts per cell in `results.json`.",
        "", *_table(["", *ids], tr_rows),
        "", "## Pairs that differ in one factor only", "",
        *_table(["factor", "ordered pairs", "mean cosine", "transfer ASR (pooled)",
                 "paper expects transfer"], sum_rows),
    ]
    return "\n".join(lines) + "\n"
