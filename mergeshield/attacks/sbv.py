"""Sparse Backdoor Vector (SBV, Pawlak et al. arXiv:2510.08016; method.md "Attacks").

SBV = rescale(top_p(Σ_k BV_k)) with the norm of the mean BV; SBV_SC first zeroes, in every BV_k,
the entries whose sign disagrees with sign(Σ_k BV_k) (TIES election). The attacker uploads
θ_clean + λ·SBV with the largest λ whose clean accuracy stays within 1 point of θ_clean's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from mergeshield import merge_methods
from mergeshield.errors import ConfigError
from mergeshield.task_vectors import TaskVector, top_k

KEEP = 0.2  # p: fraction of entries kept, method.md's default (global ranking)
BUDGET = 0.01  # clean-accuracy drop allowed when choosing λ: 1 point, as a fraction
LAMBDA_GRID = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)  # λ_SBV candidates


def sbv(bvs: Sequence[TaskVector], p: float = KEEP, sign_consistent: bool = False
        ) -> TaskVector:
    """Merge same-target BVs into one sparse vector (SBV, or SBV_SC when ``sign_consistent``)."""
    if not bvs:
        raise ConfigError("SBV needs at least one backdoor vector")
    vectors = [bv.materialize() for bv in bvs]  # each is read several times below
    mean_norm = (_sum(vectors) * (1.0 / len(vectors))).norm()  # ‖mean BV‖, before any election
    if sign_consistent:
        vectors = merge_methods.sign_consistent(vectors)
    sparse = top_k(_sum(vectors), p, scope="global").materialize()
    norm = sparse.norm()
    if norm == 0.0 or not math.isfinite(norm):
        raise ConfigError("the backdoor vectors sum to zero: there is nothing to sparsify")
    return (sparse * (mean_norm / norm)).materialize()


def _sum(vectors: Sequence[TaskVector]) -> TaskVector:
    total = vectors[0]
    for v in vectors[1:]:
        total = total + v
    return total


@dataclass(frozen=True)
class LambdaChoice:
    lam: float  # the chosen λ_SBV (0.0 when no grid value keeps accuracy within the budget)
    reference: float  # accuracy of θ_clean itself
    curve: tuple[tuple[float, float], ...]  # (λ, accuracy) for every grid value, in grid order


def choose_lambda_sbv(
    theta_clean: Mapping[str, Tensor],
    vector: TaskVector,
    evaluate: Callable[[dict[str, Tensor]], float],
    *,
    grid: Sequence[float] = LAMBDA_GRID,
    budget: float = BUDGET,
) -> LambdaChoice:
    """The largest λ on ``grid`` with evaluate(θ_clean + λ·SBV) ≥ evaluate(θ_clean) − budget.

    ``evaluate`` maps backbone weights to clean accuracy in [0, 1] (so ``budget=0.01`` is one
    point); every grid value is evaluated so the whole curve can be reported.
    """
    if budget < 0:
        raise ConfigError(f"budget must be ≥ 0, got {budget}")
    reference = float(evaluate(dict(theta_clean)))
    curve = tuple((float(lam), float(evaluate(vector.apply_to(theta_clean, lam))))
                  for lam in grid)
    ok = [lam for lam, acc in curve if acc >= reference - budget]
    return LambdaChoice(max(ok, default=0.0), reference, curve)
