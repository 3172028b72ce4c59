"""PNG plots of the experiments (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from mergeshield.experiments.bv_arithmetic import ArithmeticCurve  # noqa: E402


def injection_curves(curves: Sequence[ArithmeticCurve], family: str, path: Path) -> None:
    """ASR vs λ for every BV of ``family``: solid clean + λ·BV, dashed base + λ·BV."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, c in enumerate(x for x in curves if x.family == family):
        color = f"C{i % 10}"
        for start, style in (("clean", "-"), ("base", "--")):
            pts = sorted((p for p in c.points if p.start == start), key=lambda p: p.lam)
            if pts:
                ax.plot([p.lam for p in pts], [p.asr.rate for p in pts], style, color=color,
                        marker="o", ms=3, label=f"{c.task}-{c.attack} ({start})")
    ax.set(xlabel="λ", ylabel="ASR (planted trigger → target)", ylim=(-0.02, 1.02),
           title=f"{family}: ASR of θ + λ·BV (solid: θ = clean, dashed: θ = base)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heatmap(matrix: Sequence[Sequence[float]], labels: Sequence[str], title: str, path: Path,
            *, vmin: float, vmax: float, xlabel: str = "", ylabel: str = "") -> None:
    """An annotated square heatmap."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n))
    im = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap="viridis")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(n), labels, fontsize=6)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if matrix[i][j] < (vmin + vmax) / 2 else "black")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
