"""checkpoints.py and safetensors_io.py on real files: tiny models, hostile inputs, the writer."""

from __future__ import annotations

import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mergeshield import checkpoints as ck
from mergeshield.errors import (
    ConfigError,
    CorruptCheckpointError,
    IncompatibleModelsError,
    InsufficientStorageError,
    InvalidWeightsError,
    NothingScannableError,
    UnsafeFileError,
    UnsafeFormatError,
)
from mergeshield.safetensors_io import TensorInfo, read_header

transformers = pytest.importorskip("transformers")


def _vit_config(num_labels: int = 10) -> object:
    return transformers.ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=num_labels)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(_vit_config())
    folder = tmp_path_factory.mktemp("vit")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_state(vit_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(vit_dir / "model.safetensors")


def _raw_file(path: Path, header: bytes | dict[str, object], data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _f32(shape: list[int], begin: int) -> dict[str, object]:
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + n]}


# sources -----------------------------------------------------------------------------------


def test_directory_source(vit_dir: Path, vit_state: dict[str, torch.Tensor]) -> None:
    src = ck.resolve(str(vit_dir))
    assert src.kind == "directory" and src.revision is None and src.root == vit_dir
    assert src.config is not None and src.config["model_type"] == "vit"
    with ck.open_checkpoint(src) as weights:
        assert set(weights) == set(vit_state) and len(weights) == len(vit_state)
        for name, tensor in vit_state.items():
            assert torch.equal(weights[name], tensor)
            assert weights.info(name) == TensorInfo.of(tensor)
    digests = {p: (s, h) for p, s, h in src.files_digest()}
    assert set(digests) == {"model.safetensors", "config.json"}
    assert digests["config.json"][1] == ck.sha256_file(vit_dir / "config.json")


def test_single_file_and_bin_sources(tmp_path: Path, vit_dir: Path,
                                     vit_state: dict[str, torch.Tensor]) -> None:
    single = ck.resolve(str(vit_dir / "model.safetensors"))
    assert single.kind == "file" and single.config is None
    torch.save(vit_state, tmp_path / "weights.bin")
    as_bin = ck.resolve(str(tmp_path / "weights.bin"), cache_dir=tmp_path / "cache")
    assert as_bin.weight_files == (tmp_path / "weights.bin",)
    assert all(p.suffix == ".safetensors" for p in as_bin.tensor_files)
    with ck.open_checkpoint(single) as a, ck.open_checkpoint(as_bin) as b:
        assert set(a) == set(b) == set(vit_state)
        assert all(torch.equal(a[k], b[k]) for k in vit_state)
    folder = tmp_path / "bin_dir"
    folder.mkdir()
    torch.save(vit_state, folder / "pytorch_model.bin")
    (folder / "config.json").write_bytes((vit_dir / "config.json").read_bytes())
    with ck.open_checkpoint(ck.resolve(str(folder), cache_dir=tmp_path / "cache")) as c:
        assert torch.equal(c["classifier.weight"], vit_state["classifier.weight"])


def test_sharded_round_trip_loads_in_transformers(tmp_path: Path, vit_dir: Path) -> None:
    src = ck.resolve(str(vit_dir))
    out = tmp_path / "sharded"
    with ck.open_checkpoint(src) as weights:
        files = ck.save_checkpoint(out, weights, config=src.config, max_shard_bytes=20_000,
                                   extra_files={"notes.txt": vit_dir / "config.json"},
                                   metadata={"mergeshield.scan_id": "s1"})
        shards = sorted(out.glob("model-*-of-*.safetensors"))
        assert len(shards) > 2 and (out / "model.safetensors.index.json") in files
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(weights)
        assert index["metadata"]["total_size"] == sum(weights.info(k).nbytes for k in weights)
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                assert f.metadata() == {"format": "pt", "mergeshield.scan_id": "s1"}
        back = ck.resolve(str(out))
        with ck.open_checkpoint(back) as again:
            assert again.metadata["mergeshield.scan_id"] == "s1"
            assert all(torch.equal(again[k], weights[k]) for k in weights)
    model = transformers.ViTForImageClassification.from_pretrained(out)
    reference = transformers.ViTForImageClassification.from_pretrained(vit_dir).state_dict()
    for name, tensor in model.state_dict().items():  # transformers may rename keys on load
        assert torch.equal(tensor, reference[name]), name
    assert (out / "notes.txt").read_bytes() == (vit_dir / "config.json").read_bytes()
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.bool, torch.float8_e4m3fn])
def test_dtype_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {"w": torch.randn(5, 3).to(dtype), "scalar": torch.tensor(2).to(dtype),
               "empty": torch.zeros(0, 4, dtype=dtype)}
    ck.save_checkpoint(tmp_path, tensors)
    with ck.open_checkpoint(ck.resolve(str(tmp_path))) as back:
        for name, tensor in tensors.items():
            got = back[name]
            assert got.dtype == dtype and got.shape == tensor.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8),
                               tensor.reshape(-1).view(torch.uint8))


def test_streaming_writer_writes_each_tensor_before_the_next(tmp_path: Path) -> None:
    specs = {f"layer{i}.weight": TensorInfo(torch.float32, (64, 64), 64 * 64 * 4)
             for i in range(6)}

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        for i, name in enumerate(specs):
            if i:  # everything yielded so far is on disk already, behind the header
                tmp = next(tmp_path.glob(".model.safetensors.*.tmp"))
                assert tmp.stat().st_size >= i * 64 * 64 * 4
            yield name, torch.full((64, 64), float(i))

    files = ck.save_checkpoint(tmp_path, produce(), specs=specs, config={"model_type": "x"})
    assert [p.name for p in files] == ["model.safetensors", "config.json"]
    with ck.open_checkpoint(ck.resolve(str(tmp_path))) as back:
        assert list(back) == list(specs) and float(back["layer5.weight"][0, 0]) == 5.0
    with pytest.raises(ConfigError, match="spec order"):
        ck.save_checkpoint(tmp_path / "bad", iter([("x", torch.zeros(2))]),
                           specs={"x": TensorInfo(torch.float16, (2,), 4)})
    assert not (tmp_path / "bad" / "model.safetensors").exists()


# hostile inputs ----------------------------------------------------------------------------


class _Payload:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.canary}",)


@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_pickle_payload_is_refused_and_not_run(tmp_path: Path, container: str) -> None:
    canary = tmp_path / "canary"
    path = tmp_path / "evil.bin"
    if container == "torch_zip":
        torch.save({"w": torch.zeros(2), "x": _Payload(canary)}, path)
    else:
        path.write_bytes(pickle.dumps({"w": _Payload(canary)}, protocol=2))
    with pytest.raises(UnsafeFormatError, match="evil.bin"):
        ck.resolve(str(path), cache_dir=tmp_path / "cache")
    assert not canary.exists()


def test_full_module_pickle_and_pkl_are_refused(tmp_path: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    with pytest.raises(UnsafeFormatError):
        ck.resolve(str(tmp_path / "model.pt"), cache_dir=tmp_path)
    (tmp_path / "model.pkl").write_bytes(pickle.dumps({"w": [1.0]}))
    with pytest.raises(UnsafeFormatError, match="pickle"):
        ck.resolve(str(tmp_path / "model.pkl"))


def test_remote_code_and_code_only_repos_are_refused(tmp_path: Path, vit_dir: Path) -> None:
    for name in ("model.safetensors", "config.json"):
        (tmp_path / name).write_bytes((vit_dir / name).read_bytes())
    config = json.loads((vit_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "m.M"}}))
    with pytest.raises(UnsafeFormatError, match="auto_map"):
        ck.resolve(str(tmp_path))
    code = tmp_path / "code_only"
    code.mkdir()
    (code / "modeling_evil.py").write_text("import os\n")
    with pytest.raises(UnsafeFormatError, match="Python model code"):
        ck.resolve(str(code))


def test_truncated_file(tmp_path: Path, vit_dir: Path) -> None:
    data = (vit_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptCheckpointError, match="outside the data region"):
        ck.resolve(str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize(("header", "data", "problem"), [
    (b'{"w": ', b"", "not valid UTF-8 JSON"),
    (b'\xff\xfe{}', b"", "not valid UTF-8 JSON"),
    (b'[1, 2]', b"", "not a JSON object"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4), "duplicate"),
    ({"a": _f32([2], 0), "b": _f32([2], 4)}, bytes(12), "overlap"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "need 12 bytes"),
    ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), "non-negative"),
    ({"a": _f32([2**40], 0)}, bytes(8), "outside the data region"),
    ({"__metadata__": {"k": 1}, "a": _f32([1], 0)}, bytes(4), "strings to strings"),
])
def test_hostile_headers(tmp_path: Path, header: bytes | dict[str, object], data: bytes,
                         problem: str) -> None:
    path = _raw_file(tmp_path / "model.safetensors", header, data)
    with pytest.raises(CorruptCheckpointError, match=problem) as info:
        ck.resolve(str(path))
    assert info.value.details["file"] == path.name  # never a server path


def test_terabyte_header_claim_allocates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    tracemalloc.start()
    with pytest.raises(CorruptCheckpointError, match="header length"):
        read_header(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20


@pytest.mark.parametrize("target",
                         ["../x.safetensors", "/etc/x.safetensors", "missing.safetensors"])
def test_index_outside_the_folder(tmp_path: Path, target: str) -> None:
    save_file({"w": torch.zeros(2)}, tmp_path.parent / "x.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"w": target}}))
    with pytest.raises(CorruptCheckpointError, match="not a file name inside"):
        ck.resolve(str(tmp_path))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path: Path, bad: float) -> None:
    save_file({"ok": torch.ones(3), "w": torch.tensor([1.0, bad])}, tmp_path / "model.safetensors")
    with ck.open_checkpoint(ck.resolve(str(tmp_path))) as weights:
        assert weights["ok"].sum() == 3
        with pytest.raises(InvalidWeightsError, match="'w'") as info:
            weights["w"]
    assert info.value.details["tensor"] == "w"


def test_mismatched_architectures_are_listed(vit_dir: Path, tmp_path: Path) -> None:
    transformers.ViTForImageClassification(_vit_config(num_labels=3)).save_pretrained(tmp_path)
    with ck.open_checkpoint(ck.resolve(str(vit_dir))) as a, \
            ck.open_checkpoint(ck.resolve(str(tmp_path))) as b:
        ck.check_compatible(a, b, keys=lambda k: not k.startswith("classifier"))
        with pytest.raises(IncompatibleModelsError, match="2 shape") as info:
            ck.check_compatible(a, b)
        shapes = {d["name"]: d for d in info.value.details["shape"]}
        assert shapes["classifier.weight"] == {"name": "classifier.weight", "base": [10, 32],
                                               "other": [3, 32]}
        body = lambda k: not k.startswith("classifier")  # noqa: E731
        half = {k: b[k].half() for k in b}
        ck.check_compatible(a, half, keys=body)  # another float precision: a fine-tune's
        ints = {k: v.to(torch.int8) if v.is_floating_point() else v for k, v in b.items()}
        with pytest.raises(IncompatibleModelsError) as info:
            ck.check_compatible(a, {k: v for k, v in ints.items() if k != "vit.layernorm.bias"},
                                keys=body)
        assert info.value.details["missing"] == ["vit.layernorm.bias"]
        floats = [k for k in a if body(k) and a.info(k).dtype.is_floating_point]
        assert len(info.value.details["dtype"]) == len(floats) - 1  # every shared float


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                          max_size=8))
def test_header_mutations_only_raise_corrupt(tmp_path_factory: pytest.TempPathFactory,
                                            mutations: list[tuple[int, int]]) -> None:
    good = json.dumps({"__metadata__": {"format": "pt"}, "a": _f32([2, 3], 0),
                       "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}}).encode()
    blob = bytearray(struct.pack("<Q", len(good)) + good + bytes(32))
    for pos, value in mutations:
        blob[pos % len(blob)] = value
    path = tmp_path_factory.getbasetemp() / "mutated.safetensors"
    path.write_bytes(bytes(blob))
    tracemalloc.start()
    try:
        header = read_header(path)
        covered = sum(e.end - e.begin for e in header.tensors.values())
        assert covered == len(blob) - header.data_start
    except CorruptCheckpointError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 4 * 2**20


FULL_DISK = """
import sys, torch
from mergeshield import checkpoints as ck
from mergeshield.errors import StorageFullError
try:
    ck.save_checkpoint(sys.argv[1], {"w": torch.ones(64, 1024)})  # 256 KiB, past the limit
except StorageFullError as exc:
    print(exc.code, exc.details["errno"])
"""


def test_a_write_past_the_disk_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    """A real limit (RLIMIT_FSIZE on a child process: writes past it fail with EFBIG, as writes
    on a full disk fail with ENOSPC): StorageFullError, and readers still see the old file."""
    ck.save_checkpoint(tmp_path, {"w": torch.zeros(4)})
    old = (tmp_path / "model.safetensors").read_bytes()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], preexec_fn=limit,
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["disk_full", "EFBIG"], proc.stderr[-2000:]
    assert (tmp_path / "model.safetensors").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


# -- round 2 of hostile inputs (issue 13); the generated corpus is tests/support/hostile2.py ------
def test_extra_files_never_copy_a_link_that_leads_out(tmp_path: Path) -> None:
    """Second line of defence behind resolve()'s folder check: even on a ResolvedSource made
    without it, a link out of the folder, a FIFO and a dangling link are not extra files."""
    root = tmp_path / "m"
    root.mkdir()
    (root / "tokenizer_config.json").write_text("{}")
    (root / "inside.json").symlink_to("tokenizer_config.json")
    (root / "special_tokens_map.json").symlink_to("/proc/self/environ")
    (root / "dangling.txt").symlink_to("gone")
    os.mkfifo(root / "vocab.txt")
    src = ck.ResolvedSource("m", "directory", None, None, root, (), None)
    assert sorted(ck.extra_files(src)) == ["inside.json", "tokenizer_config.json"]


def test_a_stride_0_bin_is_refused_before_a_byte_is_converted(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1).expand(50_000_000)}, tmp_path / "w.bin")  # 200 MB as a view
    cache = tmp_path / "cache"
    with pytest.raises(CorruptCheckpointError, match="stride 0 or overlapping") as info:
        ck.resolve(str(tmp_path / "w.bin"), cache_dir=cache)
    assert info.value.details == {"file": "w.bin", "tensor": "w"}
    assert not any((cache / "mergeshield-converted").iterdir())


def test_a_bin_conversion_is_inside_the_disk_check(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1000)}, tmp_path / "w.bin")
    cache = tmp_path / "cache"
    with pytest.raises(InsufficientStorageError, match="converting w.bin"):
        ck.resolve(str(tmp_path / "w.bin"), cache_dir=cache, min_free_bytes=2**62)
    assert not any((cache / "mergeshield-converted").iterdir())
    ck.resolve(str(tmp_path / "w.bin"), cache_dir=cache, min_free_bytes=0)
    assert len(list((cache / "mergeshield-converted").iterdir())) == 1


def test_nothing_scannable_names_no_local_path(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("x")
    with pytest.raises(NothingScannableError) as info:
        ck.resolve(str(tmp_path / "m"))
    assert str(tmp_path) not in info.value.message + json.dumps(info.value.details)
    assert info.value.details == {"files": ["notes.txt"]}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_the_writer_refuses_non_finite_output_and_leaves_no_shard(tmp_path: Path,
                                                                  bad: float) -> None:
    """A NaN λ or an overflow must never reach a served checkpoint: the shard that would hold it
    is refused and the shards written before it are removed."""
    good = torch.zeros(64, 64)
    broken = torch.zeros(64, 64)
    broken[3, 5] = bad
    with pytest.raises(InvalidWeightsError, match="'b'") as info:
        ck.save_checkpoint(tmp_path, {"a": good, "b": broken}, max_shard_bytes=64 * 64 * 4)
    assert info.value.code == "invalid_weights"
    assert list(tmp_path.iterdir()) == []


def test_other_json_files_are_searched_for_remote_code_but_need_not_be_configs(
        tmp_path: Path, vit_dir: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    for p in vit_dir.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "modules.json").write_text('[{"path": ""}]')  # sentence-transformers: an array
    (folder / "notes.json").write_text("not json at all")
    src = ck.resolve(str(folder))
    assert {"modules.json", "notes.json"} <= set(ck.extra_files(src))
    (folder / "modules.json").write_text('[{"auto_map": {"AutoModel": "evil.Model"}}]')
    with pytest.raises(UnsafeFormatError, match=r"modules.json: refused, \[0\].auto_map"):
        ck.resolve(str(folder))


def test_a_hub_cache_snapshot_named_as_a_folder_may_link_into_its_blobs(
        tmp_path: Path, vit_dir: Path) -> None:
    """huggingface_hub's cache layout: snapshots/<sha>/<file> -> ../../blobs/<hash>."""
    repo = tmp_path / "models--acme--vit"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for i, p in enumerate(sorted(vit_dir.iterdir())):
        (repo / "blobs" / f"blob{i}").write_bytes(p.read_bytes())
        (snap / p.name).symlink_to(f"../../blobs/blob{i}")
    src = ck.resolve(str(snap))
    assert src.config is not None and src.weight_files
    (snap / "notes.txt").symlink_to(tmp_path / "elsewhere.txt")  # out of the repo: refused
    (tmp_path / "elsewhere.txt").write_text("x")
    with pytest.raises(UnsafeFileError, match="notes.txt"):
        ck.resolve(str(snap))
