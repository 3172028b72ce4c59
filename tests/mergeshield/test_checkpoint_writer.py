"""checkpoint_writer.py: the streamed arithmetic writes what the tensor-by-tensor code wrote.

Small random checkpoints in float32, bfloat16 and float16, sharded and not; chunks made tiny (and
not a multiple of any vector width) so every tensor spans many of them and the pipeline's
ordering, tails and shard boundaries are all exercised. The reference is the arithmetic as it
was written before the engine: whole tensors, float32, cast back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from mergeshield import cancellation, checkpoint_writer
from mergeshield import checkpoints as ck
from mergeshield.backdoor_vectors import file_specs, from_checkpoints
from mergeshield.errors import ConfigError, InvalidWeightsError
from mergeshield.ibvs import sanitise
from mergeshield.merging import MergeConfig, merged_tensors
from mergeshield.task_vectors import TaskVector

LAM = 0.75
SHAPES = {"embed": (97, 61), "norm": (61,), "attn": (61, 61), "mlp": (150, 61), "step": (3,)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint_writer, "CHUNK_ELEMENTS", 999)
    monkeypatch.setattr(checkpoint_writer, "AHEAD_BYTES", 5 * 4 * 999)


def _models(dtype: torch.dtype, seed: int) -> dict[str, dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)

    def noise(shape: tuple[int, ...], scale: float) -> Tensor:
        return scale * torch.randn(shape, generator=gen)

    base = {k: noise(s, 0.02).to(dtype) for k, s in SHAPES.items() if k != "step"}
    base["step"] = torch.arange(3)  # an integer buffer passes through untouched
    suspect = {k: (v.float() + noise(v.shape, 1e-3)).to(dtype) if v.is_floating_point() else v
               for k, v in base.items()}
    bv = {k: noise(v.shape, 1e-3).to(dtype) for k, v in base.items() if v.is_floating_point()}
    return {"base": base, "suspect": suspect, "bv": bv}


@pytest.fixture(params=[(d, shard) for d in DTYPES for shard in (False, True)],
                ids=lambda p: f"{str(p[0]).removeprefix('torch.')}-{'sharded' if p[1] else 'one'}")
def folders(request: pytest.FixtureRequest, tmp_path: Path
            ) -> tuple[dict[str, Path], dict[str, dict[str, Tensor]], int]:
    dtype, sharded = request.param
    models = _models(dtype, seed=DTYPES.index(dtype))
    shard = 30_000 if sharded else 5 * 2**30
    paths = {}
    for name, tensors in models.items():
        ck.save_checkpoint(tmp_path / name, tensors, max_shard_bytes=shard)
        paths[name] = tmp_path / name
    if sharded:
        assert (tmp_path / "base" / "model.safetensors.index.json").is_file()
    return paths, models, shard


def _open(folder: Path) -> ck.Checkpoint:
    return ck.open_checkpoint(ck.resolve(str(folder)))


def _written(folder: Path) -> dict[str, Tensor]:
    with _open(folder) as weights:
        return {k: weights[k].clone() for k in weights}


def _old_ibvs(models: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """base + ((suspect − base) − λ·BV) on whole tensors, as written before the engine."""
    out = {}
    for k, b in models["base"].items():
        if k not in models["bv"]:
            out[k] = b
            continue
        tau = models["suspect"][k].to(torch.float32) - b.to(torch.float32)
        tau = tau - models["bv"][k].to(torch.float32) * LAM
        out[k] = torch.add(b.to(torch.float32), tau, alpha=1.0).to(b.dtype)
    return out


def _old_sanitise(models: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.add(s.to(torch.float32), models["bv"][k].to(torch.float32),
                         alpha=-LAM).to(s.dtype) if k in models["bv"] else s
            for k, s in models["suspect"].items()}


def _same(got: dict[str, Tensor], want: dict[str, Tensor], *, exact: bool = True) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        if exact or not w.is_floating_point():
            assert torch.equal(got[k], w), k
        else:  # a fused multiply-add in a vector loop and not in its tail: one rounding apart
            eps = torch.finfo(w.dtype).eps
            torch.testing.assert_close(got[k], w, rtol=eps, atol=eps * 1e-3)


def test_ibvs_written_by_chunks_equals_the_tensor_by_tensor_arithmetic(
        folders: tuple[dict[str, Path], dict[str, dict[str, Tensor]], int],
        tmp_path: Path) -> None:
    paths, models, shard = folders
    with _open(paths["base"]) as base, _open(paths["suspect"]) as suspect, \
            _open(paths["bv"]) as bv_file:
        keys = list(bv_file)
        tau = TaskVector.between(base, suspect, keys)
        cleaned = (tau - LAM * TaskVector.stored(bv_file)).apply_lazily(base)
        ck.save_checkpoint(tmp_path / "out", cleaned, specs={k: suspect.info(k) for k in suspect},
                           max_shard_bytes=shard)
        again = dict((tau - LAM * TaskVector.stored(bv_file)).apply_lazily(base))
    _same(_written(tmp_path / "out"), _old_ibvs(models))
    _same(again, _old_ibvs(models))  # iterated, the stream is the old generator


def test_sanitise_and_merge_written_by_chunks_equal_the_old_arithmetic(
        folders: tuple[dict[str, Path], dict[str, dict[str, Tensor]], int],
        tmp_path: Path) -> None:
    paths, models, shard = folders
    with _open(paths["base"]) as base, _open(paths["suspect"]) as suspect, \
            _open(paths["bv"]) as bv_file:
        specs = {k: suspect.info(k) for k in suspect}
        bv = TaskVector.stored(bv_file)
        ck.save_checkpoint(tmp_path / "clean", sanitise(suspect, bv, LAM), specs=specs,
                           max_shard_bytes=shard)
        tau = TaskVector.between(base, suspect, list(bv_file))
        cfg = MergeConfig(weights=[1.0], subtract_lambda=LAM)
        ck.save_checkpoint(tmp_path / "merged", merged_tensors(base, [tau], cfg, bv),
                           specs=specs, max_shard_bytes=shard)
    _same(_written(tmp_path / "clean"), _old_sanitise(models), exact=False)
    merged = _old_ibvs(models)  # τ·1 − λ·BV: the merge of one model with IBVS after it
    _same(_written(tmp_path / "merged"), merged, exact=False)


def test_a_bv_file_is_written_as_computed(
        folders: tuple[dict[str, Path], dict[str, dict[str, Tensor]], int],
        tmp_path: Path) -> None:
    """``bv compute``'s path: specs from the headers, the BV streamed; float32 like the BV."""
    paths, models, _ = folders
    with _open(paths["base"]) as clean, _open(paths["suspect"]) as bd:
        bv = from_checkpoints(clean, bd)
        ck.save_checkpoint(tmp_path / "bv", bv.stream(), specs=file_specs(clean, bd))
    want = {k: models["suspect"][k].to(torch.float32) - b.to(torch.float32)
            for k, b in models["base"].items() if b.is_floating_point()}
    _same(_written(tmp_path / "bv"), want)


def test_each_input_byte_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """θ_base is used twice per chunk (in τ and as the sum's base) but read once."""
    models = _models(torch.bfloat16, seed=3)
    for name, tensors in models.items():
        ck.save_checkpoint(tmp_path / name, tensors)
    read: dict[str, int] = {}
    real = ck.Checkpoint._read

    def counted(self: ck.Checkpoint, name: str, start: int, size: int) -> Tensor:
        key = f"{self._headers[0].path.parent.name}/{name}"
        read[key] = read.get(key, 0) + size
        return real(self, name, start, size)

    monkeypatch.setattr(ck.Checkpoint, "_read", counted)
    with _open(tmp_path / "base") as base, _open(tmp_path / "suspect") as suspect, \
            _open(tmp_path / "bv") as bv_file:
        tau = TaskVector.between(base, suspect, list(bv_file))
        cleaned = (tau - LAM * TaskVector.stored(bv_file)).apply_lazily(base)
        ck.save_checkpoint(tmp_path / "out", cleaned, specs={k: base.info(k) for k in base})
        sizes = {f"{n}/{k}": m.info(k).nbytes for n, m in
                 (("base", base), ("suspect", suspect), ("bv", bv_file)) for k in m}
    assert read == {k: v for k, v in sizes.items() if k != "suspect/step"}  # the base's is kept


def test_a_non_elementwise_merge_is_computed_whole(tmp_path: Path) -> None:
    """TIES has no ranges (a per-tensor trim): each tensor whole, the same as iterating."""
    models = _models(torch.float32, seed=4)
    for name, tensors in models.items():
        ck.save_checkpoint(tmp_path / name, tensors)
    with _open(tmp_path / "base") as base, _open(tmp_path / "suspect") as suspect, \
            _open(tmp_path / "bv") as other:
        keys = list(other)
        tvs = [TaskVector.between(base, suspect, keys), TaskVector.stored(other)]
        cfg = MergeConfig(method="ties", ties_form="mergekit", weights=[0.5])
        assert merged_tensors(base, tvs, cfg).ranges("attn") is None
        ck.save_checkpoint(tmp_path / "out", merged_tensors(base, tvs, cfg),
                           specs={k: base.info(k) for k in base})
        want = {k: v.clone() for k, v in merged_tensors(base, tvs, cfg)}
    _same(_written(tmp_path / "out"), want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_chunk_is_refused_with_the_whole_tensor_named(tmp_path: Path,
                                                                   bad: float) -> None:
    """A λ that overflows in one chunk of one tensor: refused, counted over the whole tensor, and
    no shard stays (the ones written before it are removed)."""
    models = _models(torch.float32, seed=5)
    models["bv"]["mlp"][7, 3] = bad
    models["bv"]["mlp"][140, 60] = bad
    for name in ("base", "suspect"):
        ck.save_checkpoint(tmp_path / name, models[name])
    with _open(tmp_path / "base") as base, _open(tmp_path / "suspect") as suspect:
        bv = TaskVector.from_tensors(models["bv"])
        with pytest.raises(InvalidWeightsError, match="'mlp'") as info:
            ck.save_checkpoint(tmp_path / "out", sanitise(suspect, bv, LAM),
                               specs={k: base.info(k) for k in base}, max_shard_bytes=30_000)
    assert info.value.details["nan"] + info.value.details["inf"] == 2
    assert list((tmp_path / "out").iterdir()) == []


def test_a_non_finite_input_range_names_the_whole_tensor(tmp_path: Path) -> None:
    models = _models(torch.bfloat16, seed=6)
    models["suspect"]["embed"][90, 1] = float("nan")
    (tmp_path / "suspect").mkdir()  # our writer would refuse it
    save_file(models["suspect"], tmp_path / "suspect" / "model.safetensors")
    with _open(tmp_path / "suspect") as suspect:
        read = suspect.range_reader("embed")
        assert torch.equal(read(0, 999), models["suspect"]["embed"].view(-1)[:999])
        with pytest.raises(InvalidWeightsError, match="'embed'") as info:
            read(5000, 5917)
    assert info.value.details["nan"] == 1


def test_a_stream_out_of_spec_order_or_short_is_refused(tmp_path: Path) -> None:
    models = _models(torch.float32, seed=7)
    ck.save_checkpoint(tmp_path / "base", models["base"])
    with _open(tmp_path / "base") as base:
        tv = TaskVector.from_tensors(models["bv"])
        specs = {k: base.info(k) for k in base}
        backwards = dict(reversed(list(specs.items())))
        with pytest.raises(ConfigError, match="spec order"):
            ck.save_checkpoint(tmp_path / "a", tv.apply_lazily(base), specs=backwards)
        with pytest.raises(ConfigError, match="ended before"):
            ck.save_checkpoint(tmp_path / "b", tv.stream(), specs=specs)
    assert not (tmp_path / "a" / "model.safetensors").exists()
    assert not (tmp_path / "b" / "model.safetensors").exists()


def test_a_cancelled_write_stops_between_chunks_and_leaves_nothing(tmp_path: Path) -> None:
    models = _models(torch.float32, seed=8)
    calls = 0

    def stop() -> None:
        nonlocal calls
        calls += 1
        if calls == 10:
            raise KeyboardInterrupt

    with cancellation.checked_by(stop), pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path / "out", models["base"])
    assert calls == 10
    assert list((tmp_path / "out").iterdir()) == []


def test_a_mapping_without_ranges_is_read_on_the_calling_thread_one_tensor_at_a_time(
        tmp_path: Path) -> None:
    """open_clip's conversion caches its last fused tensor: a lazy mapping need not be
    thread-safe, so the writer reads it where it was called, in order."""
    models = _models(torch.float16, seed=9)
    seen: list[tuple[str, int]] = []

    class Lazy(Mapping[str, Tensor]):
        def __getitem__(self, name: str) -> Tensor:
            seen.append((name, threading.get_ident()))
            return models["base"][name]

        def __iter__(self) -> Iterator[str]:
            return iter(models["base"])

        def __len__(self) -> int:
            return len(models["base"])

    ck.save_checkpoint(tmp_path / "out", Lazy())
    assert seen == [(k, threading.get_ident()) for k in models["base"]] * 2  # specs, then data
    _same(_written(tmp_path / "out"), models["base"])
