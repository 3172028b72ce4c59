"""task_vectors.py: the algebra by its properties, measurements and sparsification by hand, and
laziness (the merge methods: test_merge_methods.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from mergeshield.errors import ConfigError, IncompatibleModelsError
from mergeshield.merge_methods import task_arithmetic, ties
from mergeshield.task_vectors import TaskVector, cosine, per_tensor_cosine, top_k
from tests.support.tiny import CountingMapping, assert_tv_close, assert_tv_equal, tv_of

NAMES = ("embed", "block.0.weight", "block.0.bias", "norm")
FAST = settings(max_examples=25, deadline=None)


@st.composite
def models(draw: st.DrawFn, n: int = 2) -> list[dict[str, Tensor]]:
    """``n`` state dicts over the same small random set of names and shapes (0-d included)."""
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    shapes = {k: draw(st.lists(st.integers(1, 4), max_size=2)) for k in names}
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return [{k: torch.randn(shapes[k], generator=gen) * 3 for k in names} for _ in range(n)]


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
