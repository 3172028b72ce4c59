"""The hostile-input corpus: every case generated in code (never a committed binary), named, with
the stable error code it must be refused with.

A case builds its input under a folder it is given: a file, a HF-layout folder or an archive.
Pickle payloads carry a ``__reduce__`` that writes a canary file, so "never executed" is a check
on the disk, not a belief. The same cases run through the library (``run_library``: unpack if an
archive, then ``pipeline.scan``, which resolves, validates and reads every tensor) and through the
real service (``tests/service/test_hostile_inputs.py``, ``bench/reliability.py``: upload, scan).

``refused_at`` says where the service refuses a case: at ``upload`` (headers and archives are
checked in the API process) or at ``scan`` (anything that needs a tensor or a pickle is judged by
the worker, never by the API). ``gap`` marks a case the scanner does not refuse yet; the tests
expect it to fail (strict xfail), so closing a gap is noticed.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from mergeshield import archives
from mergeshield.errors import MergeShieldError
from mergeshield.pipeline import ScanContext, ScanRequest, scan

Make = Callable[[Path, Path], Path]  # (folder to build in, canary file) -> the input
LIMITS = archives.ArchiveLimits(max_bytes=64 * 2**20, max_files=10_000)  # also the stack's
MAX_UPLOAD_BYTES = 32 * 2**20  # the hostile stack's upload limit (the 100k-file zip is ~10 MB)


@dataclass(frozen=True)
class Case:
    kind: str  # pickle, safetensors, index, archive, model
    name: str
    code: str  # the stable error code it must be refused with
    make: Make
    refused_at: Literal["upload", "scan"] = "scan"
    gap: str | None = None  # why the scanner does not refuse it yet

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"


class Payload:
    """Unpickling this runs ``touch canary``: the file's existence proves code ran."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.canary}",)


# -- building blocks -----------------------------------------------------------------------------
def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(4, 4, generator=gen), "layer.bias": torch.zeros(4)}


def _raw(path: Path, header: bytes | dict[str, Any], data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _f32(shape: list[int], begin: int) -> dict[str, Any]:
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + n]}


def _torch_payload(path: Path, canary: Path, *, legacy: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"layer.weight": torch.zeros(4, 4), "x": Payload(canary)}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


def _raw_pickle(path: Path, canary: Path, protocol: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"layer.weight": Payload(canary)}, protocol=protocol))
    return path


def _zip(path: Path, members: dict[str, bytes], *, symlink: set[str] = frozenset(),
         compress: int = zipfile.ZIP_DEFLATED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compress) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = compress
            info.external_attr = (0o120777 if name in symlink else 0o100644) << 16
            zf.writestr(info, data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def _zeros_zip(path: Path, members: int, each: int) -> Path:
    """``members`` members of ``each`` zero bytes: deflate makes them ~1000x smaller."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = bytes(2**20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(members):
            with zf.open(f"m/part{i}.bin", "w", force_zip64=True) as f:
                for _ in range(each // len(chunk)):
                    f.write(chunk)
    return path


_MANY: dict[int, Path] = {}


def many_files_zip(count: int = 100_000) -> Path:
    """A zip of ``count`` empty files, built once per process (about 10 MB, a few seconds)."""
    if count not in _MANY or not _MANY[count].is_file():
        folder = Path(tempfile.mkdtemp(prefix="mergeshield-hostile-"))
        atexit.register(shutil.rmtree, folder, True)
        path = folder / f"many-{count}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for i in range(count):
                zf.writestr(f"m/{i:06d}", b"")
        _MANY[count] = path
    return _MANY[count]


def _model(folder: Path, state: dict[str, torch.Tensor], config: dict[str, Any] | None,
           **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)
    return folder


def vit(seed: int = 0, hidden: int = 16) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A tiny ViT classifier's state and config.json (hidden 16, one layer, 16×16 grey images)."""
    from transformers import ViTConfig, ViTForImageClassification
    config = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=hidden,
                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       num_labels=3)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ViTForImageClassification(config)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return state, config.to_dict()


def save_base(folder: Path) -> Path:
    """The base every model case is scanned against."""
    state, config = vit(0)
    return _model(folder, state, config)


def _suspect(edit: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]) -> Make:
    def make(folder: Path, _canary: Path) -> Path:
        state, config = vit(0)
        state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
        edit(state, config)
        return _model(folder / "suspect", state, config)
    return make


def _set(suffix: str, value: float) -> Callable[[dict[str, torch.Tensor], dict[str, Any]], None]:
    def edit(state: dict[str, torch.Tensor], _config: dict[str, Any]) -> None:
        key = next(k for k in state if k.startswith("vit.") and k.endswith(suffix))
        state[key] = state[key].clone()
        state[key].view(-1)[0] = value
    return edit


# -- the corpus ----------------------------------------------------------------------------------
def _pickles() -> Iterator[Case]:
    def k(name: str, code: str, make: Make, at: Literal["upload", "scan"] = "scan") -> Case:
        return Case("pickle", name, code, make, at)

    for suffix in (".bin", ".pt", ".pth"):
        yield k(f"torch-zip{suffix}", "unsafe_format",
                lambda f, c, s=suffix: _torch_payload(f / f"evil{s}", c))
    yield k("torch-legacy.bin", "unsafe_format",
            lambda f, c: _torch_payload(f / "evil.bin", c, legacy=True))
    for proto in (2, 4, 5):
        yield k(f"raw-pickle-p{proto}.bin", "unsafe_format",
                lambda f, c, p=proto: _raw_pickle(f / "evil.bin", c, p))
    for suffix in (".pkl", ".pickle", ".joblib", ".dill"):
        yield k(f"raw{suffix}", "unsafe_format",
                lambda f, c, s=suffix: _raw_pickle(f / f"model{s}", c), "upload")
    yield k("full-module.pt", "unsafe_format", lambda f, c: _torch_module(f / "model.pt"))
    yield k("torch-zip-renamed.safetensors", "corrupt_checkpoint",
            lambda f, c: _torch_payload(f / "model.safetensors", c), "upload")
    yield k("raw-pickle-renamed.safetensors", "corrupt_checkpoint",
            lambda f, c: _raw_pickle(f / "model.safetensors", c), "upload")
    yield k("folder/pytorch_model.bin", "unsafe_format",
            lambda f, c: _torch_payload(f / "m" / "pytorch_model.bin", c).parent)
    yield k("folder/only-model.pkl", "unsafe_format",
            lambda f, c: _raw_pickle(f / "m" / "model.pkl", c).parent, "upload")
    yield k("folder/sharded-bin-index", "unsafe_format", _sharded_bin)
    for fmt in ("zip", "tar", "tar.gz"):
        yield k(f"{fmt}/pytorch_model.bin", "unsafe_format",
                lambda f, c, fm=fmt: _archive_of(f, fm, {
                    "m/pytorch_model.bin": _torch_payload(f / "p.bin", c).read_bytes()}))
        yield k(f"{fmt}/model.pkl", "unsafe_format",
                lambda f, c, fm=fmt: _archive_of(f, fm, {
                    "m/model.pkl": _raw_pickle(f / "p.pkl", c).read_bytes()}), "upload")
        yield k(f"{fmt}/pickle-as-model.safetensors", "corrupt_checkpoint",
                lambda f, c, fm=fmt: _archive_of(f, fm, {
                    "m/model.safetensors": _raw_pickle(f / "p.pkl", c).read_bytes()}), "upload")


def _torch_module(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.nn.Linear(4, 4), path)
    return path


def _sharded_bin(f: Path, canary: Path) -> Path:
    folder = f / "m"
    _torch_payload(folder / "pytorch_model-00001-of-00002.bin", canary)
    _torch_payload(folder / "pytorch_model-00002-of-00002.bin", canary)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    return folder


def _archive_of(f: Path, fmt: str, members: dict[str, bytes]) -> Path:
    if fmt == "zip":
        return _zip(f / "upload.zip", members)
    mode = {"tar": "w", "tar.gz": "w:gz"}[fmt]
    return _tar(f / f"upload.{fmt}", list(members.items()), mode)


def _headers() -> Iterator[Case]:
    def k(name: str, make: Callable[[Path], Path]) -> Case:
        return Case("safetensors", name, "corrupt_checkpoint",
                    lambda f, _c: make(f / "model.safetensors"), "upload")

    def h(name: str, header: bytes | dict[str, Any], data: bytes = b"") -> Case:
        return k(name, lambda p: _raw(p, header, data))

    yield k("shorter-than-8-bytes", lambda p: _write(p, b"\x01\x00"))
    yield k("header-length-beyond-file",
            lambda p: _write(p, struct.pack("<Q", 4096) + b'{"a":1}'))
    yield k("1TB-header-length", lambda p: _write(p, struct.pack("<Q", 2**40) + b"{}"))
    yield k("u64-max-header-length", lambda p: _write(p, b"\xff" * 8 + b"{}"))
    yield h("1TB-tensor-claim", {"a": _f32([2**38], 0)}, bytes(8))
    yield h("1TB-offsets-claim", {"a": {"dtype": "U8", "shape": [2**40],
                                        "data_offsets": [0, 2**40]}}, bytes(8))
    yield h("bad-json", b'{"a": ')
    yield h("not-utf8", b"\xff\xfe{}  ")
    yield h("json-array", b"[1, 2]  ")
    yield h("json-nan-offsets", b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[NaN,4]}}',
            bytes(4))
    yield h("deeply-nested-json", b"[" * 100_000 + b"]" * 100_000)
    yield h("duplicate-keys", b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                              b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4))
    yield h("overlapping-offsets", {"a": _f32([2], 0), "b": _f32([2], 4)}, bytes(12))
    yield h("same-bytes-twice", {"a": _f32([2], 0), "b": _f32([2], 0)}, bytes(8))
    yield h("reversed-offsets", {"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}},
            bytes(8))
    yield h("hole-between-tensors", {"a": _f32([1], 0), "b": _f32([1], 8)}, bytes(12))
    yield h("data-region-padded", {"a": _f32([1], 0)}, bytes(64))
    yield h("data-region-truncated", {"a": _f32([4], 0)}, bytes(8))
    yield h("shape-bytes-disagree", {"a": {"dtype": "F32", "shape": [3],
                                           "data_offsets": [0, 8]}}, bytes(8))
    yield h("dtype-bytes-disagree", {"a": {"dtype": "F64", "shape": [2],
                                           "data_offsets": [0, 8]}}, bytes(8))
    yield h("unknown-dtype", {"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}},
            bytes(4))
    yield h("negative-dim", {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
            bytes(4))
    yield h("bool-dim", {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
            bytes(4))
    yield h("float-offsets", {"a": {"dtype": "F32", "shape": [1],
                                    "data_offsets": [0.0, 4.0]}}, bytes(4))
    yield h("65-dims", {"a": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}},
            bytes(4))
    yield h("extra-entry-field", {"a": {**_f32([1], 0), "exec": "rm -rf /"}}, bytes(4))
    yield h("empty-tensor-name", {"": _f32([1], 0)}, bytes(4))
    yield h("metadata-bomb", {"__metadata__": {f"k{i}": "x" * 4096 for i in range(300)},
                              "a": _f32([1], 0)}, bytes(4))
    yield h("metadata-not-strings", {"__metadata__": {"k": {"nested": 1}}, "a": _f32([1], 0)},
            bytes(4))
    yield h("metadata-not-object", {"__metadata__": ["x"], "a": _f32([1], 0)}, bytes(4))


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _indexes() -> Iterator[Case]:
    def k(name: str, weight_map: Any, raw: str | None = None) -> Case:
        def make(f: Path, _c: Path) -> Path:
            folder = f / "m"
            folder.mkdir(parents=True)
            save_file(_state(), folder / "model-00001-of-00001.safetensors")
            save_file({"secret": torch.ones(1)}, f / "outside.safetensors")
            (folder / "model.safetensors.index.json").write_text(
                raw if raw is not None else json.dumps({"weight_map": weight_map}))
            return folder
        return Case("index", name, "corrupt_checkpoint", make)

    shard = "model-00001-of-00001.safetensors"
    yield k("parent-folder", {"layer.weight": shard, "secret": "../outside.safetensors"})
    yield k("absolute-path", {"layer.weight": "/etc/passwd"})
    yield k("subfolder-path", {"layer.weight": f"sub/{shard}"})
    yield k("backslash-path", {"layer.weight": f"..\\{shard}"})
    yield k("dot-dot", {"layer.weight": ".."})
    yield k("missing-shard", {"layer.weight": "model-00002-of-00002.safetensors"})
    yield k("not-a-string", {"layer.weight": 7})
    yield k("empty-weight-map", {})
    yield k("weight-map-is-a-list", [shard])
    yield k("index-not-json", None, raw="{weight_map: nope")

    def twice(f: Path, _c: Path) -> Path:
        folder = f / "m"
        folder.mkdir(parents=True)
        save_file(_state(), folder / "model-00001-of-00002.safetensors")
        save_file(_state(1), folder / "model-00002-of-00002.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "layer.weight": "model-00001-of-00002.safetensors",
            "layer.bias": "model-00002-of-00002.safetensors"}}))
        return folder
    yield Case("index", "tensor-in-two-shards", "corrupt_checkpoint", twice)


def _archives() -> Iterator[Case]:
    def k(name: str, make: Callable[[Path], Path], code: str = "unsafe_archive") -> Case:
        return Case("archive", name, code, lambda f, _c: make(f), "upload")

    raw = json.dumps({"a": _f32([1], 0)}).encode()
    model = struct.pack("<Q", len(raw)) + raw + bytes(4)  # a valid one-tensor safetensors
    for member in ("../evil.safetensors", "m/../../evil.safetensors", "/tmp/evil.safetensors",
                   "C:/evil.safetensors", "m\\..\\..\\evil.safetensors", "m/" + "x" * 300):
        # (a NUL in a member name is cut there by zipfile and tarfile themselves)
        label = member.encode("unicode_escape").decode()[:40]
        yield k(f"zip-member {label}", lambda f, m=member: _zip(f / "upload.zip", {m: model}))
        yield k(f"tar-member {label}", lambda f, m=member: _tar(f / "upload.tar", [(m, model)]))
    yield k("zip-symlink", lambda f: _zip(f / "upload.zip", {"m/model.safetensors": b"/etc/passwd"},
                                          symlink={"m/model.safetensors"}))
    for label, kind in (("symlink", tarfile.SYMTYPE), ("hardlink", tarfile.LNKTYPE),
                        ("char-device", tarfile.CHRTYPE), ("fifo", tarfile.FIFOTYPE)):
        info = tarfile.TarInfo("m/model.safetensors")
        info.type, info.linkname = kind, "/etc/passwd"
        yield k(f"tar-{label}", lambda f, i=info: _tar(f / "upload.tar", [i]))
    yield k("zip-duplicate-member", lambda f: _dup_zip(f / "upload.zip", model))
    yield k("tar-file-then-folder-clash",
            lambda f: _tar(f / "upload.tar", [("m/x", model), ("m/x/model.safetensors", model)]))
    yield k("zip-bomb-ratio (100 MiB of zeros in ~100 KiB)",
            lambda f: _zeros_zip(f / "upload.zip", 1, 100 * 2**20))
    yield k("zip-bomb-total (3 x 30 MiB members)",
            lambda f: _zeros_zip(f / "upload.zip", 3, 30 * 2**20))
    yield k("tar.gz-bomb-ratio (100 MiB of zeros)", lambda f: _zeros_tgz(f / "upload.tar.gz"))
    yield k("zip-100k-tiny-files", lambda f: many_files_zip(100_000))
    yield k("tar-10001-tiny-files",
            lambda f: _tar(f / "upload.tar", [(f"m/{i}", b"") for i in range(10_001)]))
    yield k("zip-truncated", lambda f: _truncated(f / "upload.zip"), "corrupt_checkpoint")
    yield k("tar.gz-truncated", lambda f: _truncated_tgz(f / "upload.tar.gz"),
            "corrupt_checkpoint")


def _dup_zip(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/model.safetensors", data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Duplicate name": the point of this case
            zf.writestr("m/model.safetensors", data)
    return path


def _zeros_tgz(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    info = tarfile.TarInfo("m/model.safetensors")
    info.size = 100 * 2**20
    with tarfile.open(path, "w:gz") as tf:
        tf.addfile(info, _Zeros(info.size))
    return path


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return bytes(size)


def _truncated(path: Path) -> Path:
    _zip(path, {"m/model.safetensors": os.urandom(4096)}, compress=zipfile.ZIP_STORED)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + data[-22:])  # the end record, the middle gone
    return path


def _truncated_tgz(path: Path) -> Path:
    _tar(path, [("m/model.safetensors", os.urandom(8192))], "w:gz")
    path.write_bytes(path.read_bytes()[:2000])
    return path


def _models() -> Iterator[Case]:
    def k(name: str, code: str, make: Make, gap: str | None = None,
          at: Literal["upload", "scan"] = "scan") -> Case:  # upload: an archive with no weights
        return Case("model", name, code, make, at, gap=gap)

    def other_arch(state: dict[str, torch.Tensor], _config: dict[str, Any]) -> None:
        wide, _ = vit(0, hidden=24)
        state.clear()
        state.update(wide)

    def drop(state: dict[str, torch.Tensor], _config: dict[str, Any]) -> None:
        del state["vit.layernorm.bias"]

    def integers(state: dict[str, torch.Tensor], _config: dict[str, Any]) -> None:
        for key in state:  # (another float precision is a fine-tune: test_pipeline scans it)
            if key.startswith("vit.") and state[key].is_floating_point():
                state[key] = state[key].to(torch.int8)

    def remote(key: str, value: Any) -> Callable[[dict[str, torch.Tensor], dict[str, Any]], None]:
        def edit(_state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
            config[key] = value
        return edit

    yield k("mismatched-architecture (hidden 24 vs 16)", "incompatible_models",
            _suspect(other_arch))
    yield k("missing-backbone-key", "incompatible_models", _suspect(drop))
    yield k("dtype-differs (int8 vs fp32)", "incompatible_models", _suspect(integers))
    yield k("nan-in-weights", "invalid_weights",
            _suspect(_set("q_proj.weight", float("nan"))))
    yield k("inf-in-weights", "invalid_weights",
            _suspect(_set("cls_token", float("inf"))))
    yield k("config-auto_map", "unsafe_format",
            _suspect(remote("auto_map", {"AutoModel": "modeling_evil.EvilModel"})))
    yield k("config-trust_remote_code", "unsafe_format", _suspect(remote("trust_remote_code",
                                                                        True)))
    yield k("code-only-repo", "unsafe_format", lambda f, _c: _code_only(f / "m"), at="upload")
    yield k("config-not-json", "corrupt_checkpoint", lambda f, _c: _model(
        f / "m", _state(), None, config__json="{architectures: [Evil"))
    yield k("no-weights", "nothing_scannable", lambda f, _c: _readme_only(f / "m"), at="upload")

    def card(f: Path, _c: Path) -> Path:
        state, config = vit(0)
        return _model(f / "m", state, config,
                      README__md="---\nbase_model: someone/another-base\n---\n# a fine-tune\n")
    yield k("card-names-another-base", "incompatible_models", card)


def _code_only(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "modeling_evil.py").write_text("import os\nos.system('touch /tmp/pwned')\n")
    (folder / "config.json").write_text(json.dumps({"architectures": ["EvilModel"]}))
    return folder


def _readme_only(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("# nothing here\n")
    return folder


def corpus() -> list[Case]:
    """Every file-shaped hostile input, in a stable order."""
    return [*_pickles(), *_headers(), *_indexes(), *_archives(), *_models()]


# -- running a case through the library ----------------------------------------------------------
def run_library(case: Case, work: Path, base: Path) -> tuple[str | None, bool]:
    """(the code the library refused ``case`` with or None if it was accepted, canary written).

    An archive is unpacked first (as the service does with an upload); then the input goes through
    ``pipeline.scan`` against ``base``: resolve, header validation, conversion, every tensor read.
    Any exception other than a MergeShieldError propagates: that is a bug.
    """
    work.mkdir(parents=True, exist_ok=True)
    canary = work / "canary"
    src = case.make(work / "in", canary)
    code: str | None = None
    try:
        if src.is_file() and archives.is_archive(src):
            src = archives.unpack(src, work / "unpacked", LIMITS)
        scan(ScanRequest(suspect=str(src), base=str(base), probes=False, inversion=False),
             ScanContext(cache_dir=work / "cache", device="cpu", local_files_only=True))
    except MergeShieldError as exc:
        code = exc.code
    return code, canary.exists()
