"""The hostile-input corpus, round 2 (issue 13): links out of a model folder, special files,
allocation bombs hidden in a ``.bin`` or a header, tensor types we cannot scan, configs that ask
for huge models, remote code or a kernel, strings that are not Unicode, outputs that would hold
NaN. Every case is generated in code (no committed binary), named, with its stable code.

Each case builds one input under a folder it is given and plays a ``role`` in a scan: the
suspect, the base or the given BV. The scan asks for a cleaned checkpoint (a given BV at a fixed
λ, so the writer and the copy of processor/tokenizer files run without any evaluation data): a
link to ``/proc/self/environ`` that were followed would put the environment into the output.

``run_library`` runs a case through ``pipeline.scan``, ``run_cli`` through ``mergeshield.cli.main``
(in this process, for speed; ``tests/mergeshield/test_hostile2.py`` also runs a few as a real
``mergeshield`` process). Both run under an alarm (no hang passes) with the canary token
``CANARY`` in the environment, and return an :class:`Outcome` that says what left the scan.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from mergeshield import archives
from mergeshield.errors import MergeShieldError
from mergeshield.pipeline import ScanContext, ScanRequest, scan
from tests.support.hostile import LIMITS, Payload, vit

Make = Callable[[Path, Path], Path]  # (folder to build in, canary file) -> the input
Role = Literal["suspect", "base", "bv"]
CANARY = "canary-hf_3b1f0c9e7d"  # HF_TOKEN while a case runs; must appear in no output
OUTSIDE_SECRET = "outside-secret-5e2a"  # in a file next to the input, outside any model folder
CASE_TIMEOUT_S = 60  # a case still running after this is a hang
LAMBDA = 0.5


@dataclass(frozen=True)
class Case:
    kind: str  # link, special, alloc, tensor, header, config, remote, archive, output
    name: str
    code: str | None  # the stable code; None: accepted, the hostile part neutralised
    make: Make
    role: Role = "suspect"
    lam: float = LAMBDA  # the fixed λ the given BV is subtracted with

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True)
class Fixtures:
    base: Path  # a tiny ViT classifier
    suspect: Path  # a clean "fine-tune" of it
    bv: Path  # a backdoor vector over its backbone


@dataclass
class Outcome:
    code: str | None  # the error code, None when the scan was accepted
    exit: int | None = None  # the CLI's exit code (None: run through the library)
    message: str = ""
    output: str = ""  # stdout + stderr (CLI)
    stdout: str = ""  # the CLI's stdout alone: the report (stderr has progress and errors)
    ran: bool = False  # the canary file exists: a payload ran
    stray: list[str] = field(default_factory=list)  # files written where nothing may be
    leaked: list[str] = field(default_factory=list)  # output files holding a secret

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.output


# -- fixtures ------------------------------------------------------------------------------------
def _folder(folder: Path, state: dict[str, torch.Tensor], config: dict[str, Any] | None,
            **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def _suspect_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state, config = vit(0)
    return {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, config


def build_fixtures(folder: Path) -> Fixtures:
    """The base, a clean suspect and a BV over the backbone, each a model folder."""
    base_state, config = vit(0)
    state, _ = _suspect_state()
    bv = {k: state[k] - base_state[k] for k in state if k.startswith("vit.")}
    return Fixtures(_folder(folder / "base", base_state, config),
                    _folder(folder / "suspect", state, config,
                            **{"tokenizer_config.json": "{}", "notes.txt": "benign"}),
                    _folder(folder / "bv", bv, None))


def _model(folder: Path, config: dict[str, Any] | None = None, **files: str) -> Path:
    """The clean suspect's weights with ``config`` (default: its own) and extra files."""
    state, own = _suspect_state()
    return _folder(folder / "m", state, own if config is None else config, **files)


def _config(**edits: Any) -> dict[str, Any]:
    config = vit(0)[1]
    config.update(edits)
    return config


def _outside(folder: Path, name: str = "secret.json", text: str | None = None) -> Path:
    (folder / "outside").mkdir(parents=True, exist_ok=True)
    path = folder / "outside" / name
    path.write_text(text if text is not None else json.dumps({"token": OUTSIDE_SECRET}))
    return path


def _link(name: str, target: Callable[[Path], str]) -> Make:
    """The suspect's model folder with ``name`` a symbolic link to ``target(folder)``."""
    def make(f: Path, _c: Path) -> Path:
        m = _model(f)
        (m / name).unlink(missing_ok=True)
        (m / name).symlink_to(target(f))
        return m
    return make


def _fifo(name: str, *, in_folder: bool = True) -> Make:
    def make(f: Path, _c: Path) -> Path:
        m = _model(f) if in_folder else f
        m.mkdir(parents=True, exist_ok=True)
        (m / name).unlink(missing_ok=True)
        os.mkfifo(m / name)
        return m if in_folder else m / name
    return make


def _socket(f: Path, _c: Path) -> Path:
    m = _model(f)
    (m / "model.safetensors").unlink()
    here = os.getcwd()
    os.chdir(m)  # AF_UNIX paths are limited to ~107 bytes: bind by relative name
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind("model.safetensors")
    finally:
        os.chdir(here)
    return m


def _bin(state: Any, name: str = "pytorch_model.bin", *, config: bool = True) -> Make:
    """A folder with ``state`` saved by torch.save (a .bin) and, by default, a config."""
    def make(f: Path, _c: Path) -> Path:
        m = f / "m"
        m.mkdir(parents=True, exist_ok=True)
        torch.save(state() if callable(state) else state, m / name)
        if config:
            (m / "config.json").write_text(json.dumps(_config()))
        return m
    return make


def _raw(header: bytes | dict[str, Any], data: bytes = b"") -> Make:
    def make(f: Path, _c: Path) -> Path:
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        f.mkdir(parents=True, exist_ok=True)
        path = f / "model.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        return path
    return make


def _json_file(name: str, text: str, config: dict[str, Any] | None = None) -> Make:
    def make(f: Path, _c: Path) -> Path:
        return _model(f, config, **{name: text})
    return make


# -- the corpus ----------------------------------------------------------------------------------
def _links() -> Iterator[Case]:
    def k(name: str, make: Make, code: str = "unsafe_file", role: Role = "suspect") -> Case:
        return Case("link", name, code, make, role)

    yield k("special_tokens_map.json->/proc/self/environ",
            _link("special_tokens_map.json", lambda f: "/proc/self/environ"))
    yield k("notes.txt->/etc/passwd", _link("notes.txt", lambda f: "/etc/passwd"))
    yield k("tokenizer_config.json->../outside",
            _link("tokenizer_config.json", lambda f: str(_outside(f))))
    yield k("config.json->/proc/self/environ", _link("config.json", lambda f: "/proc/self/environ"))
    yield k("preprocessor_config.json->/dev/zero",
            _link("preprocessor_config.json", lambda f: "/dev/zero"))
    yield k("README.md->/proc/self/environ", _link("README.md", lambda f: "/proc/self/environ"))
    yield k("vocab.txt->relative ../../outside",
            _link("vocab.txt", lambda f: os.path.relpath(_outside(f, "v.txt", OUTSIDE_SECRET),
                                                           f / "m")))
    yield k("folder-link->/etc", _link("extra", lambda f: "/etc"))
    yield k("link-loop a.json<->b.json", _loop)

    def outside_model(f: Path) -> str:
        state, config = _suspect_state()
        return str(_folder(f / "outside", state, config) / "model.safetensors")
    yield k("model.safetensors->../outside", _link("model.safetensors", outside_model))
    yield k("shard->../outside", _shard_out)
    yield k("base: special_tokens_map.json->/proc/self/environ",
            _link("special_tokens_map.json", lambda f: "/proc/self/environ"), role="base")
    yield k("file-source zero.safetensors->/dev/zero", _zero_file)
    yield k("dangling model.safetensors", _link("model.safetensors", lambda f: "gone"),
            "corrupt_checkpoint")


def _loop(f: Path, _c: Path) -> Path:
    m = _model(f)
    (m / "a.json").symlink_to("b.json")
    (m / "b.json").symlink_to("a.json")
    return m


def _shard_out(f: Path, _c: Path) -> Path:
    state, config = _suspect_state()
    out = _folder(f / "outside", state, config)
    m = f / "m"
    m.mkdir(parents=True)
    shard = "model-00001-of-00001.safetensors"
    (m / shard).symlink_to(out / "model.safetensors")
    (m / "config.json").write_text(json.dumps(config))
    (m / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(state, shard)}))
    return m


def _zero_file(f: Path, _c: Path) -> Path:
    f.mkdir(parents=True, exist_ok=True)
    (f / "zero.safetensors").symlink_to("/dev/zero")
    return f / "zero.safetensors"


def _special() -> Iterator[Case]:
    def k(name: str, make: Make, role: Role = "suspect") -> Case:
        return Case("special", name, "unsafe_file", make, role)

    yield k("fifo model.safetensors", _fifo("model.safetensors"))
    yield k("fifo pytorch_model.bin", _fifo_bin)
    yield k("fifo config.json", _fifo("config.json"))
    yield k("fifo tokenizer_config.json", _fifo("tokenizer_config.json"))
    yield k("fifo file-source x.safetensors", _fifo("x.safetensors", in_folder=False))
    yield k("fifo file-source x.bin", _fifo("x.bin", in_folder=False))
    yield k("fifo base model.safetensors", _fifo("model.safetensors"), "base")
    yield k("fifo bv model.safetensors", _fifo("model.safetensors"), "bv")
    yield k("socket model.safetensors", _socket)


def _fifo_bin(f: Path, _c: Path) -> Path:
    m = _model(f)
    (m / "model.safetensors").unlink()
    os.mkfifo(m / "pytorch_model.bin")
    return m


def _alloc() -> Iterator[Case]:
    def k(name: str, make: Make, code: str = "corrupt_checkpoint", role: Role = "suspect"
          ) -> Case:
        return Case("alloc", name, code, make, role)

    yield k("bin stride-0 expand(4e8) (1.6 GB)",
            _bin(lambda: {"vit.w": torch.zeros(1).expand(400_000_000)}))
    yield k("bin as_strided overlap (36 MB over 40 KB)",
            _bin(lambda: {"vit.w": torch.zeros(10_000).as_strided((9_000, 1_000), (1, 1))}))
    yield k("bin 3000 views of one storage",
            _bin(lambda: _views(3000)))
    yield k("bin stride-0 as file source", _bin_file(
        lambda: {"vit.w": torch.zeros(1).expand(100_000_000)}))
    yield k("bin stride-0 as base", _bin(lambda: {"vit.w": torch.zeros(1).expand(10**8)}),
            role="base")
    yield k("header shape [0, 2**70]",
            _raw({"a": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}))
    yield k("header shape [2**40, 2**40, 0]",
            _raw({"a": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}))
    yield k("header shape 64 x 2**10 with a 0",
            _raw({"a": {"dtype": "U8", "shape": [0] + [2**10] * 63, "data_offsets": [0, 0]}}))
    yield k("config.json over 64 MiB (sparse file)", _big_config)


def _views(n: int) -> dict[str, torch.Tensor]:
    shared = torch.zeros(64, 1024)  # 256 KiB, written once by torch.save
    return {f"vit.v{i}": shared[:] for i in range(n)}


def _bin_file(state: Callable[[], Any]) -> Make:
    def make(f: Path, _c: Path) -> Path:
        f.mkdir(parents=True, exist_ok=True)
        torch.save(state(), f / "weights.bin")
        return f / "weights.bin"
    return make


def _big_config(f: Path, _c: Path) -> Path:
    m = _model(f)
    with open(m / "config.json", "r+b") as fh:
        fh.truncate(65 * 2**20)  # holes: no disk used, 65 MiB to read
    return m


def _tensors() -> Iterator[Case]:
    def k(name: str, make: Make, code: str = "unsupported_tensor") -> Case:
        return Case("tensor", name, code, make)

    yield k("bin meta tensor", _bin(lambda: {"vit.w": torch.empty(4, 4, device="meta")}),
            "corrupt_checkpoint")
    yield k("bin sparse COO", _bin(lambda: {"vit.w": torch.eye(4).to_sparse()}))
    yield k("bin sparse CSR", _bin(lambda: {"vit.w": torch.eye(4).to_sparse_csr()}))
    yield k("bin complex64", _bin(lambda: {"vit.w": torch.zeros(4, dtype=torch.complex64)}))
    yield k("bin complex128", _bin(lambda: {"vit.w": torch.zeros(4, dtype=torch.complex128)}))
    yield k("bin qint8", _bin(lambda: {"vit.w": torch.quantize_per_tensor(
        torch.ones(4), 0.1, 0, torch.qint8)}))
    yield k("bin uint16", _bin(lambda: {"vit.w": torch.zeros(4, dtype=torch.uint16)}))
    yield k("bin uint32", _bin(lambda: {"vit.w": torch.zeros(4, dtype=torch.uint32)}))
    yield k("bin uint64", _bin(lambda: {"vit.w": torch.zeros(4, dtype=torch.uint64)}))
    yield k("safetensors U16", _raw({"a": {"dtype": "U16", "shape": [2],
                                           "data_offsets": [0, 4]}}, bytes(4)))
    yield k("safetensors C64", _raw({"a": {"dtype": "C64", "shape": [1],
                                           "data_offsets": [0, 8]}}, bytes(8)))
    yield k("bin lone-surrogate name", _bin(lambda: {"vit.\ud800": torch.zeros(2)}),
            "corrupt_checkpoint")
    yield k("safetensors lone-surrogate name",
            _raw(b'{"vit.\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
            "corrupt_checkpoint")
    yield k("safetensors lone-surrogate metadata",
            _raw(b'{"__metadata__":{"k":"\\udfff"},'
                 b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
            "corrupt_checkpoint")
    yield k("bin 0 bytes", _empty_bin, "corrupt_checkpoint")
    yield k("bin holding a bare tensor", _bin(lambda: torch.zeros(3)), "corrupt_checkpoint")


def _empty_bin(f: Path, _c: Path) -> Path:
    m = f / "m"
    m.mkdir(parents=True)
    (m / "pytorch_model.bin").write_bytes(b"")
    return m


def _configs() -> Iterator[Case]:
    def k(name: str, make: Make, code: str | None = "corrupt_checkpoint") -> Case:
        return Case("config", name, code, make)

    def cfg(name: str, code: str | None = "corrupt_checkpoint", **edits: Any) -> Case:
        return k(name, lambda f, _c: _model(f, _config(**edits)), code)

    yield cfg("bomb hidden 8192 x 48 layers (~38 B parameters)", "model_too_large",
              hidden_size=8192, num_hidden_layers=48, num_attention_heads=64,
              intermediate_size=32768)
    yield cfg("ViT-B config over 0.3 MB of weights (disagrees)", hidden_size=768,
              num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    yield cfg("num_hidden_layers 10**6", num_hidden_layers=10**6)
    yield cfg("image_size a list", image_size=[16, 16])
    yield cfg("num_channels a string", num_channels="1")
    yield cfg("patch_size a float", patch_size=4.0)
    yield cfg("num_labels 0", num_labels=0)
    yield cfg("image_size 10**5 (a 40 GB input)", image_size=10**5)
    yield cfg("image_size 2048 / patch 2 (a million tokens)", image_size=2048, patch_size=2)
    yield cfg("heads do not divide hidden", num_attention_heads=3)
    yield cfg("hidden_size true", hidden_size=True)
    yield cfg("unknown hidden_act", hidden_act="evil_act")
    yield k("NaN in config.json", _json_text('{"layer_norm_eps": NaN}'))
    yield k("Infinity in config.json", _json_text('{"layer_norm_eps": Infinity}'))
    yield k("lone surrogate in config.json", _json_text('{"label": "\\udc80"}'))
    # the base's processor config is the one a scan reads
    yield Case("config", "base preprocessor image_mean strings", "corrupt_checkpoint",
               _json_file("preprocessor_config.json", json.dumps({"image_mean": ["a", "b"]})),
               "base")
    yield Case("config", "base preprocessor image_std zero", "corrupt_checkpoint",
               _json_file("preprocessor_config.json", json.dumps({"image_std": [0.0]})), "base")
    yield k("convnext depths 10**6", lambda f, _c: _model(f, {
        "model_type": "convnext", "architectures": ["ConvNextForImageClassification"],
        "depths": [10**6, 1, 1, 1], "hidden_sizes": [8, 8, 8, 8]}))
    yield k("clip vision hidden 10**5", lambda f, _c: _model(f, {
        "model_type": "clip_vision_model", "hidden_size": 10**5, "num_attention_heads": 2}))
    # neutralised, not refused: our attention implementation and float32, whatever they say
    yield cfg("attn_implementation = a hub kernel repo", None,
              attn_implementation="kernels-community/flash-attn")
    yield cfg("_attn_implementation = flash_attention_2", None,
              _attn_implementation="flash_attention_2")
    yield cfg("dtype bfloat16", None, dtype="bfloat16", torch_dtype="bfloat16")


def _json_text(edit: str) -> Make:
    """config.json with the raw JSON text ``edit``'s keys spliced in (non-standard JSON)."""
    def make(f: Path, _c: Path) -> Path:
        m = _model(f)
        text = json.dumps(_config())
        (m / "config.json").write_text(edit[:-1] + ", " + text[1:])
        return m
    return make


def _remote() -> Iterator[Case]:
    def k(name: str, make: Make, role: Role = "suspect") -> Case:
        return Case("remote", name, "unsafe_format", make, role)

    evil = {"AutoModel": "modeling_evil.EvilModel"}
    yield k("auto_map in a nested vision_config", lambda f, _c: _model(f, _config(
        vision_config={"auto_map": evil})))
    yield k("auto_map in a list", lambda f, _c: _model(f, _config(extra=[{"auto_map": evil}])))
    yield k("trust_remote_code in text_config", lambda f, _c: _model(f, _config(
        text_config={"trust_remote_code": True})))
    yield k("auto_map spelled \\u0061uto_map", _json_text(
        '{"\\u0061uto_map": {"AutoModel": "m.Evil"}}'))
    for name in ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        yield k(f"auto_map in {name}", _json_file(name, json.dumps({"auto_map": evil})))
    yield k("auto_map in the base's tokenizer_config.json",
            _json_file("tokenizer_config.json", json.dumps({"auto_map": evil})), "base")
    yield k("pickle payload in the base's pytorch_model.bin", _payload_bin, "base")
    yield k("pickle payload as the given BV", _payload_bin, "bv")


def _payload_bin(f: Path, canary: Path) -> Path:
    m = f / "m"
    m.mkdir(parents=True)
    torch.save({"vit.w": torch.zeros(2), "x": Payload(canary)}, m / "pytorch_model.bin")
    return m


def _archives() -> Iterator[Case]:
    def k(name: str, make: Callable[[Path], Path]) -> Case:
        return Case("archive", name, "unsafe_archive", lambda f, _c: make(f))

    deep = "m/" + "/".join(["d" * 200] * 25) + "/model.safetensors"  # 5 KB > PATH_MAX
    yield k("zip member path over PATH_MAX", lambda f: _zip(f, {deep: b"x"}))
    yield k("tar member path over PATH_MAX", lambda f: _tar(f, deep))
    yield k("zip 3000 folders deep", lambda f: _zip(f, {"a/" * 3000 + "x": b"x"}))
    yield k("zip FIFO member", lambda f: _zip(f, {"m/model.safetensors": b""}, mode=0o010644))
    yield k("zip symlink special_tokens_map.json", lambda f: _zip(
        f, {"m/special_tokens_map.json": b"/proc/self/environ"}, mode=0o120777))


def _zip(f: Path, members: dict[str, bytes], mode: int = 0o100644) -> Path:
    f.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(f / "upload.zip", "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, data)
    return f / "upload.zip"


def _tar(f: Path, name: str) -> Path:
    import tarfile
    f.mkdir(parents=True, exist_ok=True)
    with tarfile.open(f / "upload.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo(name)
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    return f / "upload.tar"


def _outputs() -> Iterator[Case]:
    def k(name: str, make: Make, lam: float = LAMBDA) -> Case:
        return Case("output", name, "invalid_weights", make, "bv", lam)

    def bv(fill: float) -> Make:
        def make(f: Path, _c: Path) -> Path:
            base_state, _ = vit(0)
            big = {k: torch.full_like(v, fill) for k, v in base_state.items()
                   if k.startswith("vit.")}
            return _folder(f / "bv", big, None)
        return make
    yield k("BV 1e37 x λ 100 overflows float32 (output -inf)", bv(1e37), 100.0)
    yield k("BV holds NaN", bv(float("nan")))


def corpus() -> list[Case]:
    """Every case, in a stable order."""
    return [*_links(), *_special(), *_alloc(), *_tensors(), *_configs(), *_remote(),
            *_archives(), *_outputs()]


# -- running a case ------------------------------------------------------------------------------
@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """TimeoutError in this (main) thread after ``seconds``: a blocked open() is interrupted."""
    def fire(_sig: int, _frame: Any) -> None:
        raise TimeoutError(f"the case ran past {seconds} s: a hang")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def canary_env(work: Path) -> Iterator[dict[str, str]]:
    """The environment a case runs in: the canary token, caches inside ``work``, the CPU."""
    env = {"HF_TOKEN": CANARY, "MERGESHIELD_HF_TOKEN": CANARY, "HF_HUB_OFFLINE": "1",
           "MERGESHIELD_CACHE_DIR": str(work / "cache"), "MERGESHIELD_DEVICE": "cpu",
           "HF_HOME": str(work / "cache" / "hf")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _inputs(case: Case, work: Path, fx: Fixtures) -> tuple[dict[str, str], Path] | str:
    """(suspect/base/bv paths, the case's input), or the code an archive was refused with."""
    src = case.make(work / "in", work / "canary")
    if src.is_file() and not src.is_symlink() and archives.is_archive(src):
        try:
            src = archives.unpack(src, work / "unpacked", LIMITS)
        except MergeShieldError as exc:
            return exc.code
    roles = {"suspect": str(fx.suspect), "base": str(fx.base), "bv": str(fx.bv)}
    roles[case.role] = str(src)
    return roles, src


def _judge(outcome: Outcome, work: Path, texts: list[str], error: str = "") -> Outcome:
    """Fill in what ran, what was written where it may not be, and which outputs leak: a
    secret anywhere, or (in the error) a path of the machine rather than the user's file."""
    outcome.ran = (work / "canary").exists()
    allowed = ("in", "out", "cache", "unpacked")
    for path in work.rglob("*"):
        rel = path.relative_to(work)
        if rel.parts[0] not in allowed and not path.is_dir() and rel.parts[0] != "canary":
            outcome.stray.append(str(rel))
    secrets = (CANARY, OUTSIDE_SECRET, "root:x:0:0")
    for name in ("out", "cache"):
        for path in (work / name).rglob("*") if (work / name).exists() else ():
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                if any(s.encode() in data for s in secrets):
                    outcome.leaked.append(str(path.relative_to(work)))
    for i, text in enumerate([*texts, error]):
        if any(s in text for s in secrets):
            outcome.leaked.append(f"output {i}")
    if str(work) in error:
        outcome.leaked.append("a local path in the error")
    return outcome


def run_library(case: Case, work: Path, fx: Fixtures) -> Outcome:
    """``case`` through ``pipeline.scan`` under the deadline and the canary environment. An
    exception that is not a MergeShieldError propagates: that is a bug."""
    work.mkdir(parents=True, exist_ok=True)
    with canary_env(work), _deadline(CASE_TIMEOUT_S):
        got = _inputs(case, work, fx)
        if isinstance(got, str):
            return _judge(Outcome(got), work, [])
        roles, _src = got
        request = ScanRequest(suspect=roles["suspect"], base=roles["base"], bv=roles["bv"],
                              fixed_lambda=case.lam, probes=False, inversion=False)
        ctx = ScanContext(out_dir=work / "out", cache_dir=work / "cache", device="cpu",
                          local_files_only=True, token=CANARY)
        try:
            report = scan(request, ctx)
        except MergeShieldError as exc:
            text = json.dumps(exc.to_dict(), default=str)
            return _judge(Outcome(exc.code, message=exc.message), work, [], text)
    return _judge(Outcome(None), work, [report.model_dump_json()])


def cli_args(roles: dict[str, str], out: Path, lam: float = LAMBDA) -> list[str]:
    return ["scan", roles["suspect"], "--base", roles["base"], "--bv", roles["bv"],
            "--lambda", str(lam), "--out", str(out), "--no-probes", "--no-inversion",
            "--offline", "--format", "json"]


def run_cli(case: Case, work: Path, fx: Fixtures) -> Outcome:
    """``case`` through ``mergeshield.cli.main`` in this process: exit code, stdout, stderr."""
    from mergeshield.cli import main

    work.mkdir(parents=True, exist_ok=True)
    with canary_env(work), _deadline(CASE_TIMEOUT_S):
        got = _inputs(case, work, fx)
        if isinstance(got, str):  # the CLI takes folders: an archive is unpacked first
            return _judge(Outcome(got), work, [])
        roles, _src = got
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(cli_args(roles, work / "out", case.lam))
    return judge_cli(code, out.getvalue(), err.getvalue(), work)


def judge_cli(exit_code: int, stdout: str, stderr: str, work: Path) -> Outcome:
    """An Outcome from a CLI run: the code of its ``{"error": ...}`` line on stderr."""
    error: dict[str, Any] = {}
    for line in stderr.splitlines():
        if line.startswith('{"error"'):
            error = json.loads(line)["error"]
    outcome = Outcome(error.get("code"), exit=exit_code, message=str(error.get("message", "")),
                      output=stdout + stderr, stdout=stdout)
    return _judge(outcome, work, [stdout, stderr], json.dumps(error))
