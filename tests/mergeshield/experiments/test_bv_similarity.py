"""Experiment 2's pure pieces on synthetic vectors: grid, cosine matrix, per-factor summary."""

from __future__ import annotations

import torch

from mergeshield.evaluation import Rate
from mergeshield.experiments.bv_similarity import (
    FACTORS,
    SimilarityConfig,
    cosine_matrix,
    differing,
    grid,
    summarise,
)
from mergeshield.task_vectors import TaskVector


def _tv(seed: int) -> TaskVector:
    g = torch.Generator().manual_seed(seed)
    return TaskVector.from_tensors({"a": torch.randn(4, 3, generator=g),
                                    "b": torch.randn(5, generator=g)})


def test_cosine_matrix_is_symmetric_with_unit_diagonal() -> None:
    v = _tv(0)
    bvs = [v, 2.0 * v, -v, _tv(1), _tv(2)]
    m = cosine_matrix(bvs)
    for i in range(len(bvs)):
        assert m[i][i] == 1.0
        for j in range(len(bvs)):
            assert m[i][j] == m[j][i]
            assert -1.0 - 1e-6 <= m[i][j] <= 1.0 + 1e-6
    assert abs(m[0][1] - 1.0) < 1e-6 and abs(m[0][2] + 1.0) < 1e-6


def test_quick_grid_changes_one_factor_at_a_time() -> None:
    specs = grid(SimilarityConfig(full_grid=False))
    assert len(specs) == 5
    assert sorted(differing(specs[0], s)[0] for s in specs[1:]) == sorted(FACTORS)
    assert all(len(differing(specs[0], s)) == 1 for s in specs[1:])


def test_full_grid_covers_every_combination() -> None:
    specs = grid(SimilarityConfig())
    assert len(specs) == len(set(specs)) == 16


def test_summary_averages_pairs_that_differ_in_one_factor() -> None:
    specs = grid(SimilarityConfig(full_grid=False))
    n = len(specs)
    cos = [[1.0 if i == j else 0.5 for j in range(n)] for i in range(n)]
    transfer = [[Rate(90, 100) if i == j else Rate(10, 100) for j in range(n)] for i in range(n)]
    summary = summarise(specs, cos, transfer)
    assert set(summary) == set(FACTORS)
    for s in summary.values():  # reference ↔ the one changed point, both directions
        assert s["pairs"] == 2
        assert s["mean_cosine"] == 0.5
        assert (s["transfer_hits"], s["transfer_total"]) == (20, 200)
