"""Markdown tables of the experiments' results (pure: results in, text out)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from mergeshield.evaluation import Rate
from mergeshield.experiments.bv_arithmetic import ArithmeticCurve
from mergeshield.experiments.bv_similarity import FACTORS, SimilarityResult
from mergeshield.experiments.ibvs_baselines import IBVSResult
from mergeshield.experiments.merge_attacks import MergeAttackResult
from mergeshield.triggers import ImageTrigger

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


def _pct(r: Rate) -> str:
    return f"{r.hits}/{r.total} ({r.rate:.0%})"


def merge_attacks_markdown(res: MergeAttackResult, header: str) -> str:
    """Experiment 3: the attacker checkpoints alone, then ASR and clean accuracy after merging."""
    singles = []
    for s in res.singles:
        a = next((x for x in res.attackers if x["name"] == s.name), None)
        lam = a["detail"].get("lambda_sbv", "–") if a else "–"
        own = s.asr.get("attack")
        singles.append([s.name, a["attack"] if a else "–", str(a["target"]) if a else "–",
                        str(lam), f"{s.tv_norm:.2f}", rate_cell(own) if own else "–",
                        rate_cell(s.accuracy)])
    rows = []
    for p in res.points:
        if p.attacker == "none":
            continue
        acc = [rate_cell(p.accuracy[t]) for t in res.tasks]
        rows.append([p.attacker, p.method, f"{p.lam:g}", rate_cell(p.asr["attack"]),
                     f"{p.mean_accuracy:.1%}", *acc])
    floors = [[p.method, f"{p.lam:g}", *(rate_cell(r) for r in p.asr.values()),
               f"{p.mean_accuracy:.1%}"] for p in res.points if p.attacker == "none"]
    kinds = list(next(p for p in res.points if p.attacker == "none").asr)
    lines = [
        "# Experiment 3: attacks after merging", "", header, "",
        f"Attacked task: {res.task} (target {res.target}); merged with the clean zoo fine-tunes "
        f"of {', '.join(res.tasks[1:])}. TA: θ_pre + λ·Σ τ_t; TIES: trim to the top "
        "`ties_keep` of each τ, elect signs, disjoint mean × λ. ASR: the attack's own trigger → "
        f"target on the non-target test images of {res.task}; CA: each task with its own head; "
        "mean CA is the unweighted mean over tasks. 95% Wilson intervals are in `results.json`.",
        "", "## The attacker checkpoints alone (on the attacked task)", "",
        *_table(["attacker", "attack", "target", "λ_SBV", "‖τ‖", "ASR", "CA"], singles),
        "", "## After merging", "",
        *_table(["attacker", "merge", "λ", "ASR", "mean CA", *(f"CA {t}" for t in res.tasks)],
                rows),
        "", "## The clean merge (no backdoored model): ASR of each trigger, the floor", "",
        *_table(["merge", "λ", *(f"ASR {k}" for k in kinds), "mean CA"], floors),
    ]
    return "\n".join(lines) + "\n"


def inherent_markdown(res: MergeAttackResult, header: str) -> str:
    """Experiment 4: the base's universal patch against a random patch, on every model."""
    assert isinstance(res.universal, ImageTrigger)  # the base's universal patch
    side = len(res.universal.pattern[0])
    single_rows = [[s.name, _pct(s.asr["universal"]), _pct(s.asr["random"])]
                   for s in res.singles]
    rows = [[p.attacker, p.method, f"{p.lam:g}", _pct(p.asr["universal"]),
             _pct(p.asr["random"])] for p in res.points]
    lines = [
        "# Experiment 4: inherent triggers", "", header, "",
        f"A universal adversarial patch ({side}×{side} px, bottom right) optimised on the *base* "
        f"model with {res.task}'s head toward class {res.target} (no backdoor anywhere; it is also "
        "BadMerging's trigger), against a random patch of the same size and place. ASR over the "
        f"non-target test images of {res.task}. 'none' is the clean merge.", "",
        "## Unmerged models", "", *_table(["model", "ASR universal", "ASR random"], single_rows),
        "", "## Merges (experiment 3's merged weights)", "",
        *_table(["attacker in the merge", "merge", "λ", "ASR universal", "ASR random"], rows),
    ]
    return "\n".join(lines) + "\n"


def ibvs_markdown(res: IBVSResult, header: str) -> str:
    """Experiment 5: per attacker × merge × defence, ASR and clean accuracy at every λ_d."""
    lams = [lam for lam in res.lambdas if lam > 0]
    names = list(res.recipes)
    defences = [*(f"ibvs:{n}" for n in names), f"before:{names[0]}", f"inside:{names[0]}",
                "random", "oracle"]
    defences = [d for d in defences if d == "random" or any(p.defence == d for p in res.points)]
    rows = []
    for a in res.attackers:
        for method in sorted({p.method for p in res.points}):
            zero = res.point(a["name"], method, "none", 0.0)
            label = "none (TIES trimming alone)" if method == "ties" else "none"
            acc = " / ".join(f"{zero.accuracy[t].rate:.1%}" for t in res.tasks)
            rows.append([a["name"], method, label, "0", rate_cell(zero.asr), acc,
                         f"{zero.mean_accuracy:.1%}"])
            for p in res.points:
                if (p.attacker, p.method, p.defence) == (a["name"], method, "dam"):
                    rows.append([a["name"], method, "DAM (learned mask)", "–", rate_cell(p.asr),
                                 " / ".join(f"{p.accuracy[t].rate:.1%}" for t in res.tasks),
                                 f"{p.mean_accuracy:.1%}"])
            for d in defences:
                for lam in lams:
                    if d == "random":
                        pts = [p for p in res.points if p.attacker == a["name"]
                               and p.method == method and p.defence.startswith("random:")
                               and p.lam == lam]
                        asrs = sorted(p.asr.rate for p in pts)
                        asr = f"{asrs[0]:.1%}–{asrs[-1]:.1%} ({len(pts)} seeds)"
                        accs = " / ".join(
                            f"{statistics.fmean(p.accuracy[t].rate for p in pts):.1%}"
                            for t in res.tasks)
                        mean = statistics.fmean(p.mean_accuracy for p in pts)
                    else:
                        p = res.point(a["name"], method, d, lam)
                        asr, mean = rate_cell(p.asr), p.mean_accuracy
                        accs = " / ".join(f"{p.accuracy[t].rate:.1%}" for t in res.tasks)
                    rows.append([a["name"], method, d, f"{lam:g}", asr, accs, f"{mean:.1%}"])
    chosen = [[c["attacker"], c["method"], c["recipe"], f"{c['lambda_d']:g}"]
              for c in res.chosen]
    lines = [
        "# Experiment 5: IBVS against baselines, after merging", "", header, "",
        f"Attacked task {res.task}; merged with {', '.join(res.tasks[1:])} at merge λ="
        f"{res.merge_lambda:g} (TA weight / TIES scale). Defence `ibvs:<recipe>`: θ_merged − λ_d·v "
        "(v: that recipe's BV_inj focused against the merged task vector); `before:`: the "
        "attacker's task vector cleaned alone (τ_a − λ_d·focus(v, τ_a)), then merged; `inside:`: "
        "−λ_d·focus(v, Σ τ) merged as one more task vector. ASR = the "
        "attack's own trigger → its target on the attacked task (hits/total). Clean accuracy per "
        f"task ({' / '.join(res.tasks)}), each with its own head. `random`: the range over "
        "seeded same-norm (as the focused per_class BV_inj) Gaussian directions, accuracies "
        "averaged. `oracle`: θ_attacker − θ_clean. `DAM`: the TA merge with DAM's learned mask "
        "(Yang et al., ICLR 2025; experiments/dam.py) instead of plain TA.", "",
        *_table(["attacker", "merge", "defence", "λ_d", "ASR", "clean acc per task",
                 "mean clean acc"], rows),
        "", "## λ_d the library's policy picks (largest λ_d within a 2-point clean-accuracy "
        f"drop on {res.task})", "",
        *_table(["attacker", "merge", "recipe", "chosen λ_d"], chosen), "",
    ]
    return "\n".join(lines)
