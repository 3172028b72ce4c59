"""The bench's sums: AUC, cuts and costs over hand-made cases."""

from __future__ import annotations

from typing import Any

from mergeshield.efficacy.metrics import auc, summarise
from mergeshield.efficacy.report import assurance_lines


def _r(hits: int, total: int) -> dict[str, Any]:
    return {"hits": hits, "total": total, "rate": hits / total, "ci95": [0.0, 1.0]}


def test_auc_counts_ties_half() -> None:
    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auc([0.5], [0.5]) == 0.5
    assert auc([], [0.1]) is None


def test_summary_of_one_attack_one_clean_and_a_merge_only_defence() -> None:
    merged = {"clean_merge_asr": _r(10, 100),
              "before": {"asr": _r(50, 100), "accuracy": {"a": _r(80, 100), "b": _r(70, 100)}},
              "defences": {"x": {"asr": _r(30, 100), "accuracy": {"a": _r(79, 100),
                                                                  "b": _r(66, 100)}},
                           "dam": {"asr": _r(10, 100), "accuracy": {"a": _r(80, 100),
                                                                    "b": _r(70, 100)}}}}
    attack = {"attack": {"family": "patch"}, "planted": True, "own_asr": _r(90, 100),
              "clean_accuracy": _r(80, 100), "merge": {"task_arithmetic": merged},
              "defences": {"x": {"asr": _r(9, 100), "accuracy": _r(79, 100), "flagged": True,
                                 "score": 0.7, "seconds": 1.0,
                                 "comeback_finetune_asr": _r(20, 100),
                                 "comeback_merge_asr": {"task_arithmetic": _r(12, 100)}}}}
    clean = {"accuracy": _r(80, 100), "defences": {"x": {"flagged": False, "score": 0.1,
                                                          "accuracy": _r(80, 100)}}}
    s = summarise({"attacks": [attack], "clean": [clean], "defences": ["x"],
                   "merge_only": ["dam"]}, ["task_arithmetic"])
    x = s["defences"]["x"]["overall"]
    assert abs(x["single"]["relative_cut"] - 0.9) < 1e-9
    assert abs(x["single"]["accuracy_cost_points"] - 1.0) < 1e-9
    m = x["merge"]["task_arithmetic"]
    assert abs(m["excess_cut"] - 0.5) < 1e-9  # (50 − 30) / (50 − 10)
    assert abs(m["accuracy_cost_points_worst"] - 4.0) < 1e-9
    assert m["comeback_within_5_points"]["hits"] == 1
    assert x["detection"]["tpr"]["hits"] == 1 and x["detection"]["fpr"]["hits"] == 0
    dam = s["defences"]["dam"]["overall"]
    assert dam["single"] is None and dam["merge"]["task_arithmetic"]["excess_cut"] == 1.0


def test_a_removed_verdict_the_hidden_trigger_contradicts_is_counted_and_written() -> None:
    def attack(asr: int, cleaning: str) -> dict[str, Any]:
        return {"attack": {"family": "patch"}, "planted": True, "own_asr": _r(90, 100),
                "clean_accuracy": _r(80, 100),
                "defences": {"x": {"asr": _r(asr, 100), "accuracy": _r(80, 100),
                                   "flagged": cleaning == "removed", "score": 0.5,
                                   "seconds": 1.0, "comeback_finetune_asr": _r(0, 100),
                                   "comeback_merge_asr": {}, "detail": {"cleaning": cleaning}}}}
    rows = [attack(30, "removed"), attack(9, "removed"), attack(60, "precautionary")]
    s = summarise({"attacks": rows, "clean": [], "defences": ["x"]}, [])
    said = s["defences"]["x"]["overall"]["detection"]["removed_yet_working"]
    assert (said["hits"], said["total"]) == (1, 2)  # 30 % ≥ 20 %; the precautionary one not said
    (line,) = [x for x in assurance_lines(s) if x]
    assert "`x` said `removed` on 2 cleaned checkpoints" in line and "on 1 of them" in line
    old = summarise({"attacks": [attack(30, "removed")], "clean": [], "defences": ["x"]}, [])
    old["defences"]["x"]["overall"]["detection"]["removed_yet_working"] = None  # older runs
    assert assurance_lines(old) == []


def test_a_flag_counts_at_the_target_only_when_a_finding_names_the_attacks_target() -> None:
    def attack(target: int, flagged: bool, targets: list[int]) -> dict[str, Any]:
        return {"attack": {"family": "patch", "target": target}, "planted": True,
                "own_asr": _r(90, 100), "clean_accuracy": _r(80, 100),
                "defences": {"x": {"asr": _r(5, 100), "accuracy": _r(80, 100),
                                   "flagged": flagged, "score": 0.5, "seconds": 1.0,
                                   "comeback_finetune_asr": _r(0, 100), "comeback_merge_asr": {},
                                   "detail": {"cleaning": "removed", "targets": targets}}}}
    rows = [attack(3, True, [3]), attack(3, True, [6]), attack(2, False, [])]
    d = summarise({"attacks": rows, "clean": [], "defences": ["x"]}, [])[
        "defences"]["x"]["overall"]["detection"]
    assert (d["tpr"]["hits"], d["tpr_at_target"]["hits"], d["tpr_at_target"]["total"]) == (2, 1, 3)
    lines = [x for x in assurance_lines(summarise({"attacks": rows, "clean": [],
                                                   "defences": ["x"]}, [])) if x]
    assert "`x` flagged 2 planted attacks, 1 of them at the attack's own target: 1/3" in lines[0]
