"""PNG plots of the experiments (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from mergeshield.experiments.bv_arithmetic import ArithmeticCurve  # noqa: E402
from mergeshield.experiments.merge_attacks import MergeAttackResult  # noqa: E402


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


def merge_attacks(res: MergeAttackResult, path: Path) -> None:
    """Experiment 3: ASR (top) and mean CA (bottom) vs λ per attacker, one column per merge."""
    methods = sorted({p.method for p in res.points})
    fig, axes = plt.subplots(2, len(methods), figsize=(5.5 * len(methods), 7), squeeze=False)
    names = [a["name"] for a in res.attackers]
    for col, method in enumerate(methods):
        for i, name in enumerate(["none", *names]):
            pts = sorted((p for p in res.points if (p.attacker, p.method) == (name, method)),
                         key=lambda p: p.lam)
            style = {"color": "black" if name == "none" else f"C{i % 10}", "marker": "o", "ms": 3,
                         "ls": "--" if name.startswith("sbv") else "-", "label": name}
            lams = [p.lam for p in pts]
            if name != "none":
                axes[0][col].plot(lams, [p.asr["attack"].rate for p in pts], **style)
            axes[1][col].plot(lams, [p.mean_accuracy for p in pts], **style)
        axes[0][col].set(title=f"{method}: ASR of the attack's trigger", ylim=(-0.02, 1.02))
        axes[1][col].set(title=f"{method}: mean clean accuracy", xlabel="λ", ylim=(0, 1))
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def inherent(res: MergeAttackResult, path: Path) -> None:
    """Experiment 4: universal (solid) vs random (dashed) patch ASR vs λ, per merged attacker."""
    methods = sorted({p.method for p in res.points})
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4), squeeze=False)
    base = next(s for s in res.singles if s.name == "base")
    for col, method in enumerate(methods):
        ax = axes[0][col]
        for i, name in enumerate(dict.fromkeys(p.attacker for p in res.points)):
            pts = sorted((p for p in res.points if (p.attacker, p.method) == (name, method)),
                         key=lambda p: p.lam)
            color = "black" if name == "none" else f"C{i % 10}"
            lams = [p.lam for p in pts]
            ax.plot(lams, [p.asr["universal"].rate for p in pts], "-o", ms=3, color=color,
                    label=name)
            ax.plot(lams, [p.asr["random"].rate for p in pts], "--", color=color, lw=0.8)
        ax.axhline(base.asr["universal"].rate, color="grey", lw=2, alpha=0.5,
                   label="base, universal")
        ax.set(title=f"{method}: universal (solid) vs random (dashed) patch", xlabel="λ",
               ylabel="ASR", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
