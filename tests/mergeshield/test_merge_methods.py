"""merge_methods.py: task arithmetic, TIES (the paper's and mergekit's) and DARE by hand, and
DARE's seeded drops by their properties."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mergeshield.errors import ConfigError
from mergeshield.merge_methods import (
    dare_drop,
    dare_generator,
    dare_mergekit,
    elect_sign,
    sign_consistent,
    task_arithmetic,
    ties,
    ties_mergekit,
)
from mergeshield.task_vectors import TaskVector
from tests.support.tiny import assert_tv_close, assert_tv_equal, tv_of


def test_elect_sign_and_sign_consistent_by_hand() -> None:
    v1 = tv_of({"w": [1.0, -1.0, 2.0, 0.0]})
    v2 = tv_of({"w": [-2.0, 3.0, 1.0, 0.0]})
    assert elect_sign([v1, v2])["w"].tolist() == [-1.0, 1.0, 1.0, 0.0]
    c1, c2 = sign_consistent([v1, v2])
    assert c1["w"].tolist() == [0.0, 0.0, 2.0, 0.0]
    assert c2["w"].tolist() == [-2.0, 3.0, 1.0, 0.0]


def test_task_arithmetic_weights() -> None:
    a, b = tv_of({"w": [1.0, 2.0]}), tv_of({"w": [10.0, -10.0]})
    assert task_arithmetic([a, b], 0.5)["w"].tolist() == [5.5, -4.0]
    assert task_arithmetic([a, b], [1.0, 0.1])["w"].tolist() == pytest.approx([2.0, 1.0])
    with pytest.raises(ConfigError):
        task_arithmetic([a, b], [1.0])
    with pytest.raises(ConfigError):
        task_arithmetic([])


def test_ties_on_a_hand_computed_example() -> None:
    # each vector keeps its top 2 of 4 entries, ranked across both of its tensors
    v1 = tv_of({"w": [4.0, -1.0], "b": [2.0, 0.5]})  # → [4, 0 | 2, 0]
    v2 = tv_of({"w": [3.0, 2.0], "b": [1.0, -4.0]})  # → [3, 0 | 0, -4]
    v3 = tv_of({"w": [1.0, -2.0], "b": [-5.0, 3.0]})  # → [0, 0 | -5, 3]
    # elected signs of the sums [7, 0 | -3, -1]: [+, 0 | -, -]; disjoint means of agreeing entries
    merged = ties([v1, v2, v3], keep=0.5, scale=0.5)
    assert merged["w"].tolist() == [0.5 * 3.5, 0.0]
    assert merged["b"].tolist() == [0.5 * -5.0, 0.5 * -4.0]
    with pytest.raises(ConfigError):
        ties([])


def test_mergekit_ties_on_a_hand_computed_example() -> None:
    """mergekit's form: each tensor trimmed on its own to int(density·n) entries, weighted, signs
    elected on the weighted sum (+ on a tie), the agreeing entries summed and divided by the
    agreeing weights (normalize) or not."""
    v1 = tv_of({"w": [4.0, -1.0, 2.0, 0.5], "b": [0.1, 0.2]})  # d 0.5 → [4, 0, 2, 0 | 0, .2]
    v2 = tv_of({"w": [3.0, 2.0, 1.0, -4.0], "b": [0.3, -0.1]})  # d 0.5 → [3, 0, 0, -4 | .3, 0]
    v3 = tv_of({"w": [1.0, -2.0, -5.0, 3.0], "b": [1.0, 0.9]})  # d 0.25 → [0, 0, -5, 0 | 1, 0]
    # weighted (1, 0.5, 1): sums [5.5, 0, -3, -2 | 1.15, 0.2] → signs [+, +, -, - | +, +]
    merged = ties_mergekit([v1, v2, v3], [0.5, 0.5, 0.25], [1.0, 0.5, 1.0])
    assert merged["w"].tolist() == pytest.approx([5.5 / 1.5, 0.0, -5.0, -4.0])
    assert merged["b"].tolist() == pytest.approx([1.15 / 1.5, 0.2])  # "b" kept its own top entry
    summed = ties_mergekit([v1, v2, v3], [0.5, 0.5, 0.25], [1.0, 0.5, 1.0], normalize=False)
    assert summed["w"].tolist() == pytest.approx([5.5, 0.0, -5.0, -2.0])
    # one weight for all under normalize cancels out, as in mergekit
    same = ties_mergekit([v1, v2], [0.5, 0.5], [0.3, 0.3])["w"]
    assert same.tolist() == pytest.approx(ties_mergekit([v1, v2], [0.5, 0.5], [1.0, 1.0])["w"]
                                          .tolist())
    with pytest.raises(ConfigError):
        ties_mergekit([v1, v2], [0.5], [1.0, 1.0])
    with pytest.raises(ConfigError):
        ties_mergekit([v1], [0.0], [1.0])


# -- DARE (mergekit's dare_ties / dare_linear, MergeShield's seeded draws) ----------------------
def random_tvs(n: int, seed: int, sizes: dict[str, int]) -> list[TaskVector]:
    """``n`` task vectors with no zero entry (a zero is never "kept"), one tensor per size."""
    gen = torch.Generator().manual_seed(seed)
    return [TaskVector.from_tensors({k: torch.randn(m, generator=gen) + 0.0 for k, m in
                                     sizes.items()}) for _ in range(n)]


def test_dare_is_drop_and_l1_rescale_then_ties_without_trim() -> None:
    """DARE-TIES by its definition: each model's drop (its own generator), the kept entries
    scaled to the tensor's L1 norm, then mergekit's TIES at density 1 (no trim)."""
    vs = random_tvs(3, 0, {"w": 300, "b": 7})
    weights, densities = [1.0, 0.5, 0.8], [0.5, 0.3, 0.9]
    dropped = []
    for i, (v, d) in enumerate(zip(vs, densities, strict=True)):
        def by_hand(k: str, t: Tensor, i: int = i, d: float = d) -> Tensor:
            kept = dare_drop(t, d, dare_generator(7, k, str(i)))
            return kept * (t.abs().sum() / kept.abs().sum())
        dropped.append(v.map(by_hand))
    for normalize in (False, True):
        got = dare_mergekit(vs, densities, weights, consensus=True, normalize=normalize, seed=7)
        want = ties_mergekit(dropped, [1.0] * 3, weights, normalize=normalize)
        assert_tv_equal(got, want)
    linear = dare_mergekit(vs, densities, weights, consensus=False, seed=7)
    assert_tv_close(linear, task_arithmetic(dropped, weights))


def test_dare_at_density_one_is_ties_without_trim_or_task_arithmetic() -> None:
    vs = random_tvs(3, 1, {"w": 50, "b": 4})
    w = [1.0, 0.4, 0.7]
    for normalize in (False, True):
        assert_tv_equal(dare_mergekit(vs, [1.0] * 3, w, consensus=True, normalize=normalize,
                                      seed=3),
                        ties_mergekit(vs, [1.0] * 3, w, normalize=normalize))
    assert_tv_close(dare_mergekit(vs, [1.0] * 3, w, consensus=False), task_arithmetic(vs, w))
    # normalize: over the summed weights, as mergekit's dare_linear divides
    assert_tv_close(dare_mergekit(vs, [1.0] * 3, w, consensus=False, normalize=True),
                    task_arithmetic(vs, [x / sum(w) for x in w]))


def test_dare_is_determined_by_its_seed() -> None:
    vs = random_tvs(2, 2, {"w": 2000})
    merge = [dare_mergekit(vs, [0.5, 0.5], [1.0, 1.0], consensus=True, seed=s)["w"]
             for s in (0, 0, 1)]
    assert torch.equal(merge[0], merge[1])
    assert not torch.equal(merge[0], merge[2])


def test_a_tensors_drop_depends_on_neither_tensor_order_nor_the_other_models() -> None:
    a, b = random_tvs(2, 3, {"x": 500, "y": 500, "z": 64})
    forward = dare_mergekit([a, b], [0.4, 0.6], [1.0, 1.0], consensus=True, seed=5,
                            draws=["org/a", "org/b"])
    order = ["z", "y", "x"]
    backward = dare_mergekit([a.restrict(order), b.restrict(order)], [0.4, 0.6], [1.0, 1.0],
                             consensus=True, seed=5, draws=["org/a", "org/b"])
    assert list(backward) == order
    for k in order:
        assert torch.equal(forward[k], backward[k]), k
    # model org/a drops the same entries merged alone, beside org/b, or after it
    alone = dare_mergekit([a], [0.4], [1.0], consensus=False, seed=5, draws=["org/a"])
    beside = dare_mergekit([b, a], [0.6, 0.4], [0.0, 1.0], consensus=False, seed=5,
                           draws=["org/b", "org/a"])
    assert_tv_equal(alone, beside)
    other_name = dare_mergekit([a], [0.4], [1.0], consensus=False, seed=5, draws=["org/c"])
    assert not torch.equal(alone["x"], other_name["x"])


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keeps_about_density_of_the_entries_rescaled_to_the_l1_norm(density: float) -> None:
    n = 20_000
    for seed in range(4):  # a claim over several seeds, each within 5 sigma of density
        (v,) = random_tvs(1, seed, {"w": n})
        t = v["w"]
        kept = dare_mergekit([v], [density], [1.0], consensus=False, seed=seed)["w"]
        mask = kept != 0
        assert abs(float(mask.float().mean()) - density) < 5 * math.sqrt(
            density * (1 - density) / n)
        factor = t.abs().sum() / t[mask].abs().sum()  # mergekit 0.1.5: RescaleNorm.l1
        torch.testing.assert_close(kept[mask], t[mask] * factor)
        torch.testing.assert_close(kept.abs().sum(), t.abs().sum())
        # about 1/density, not exactly: 5 sigma of the kept count and of the kept |N(0, 1)|s
        sigma = math.sqrt((1 - density + (math.pi / 2 - 1)) / (density * n))
        assert abs(float(factor) * density - 1) < 5 * sigma
        raw = dare_mergekit([v], [density], [1.0], consensus=False, rescale=False, seed=seed)
        assert torch.equal(raw["w"], t * mask)  # rescale off: kept entries as they were


def test_bad_dare_arguments_are_refused() -> None:
    vs = random_tvs(2, 4, {"w": 8})
    for densities in ([0.0, 0.5], [0.5, 1.5], [0.5]):
        with pytest.raises(ConfigError):
            dare_mergekit(vs, densities, [1.0, 1.0], consensus=True)
    with pytest.raises(ConfigError):
        dare_mergekit(vs, [0.5, 0.5], [1.0, 1.0], consensus=True, draws=["a"])
    with pytest.raises(ConfigError):
        dare_mergekit([], [], [], consensus=False)
