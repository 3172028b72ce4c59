"""task_vectors.py: the algebra by its properties, measurements and merges by hand, and laziness."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from mergeshield.errors import ConfigError, IncompatibleModelsError
from mergeshield.task_vectors import (
    TaskVector,
    cosine,
    dare_drop,
    dare_generator,
    dare_mergekit,
    elect_sign,
    per_tensor_cosine,
    sign_consistent,
    task_arithmetic,
    ties,
    ties_mergekit,
    top_k,
)
from tests.support.tiny import CountingMapping

NAMES = ("embed", "block.0.weight", "block.0.bias", "norm")
FAST = settings(max_examples=25, deadline=None)


@st.composite
def models(draw: st.DrawFn, n: int = 2) -> list[dict[str, Tensor]]:
    """``n`` state dicts over the same small random set of names and shapes (0-d included)."""
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    shapes = {k: draw(st.lists(st.integers(1, 4), max_size=2)) for k in names}
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return [{k: torch.randn(shapes[k], generator=gen) * 3 for k in names} for _ in range(n)]


def tv_of(values: dict[str, list[float]]) -> TaskVector:
    return TaskVector.from_tensors({k: torch.tensor(v) for k, v in values.items()})


def assert_tv_close(a: TaskVector, b: TaskVector, **tol: float) -> None:
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)


def assert_tv_equal(a: TaskVector, b: TaskVector) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- algebra by properties -------------------------------------------------------------------------
@FAST
@given(models())
def test_between_then_apply_gives_back_the_finetuned_model(pair: list[dict[str, Tensor]]) -> None:
    base, ft = pair
    out = TaskVector.between(base, ft).apply_to(base)
    assert out.keys() == ft.keys()
    for k in ft:
        torch.testing.assert_close(out[k], ft[k])


@FAST
@given(models())
def test_double_negation_is_identity(pair: list[dict[str, Tensor]]) -> None:
    tv = TaskVector.between(*pair)
    negated = -tv
    assert_tv_equal(-negated, tv)


@FAST
@given(models(n=4), st.floats(-3, 3, allow_nan=False))
def test_scaling_distributes_over_addition(ms: list[dict[str, Tensor]], s: float) -> None:
    a, b = TaskVector.between(ms[0], ms[1]), TaskVector.between(ms[2], ms[3])
    assert_tv_close((a + b) * s, a * s + b * s, atol=1e-5, rtol=1e-5)
    assert_tv_close(s * a, a * s)
    assert_tv_close(a - b, a + (-1.0) * b)


@FAST
@given(models())
def test_applying_with_scale_zero_is_identity(pair: list[dict[str, Tensor]]) -> None:
    base, ft = pair
    out = TaskVector.between(base, ft).apply_to(base, 0.0)
    assert all(torch.equal(out[k], base[k]) for k in base)


@FAST
@given(models())
def test_cosine_of_a_vector_with_its_multiples(pair: list[dict[str, Tensor]]) -> None:
    tv = TaskVector.between(*pair)
    assume(tv.norm() > 1e-3)
    assert cosine(tv, 2 * tv) == pytest.approx(1.0, abs=1e-5)
    assert cosine(tv, -tv) == pytest.approx(-1.0, abs=1e-5)
    assert cosine(tv, 0 * tv) == 0.0  # a zero vector has no direction


@FAST
@given(models(n=3), st.floats(-2, 2, allow_nan=False))
def test_no_operation_mutates_the_callers_tensors(ms: list[dict[str, Tensor]], s: float) -> None:
    snapshot = [{k: v.clone() for k, v in m.items()} for m in ms]
    a, b = TaskVector.between(ms[0], ms[1]), TaskVector.from_tensors(ms[2])
    for tv in (a + b, a - b, -a, a * s, sum([a, b]), a.map(lambda _k, t: t * 2),
               a.zip_with(b, torch.mul), top_k(a, 0.5), ties([a, b], keep=0.5)):
        _ = [tv[k] for k in tv]
    a.apply_to(ms[0], s)
    dict(a.apply_lazily(ms[0], s))
    cosine(a, b)
    for m, before in zip(ms, snapshot, strict=True):
        assert all(torch.equal(m[k], before[k]) for k in m)


def test_from_tensors_copies_the_input() -> None:
    src = {"w": torch.ones(3)}
    tv = TaskVector.from_tensors(src)
    src["w"].add_(5)
    assert torch.equal(tv["w"], torch.ones(3))


def test_sum_equals_chained_addition() -> None:
    vs = [tv_of({"w": [float(i), -1.0], "b": [2.0 * i]}) for i in range(1, 4)]
    total = sum(vs)
    assert isinstance(total, TaskVector)
    assert_tv_close(total, vs[0] + vs[1] + vs[2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_apply_keeps_the_dtype_of_each_base_tensor(dtype: torch.dtype) -> None:
    base = {"w": torch.tensor([1.0, 2.0, -4.0]).to(dtype), "steps": torch.tensor([7])}
    tv = tv_of({"w": [0.5, -0.25, 1.0]})
    out = tv.apply_to(base, 2.0)
    assert out["w"].dtype == dtype
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 1.5, -2.0]).to(dtype))
    assert torch.equal(out["steps"], base["steps"])  # tensors outside the vector pass through
    assert list(out) == list(base)
    lazily = list(tv.apply_lazily(base, 2.0))
    assert [k for k, _ in lazily] == ["w", "steps"]


def test_restrict_map_zip_with_and_materialize() -> None:
    tv = tv_of({"a": [1.0, -2.0], "b": [3.0], "c": [0.0, 4.0]})
    sub = tv.restrict(["c", "a"])
    assert list(sub) == ["c", "a"] and len(sub) == 2
    assert torch.equal(sub["a"], tv["a"])
    with pytest.raises(KeyError):
        sub["b"]
    doubled = tv.map(lambda _k, t: 2 * t)
    assert torch.equal(doubled["a"], torch.tensor([2.0, -4.0]))
    prod = tv.zip_with(doubled, torch.mul)
    assert torch.equal(prod["c"], torch.tensor([0.0, 32.0]))
    mat = prod.materialize()
    assert_tv_equal(mat, prod)
    assert repr(mat) == "TaskVector(3 tensors)"


def test_norms_norm_and_numel_by_hand() -> None:
    tv = tv_of({"a": [3.0, 4.0], "b": [12.0], "z": [0.0, 0.0, 0.0]})
    assert tv.norms() == {"a": 5.0, "b": 12.0, "z": 0.0}
    assert tv.norm() == pytest.approx(13.0)
    assert tv.numel() == 6


def test_per_tensor_cosine_by_hand() -> None:
    a = tv_of({"x": [1.0, 0.0], "y": [1.0, 1.0], "z": [0.0, 0.0]})
    b = tv_of({"x": [0.0, 2.0], "y": [-3.0, -3.0], "z": [1.0, 0.0]})
    got = per_tensor_cosine(a, b)
    assert got == pytest.approx({"x": 0.0, "y": -1.0, "z": 0.0})
    # global: dot = -6, |a|² = 3, |b|² = 4 + 18 + 1
    assert cosine(a, b) == pytest.approx(-6 / math.sqrt(3 * 23))


# -- errors ---------------------------------------------------------------------------------------
def test_missing_keys_raise_incompatible_models() -> None:
    a = tv_of({"w": [1.0], "b": [2.0]})
    other = tv_of({"w": [1.0]})
    with pytest.raises(IncompatibleModelsError) as info:
        TaskVector.between({"w": torch.zeros(1)}, {"w": torch.ones(1), "b": torch.ones(1)})
    assert info.value.details == {"missing": ["b"]}
    with pytest.raises(IncompatibleModelsError):
        _ = a + other
    with pytest.raises(IncompatibleModelsError):
        a.apply_to({"w": torch.zeros(1)})
    with pytest.raises(IncompatibleModelsError):
        a.restrict(["w", "nope"])
    with pytest.raises(IncompatibleModelsError):
        task_arithmetic([a, other])


def test_between_checks_explicit_keys_against_the_finetuned_model_too() -> None:
    base = {"w": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(IncompatibleModelsError):
        TaskVector.between(base, {"w": torch.ones(2)}, keys=["w", "b"])


def test_cosine_refuses_vectors_over_different_tensors() -> None:
    small, big = tv_of({"w": [1.0, 2.0]}), tv_of({"w": [1.0, 2.0], "b": [5.0]})
    with pytest.raises(IncompatibleModelsError):
        cosine(small, big)
    with pytest.raises(IncompatibleModelsError):
        cosine(big, small)


# -- sparsification, sign election, merges ---------------------------------------------------------
def test_top_k_global_and_per_tensor() -> None:
    tv = tv_of({"a": [5.0, -1.0, 0.5], "b": [-4.0, 2.0, 0.1]})
    glob = top_k(tv, 0.5)  # 3 of 6 entries, ranked over both tensors
    assert glob["a"].tolist() == [5.0, 0.0, 0.0]
    assert glob["b"].tolist() == [-4.0, 2.0, 0.0]
    per = top_k(tv, 1 / 3, scope="tensor")  # 1 of 3 entries in each tensor
    assert per["a"].tolist() == [5.0, 0.0, 0.0]
    assert per["b"].tolist() == [-4.0, 0.0, 0.0]


def test_top_k_keep_one_is_identity() -> None:
    tv = tv_of({"a": [5.0, -1.0, 0.5]})
    assert_tv_equal(top_k(tv, 1.0), tv)
    assert_tv_equal(top_k(tv, 1.0, scope="tensor"), tv)


@pytest.mark.parametrize("keep", [0.0, -0.2, 1.5, float("nan")])
def test_top_k_rejects_invalid_keep(keep: float) -> None:
    with pytest.raises(ConfigError):
        top_k(tv_of({"a": [1.0]}), keep)


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


# -- laziness -------------------------------------------------------------------------------------
@pytest.fixture
def counted() -> tuple[CountingMapping, CountingMapping, TaskVector]:
    base = CountingMapping({"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)})
    ft = CountingMapping({"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(1)})
    return base, ft, TaskVector.between(base, ft)


def test_reading_one_tensor_reads_only_that_tensor(
    counted: tuple[CountingMapping, CountingMapping, TaskVector],
) -> None:
    base, ft, tv = counted
    assert base.reads == ft.reads == []  # building reads nothing
    chained = (-(2.0 * tv)).map(lambda _k, t: t + 1)
    assert base.reads == ft.reads == []
    assert chained["b"].tolist() == [-1.0, -1.0, -1.0]
    assert base.reads == ft.reads == ["b"]


def test_apply_lazily_reads_one_tensor_per_step(
    counted: tuple[CountingMapping, CountingMapping, TaskVector],
) -> None:
    base, ft, tv = counted
    stream = tv.apply_lazily({"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)})
    assert ft.reads == []
    name, _ = next(stream)
    assert (name, ft.reads) == ("a", ["a"])


@pytest.mark.parametrize("op", ["add", "sub", "zip_with", "restrict"])
def test_binary_operations_read_nothing_until_asked(
    counted: tuple[CountingMapping, CountingMapping, TaskVector], op: str,
) -> None:
    base, ft, tv = counted
    other = TaskVector.between(base, ft)
    if op == "add":
        _ = tv + other
    elif op == "sub":
        _ = tv - other
    elif op == "zip_with":
        tv.zip_with(other, torch.mul)
    else:
        tv.restrict(["a"])
    assert base.reads == ft.reads == []
