"""Experiment 6's pure pieces: ROC AUC, verdict rates, τ kurtosis, the population plan."""

from __future__ import annotations

import random

import pytest
import torch
from sklearn.metrics import roc_auc_score

from mergeshield.experiments.detection import (
    SCORES,
    TASKS,
    kurtosis,
    population,
    rates,
    roc_auc,
    to_markdown,
)
from mergeshield.task_vectors import TaskVector
from tests.support.zoo import Zoo


def test_auc_perfect_reversed_and_ties() -> None:
    labels = [False, False, True, True]
    assert roc_auc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], labels) == 0.5
    # one tie across the classes counts ½: pairs (neg, pos) = 4, wins 3.5
    assert roc_auc([0.1, 0.5, 0.5, 0.9], labels) == pytest.approx(3.5 / 4)


def test_auc_matches_sklearn_on_random_data_with_ties() -> None:
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randrange(4, 60)
        labels = [rng.random() < 0.4 for _ in range(n)]
        labels[0], labels[1] = True, False
        scores = [float(rng.randrange(8)) for _ in range(n)]  # many ties
        assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError):
        roc_auc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError):
        roc_auc([0.1], [True, False])


def test_rates_counts_tpr_and_fpr() -> None:
    predicted = [True, True, False, False, True, False]
    labels = [True, True, True, False, False, False]
    r = rates(predicted, labels)
    assert (r["tp"], r["fn"], r["fp"], r["tn"]) == (2, 1, 1, 2)
    assert r["tpr"] == pytest.approx(2 / 3) and r["fpr"] == pytest.approx(1 / 3)
    assert rates([False], [True]) == {"tp": 0, "fp": 0, "fn": 1, "tn": 0, "tpr": 0.0, "fpr": 0.0}


def test_kurtosis_of_gaussian_and_heavy_tails() -> None:
    g = torch.Generator().manual_seed(0)
    normal = TaskVector.from_tensors({"a": torch.randn(200_000, generator=g)})
    assert abs(kurtosis(normal)) < 0.1
    sparse = torch.zeros(10_000)
    sparse[:10] = 5.0
    assert kurtosis(TaskVector.from_tensors({"a": sparse, "b": torch.zeros(3)})) > 100
    assert kurtosis(TaskVector.from_tensors({"a": torch.zeros(5)})) == 0.0


def test_population_varies_triggers_targets_and_seeds() -> None:
    pop = population(20, 20, seed=0)
    clean = [p for p in pop if p["kind"] == "clean"]
    bd = [p for p in pop if p["kind"] == "backdoored"]
    assert len(clean) == len(bd) == 20
    assert all(p["trigger"] is None and p["target"] is None for p in clean)
    assert {p["trigger"]["kind"] for p in bd} == {"patch", "blended"}
    assert len({(p["trigger"]["kind"], p["trigger"].get("location")) for p in bd}) >= 6
    assert len({p["target"] for p in bd}) >= 4
    assert len({p["seed"] for p in pop}) == 40 and {p["task"] for p in pop} == set(TASKS)
    assert population(20, 20, seed=0) == pop


def test_population_tasks_exist_in_the_zoo(zoo: Zoo) -> None:
    names = {d["name"] for d in zoo.manifest["datasets"]}
    assert set(TASKS) <= names


def test_to_markdown_lists_every_score_and_model() -> None:
    row = {"id": "clean-0", "kind": "clean", "task": "mnist", "seed": 0, "trigger": None,
           "trigger_id": None, "target": None, "true_asr": None, "clean_accuracy": 0.9,
           "scores": dict.fromkeys(SCORES, 0.1), "verdict": "no_backdoor_found", "rules": []}
    result = {"config": {"min_asr_gap": 0.2}, "models": [row],
              "auc": dict.fromkeys(SCORES, 0.5),
              "verdict_rates": rates([False], [False])}
    md = to_markdown(result)
    assert all(f"| {s} |" in md for s in SCORES) and "| clean-0 | mnist |" in md
    assert "FPR 0.00 (0/1)" in md
