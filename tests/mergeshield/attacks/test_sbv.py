"""attacks/sbv.py: sparsity p, norm of the mean BV, sign election, and the 1-point λ budget."""

from __future__ import annotations

import pytest
import torch

from mergeshield.attacks.sbv import BUDGET, KEEP, choose_lambda_sbv, sbv
from mergeshield.errors import ConfigError
from mergeshield.task_vectors import TaskVector


def random_bv(seed: int, shift: float = 0.0) -> TaskVector:
    g = torch.Generator().manual_seed(seed)
    return TaskVector.from_tensors({"a.weight": torch.randn(20, 10, generator=g) + shift,
                                    "b.bias": torch.randn(50, generator=g) + shift})


def flat(tv: TaskVector) -> torch.Tensor:
    return torch.cat([tv[k].flatten() for k in tv])


BVS = [random_bv(s, shift=0.3) for s in range(3)]
N = 250  # entries per vector


def test_defaults_follow_method_md() -> None:
    assert KEEP == 0.2 and BUDGET == 0.01


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("sc", [False, True])
def test_keeps_p_of_entries_and_the_mean_bv_norm(p: float, sc: bool) -> None:
    out = sbv(BVS, p=p, sign_consistent=sc)
    assert int((flat(out) != 0).sum()) == round(p * N)
    mean = (BVS[0] + BVS[1] + BVS[2]) * (1 / 3)
    assert out.norm() == pytest.approx(mean.norm(), rel=1e-5)


def test_kept_entries_are_the_largest_of_the_sum() -> None:
    out = flat(sbv(BVS, p=0.2))
    total = flat(BVS[0] + BVS[1] + BVS[2])
    kept = out != 0
    assert float(total[kept].abs().min()) >= float(total[~kept].abs().max())
    ratio = out[kept] / total[kept]  # one common positive rescale
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio)) and float(ratio[0]) > 0


def test_sign_consistent_keeps_only_elected_signs() -> None:
    bvs = [random_bv(s) for s in range(4)]  # no shared shift: many sign conflicts
    elected = torch.sign(flat(bvs[0] + bvs[1] + bvs[2] + bvs[3]))
    disagreeing = [torch.sign(flat(b)) == -elected for b in bvs]
    expected = flat(bvs[0] + bvs[1] + bvs[2] + bvs[3]) - sum(
        (flat(b) * d for b, d in zip(bvs, disagreeing, strict=True)), torch.zeros(N))
    out = flat(sbv(bvs, p=1.0, sign_consistent=True))
    nz = out != 0
    assert bool((torch.sign(out[nz]) == elected[nz]).all())
    scale = float(out.norm() / expected.norm())
    assert torch.allclose(out, scale * expected, atol=1e-6)  # Σ of the agreeing entries only
    assert not torch.allclose(out, flat(sbv(bvs, p=1.0)))  # election changed something


def test_one_bv_at_p_1_is_that_bv() -> None:
    bv = BVS[0]
    for sc in (False, True):
        out = sbv([bv], p=1.0, sign_consistent=sc)
        assert torch.allclose(flat(out), flat(bv), atol=1e-6)


def test_inputs_are_not_modified_and_errors_are_clear() -> None:
    before = flat(BVS[0]).clone()
    sbv(BVS, p=0.2, sign_consistent=True)
    assert torch.equal(flat(BVS[0]), before)
    with pytest.raises(ConfigError, match="at least one"):
        sbv([])
    with pytest.raises(ConfigError, match="zero"):
        sbv([BVS[0] * 0.0])
    with pytest.raises(ConfigError, match="keep"):
        sbv(BVS, p=0.0)


# -- λ_SBV ---------------------------------------------------------------------------------------
THETA = {"a.weight": torch.zeros(20, 10), "b.bias": torch.zeros(50), "head": torch.ones(3)}
DIR = TaskVector.from_tensors({"a.weight": torch.ones(20, 10), "b.bias": torch.ones(50)})


def acc_falls_with_lambda(theta: dict[str, torch.Tensor]) -> float:
    """Synthetic clean accuracy: 0.90 at λ=0, −0.004 per unit of λ (read back from the weights)."""
    lam = float(theta["b.bias"][0])
    assert torch.equal(theta["head"], torch.ones(3))  # other tensors pass through
    return 0.90 - 0.004 * lam


def test_choose_lambda_takes_the_largest_within_one_point() -> None:
    choice = choose_lambda_sbv(THETA, DIR, acc_falls_with_lambda, grid=[0.5, 1, 2, 2.5, 3, 4])
    assert choice.lam == 2.5  # 0.90 − 0.01 = 0.89 ↔ λ ≤ 2.5
    assert choice.reference == pytest.approx(0.90)
    assert [lam for lam, _ in choice.curve] == [0.5, 1, 2, 2.5, 3, 4]
    assert all(acc >= 0.89 - 1e-9 for lam, acc in choice.curve if lam <= choice.lam)


def test_choose_lambda_with_no_safe_value_is_zero_and_budget_is_a_parameter() -> None:
    def harsh(theta: dict[str, torch.Tensor]) -> float:
        return 0.9 - 0.1 * float(theta["b.bias"][0])

    assert choose_lambda_sbv(THETA, DIR, harsh, grid=[1.0, 2.0]).lam == 0.0
    assert choose_lambda_sbv(THETA, DIR, harsh, grid=[1.0, 2.0], budget=0.15).lam == 1.0
    with pytest.raises(ConfigError, match="budget"):
        choose_lambda_sbv(THETA, DIR, harsh, budget=-1)
    assert torch.equal(THETA["b.bias"], torch.zeros(50))  # θ_clean untouched
