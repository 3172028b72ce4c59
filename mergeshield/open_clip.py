"""open_clip checkpoints (``open_clip_config.json`` + ``open_clip_model.safetensors``), converted
once per content hash to the Hugging Face CLIP layout under the cache and then scanned like any
folder, as a ``.bin`` or a LoRA adapter is. open_clip is never imported: its files are data.

The mapping is the one transformers' ``convert_clip_original_pytorch_to_hf.py`` applies to
OpenAI's CLIP, whose ViT layout open_clip keeps: each fused ``attn.in_proj_*`` (3·width rows) is
split into q, k, v; ``conv1`` → ``patch_embedding``, ``ln_pre`` → ``pre_layrnorm`` (HF's
spelling), ``ln_post`` → ``post_layernorm``, ``ln_final`` → ``final_layer_norm``; ``visual.proj``
and ``text_projection`` (width × embed) are transposed into linear weights (embed × width). Only
``visual.*``: a ``CLIPVisionModelWithProjection``; with the text tower: a ``CLIPModel``.

Only what maps exactly is read (:mod:`mergeshield.open_clip_config`); weights the config does
not describe (a missing, extra or mis-shaped tensor) are ``corrupt_checkpoint``. The pickled
``.pt`` / ``.bin`` forms are refused (``unsafe_format``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergeshield.checkpoint_writer import save_checkpoint
from mergeshield.disk import built_once, ensure_room, private_dir
from mergeshield.errors import (
    CorruptCheckpointError,
    ModelTooLargeError,
    NothingScannableError,
    UnsafeFormatError,
    UnsupportedModelError,
    mismatches,
)
from mergeshield.model_folder import allowed_root, read_json_file, regular_inside
from mergeshield.models import MAX_PARAMETERS, check_config
from mergeshield.models.config_guard import count_on_meta
from mergeshield.open_clip_config import CONFIG, OpenClipConfig
from mergeshield.safetensors_io import TensorInfo, atomic_write_text, sha256_file

__all__ = ["CONFIG", "CONVERT_VERSION", "WEIGHTS", "convert", "is_lone_weights", "is_open_clip",
           "tensor_map", "weights_file"]

WEIGHTS = "open_clip_model.safetensors"
CONVERT_VERSION = "1"  # bump when the mapping changes: cached conversions are redone
# copied beside the converted weights: the tokenizer (the zero-shot head of a base needs it) and
# the model card (its base_model is checked against the given base)
COPIED = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
          "special_tokens_map.json", "added_tokens.json", "README.md")
_WB = ("weight", "bias")
# open_clip block → Hugging Face encoder layer, besides the fused attention input projection
_BLOCK = (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
          ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))


def is_open_clip(root: Path) -> bool:
    """An open_clip folder: its config and no Hugging Face ``config.json`` (a repo with both,
    as many laion repos are, is read in its Hugging Face layout)."""
    return (root / CONFIG).is_file() and not os.path.lexists(root / "config.json")


def is_lone_weights(path: Path) -> bool:
    """An ``open_clip_model.safetensors`` named alone, its config beside it."""
    return path.name == WEIGHTS and (path.parent / CONFIG).is_file()


def weights_file(root: Path) -> Path:
    """The folder's ``open_clip_model.safetensors``; its pickled forms are refused."""
    if (root / WEIGHTS).is_file():
        return root / WEIGHTS
    names = sorted(p.name for p in root.iterdir())
    pickles = [n for n in names if n.lower().endswith((".pt", ".pth", ".bin"))]
    if pickles:
        raise UnsafeFormatError(
            f"{pickles[0]}: refused, open_clip's pickled weights are not read (a .pt training "
            f"checkpoint can run code when loaded); save them as {WEIGHTS} (open_clip's "
            "push_to_hf_hub(..., safe_serialization=True) does)", details={"file": pickles[0]})
    raise NothingScannableError(f"the open_clip folder holds no {WEIGHTS}; point to the folder "
                                "with the weights", details={"files": names[:20]})


@dataclass(frozen=True)
class Source:
    """Where one Hugging Face tensor comes from in the open_clip state dict."""

    key: str
    part: int | None = None  # which third (q, k, v) of a fused in_proj
    transpose: bool = False  # a (width, embed) projection → an (embed, width) linear weight

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...] | None:
        """The Hugging Face shape made from a stored shape (None: it cannot make one)."""
        if self.part is not None:
            return (stored[0] // 3, *stored[1:]) if stored and stored[0] % 3 == 0 else None
        if self.transpose:
            return (stored[1], stored[0]) if len(stored) == 2 else None
        return stored

    def stored(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The stored shape that makes the Hugging Face ``shape``."""
        if self.part is not None:
            return (3 * shape[0], *shape[1:])
        return (shape[1], shape[0]) if self.transpose else shape

    def take(self, tensor: Tensor) -> Tensor:
        if self.part is not None:
            return tensor.chunk(3)[self.part].contiguous()
        return tensor.T.contiguous() if self.transpose else tensor


def _blocks(src: str, dst: str, layers: int) -> dict[str, Source]:
    out: dict[str, Source] = {}
    for i in range(layers):
        s, d = f"{src}transformer.resblocks.{i}.", f"{dst}encoder.layers.{i}."
        for kind in _WB:
            for part, qkv in enumerate("qkv"):
                out[f"{d}self_attn.{qkv}_proj.{kind}"] = Source(f"{s}attn.in_proj_{kind}", part)
            out.update({f"{d}{b}.{kind}": Source(f"{s}{a}.{kind}") for a, b in _BLOCK})
    return out


def tensor_map(vision_layers: int, text_layers: int | None) -> dict[str, Source]:
    """Hugging Face CLIP tensor name → its open_clip source (``text_layers`` None: no text
    tower), in an order that reads each fused tensor for three names in a row."""
    out = {"vision_model.embeddings.class_embedding": Source("visual.class_embedding"),
           "vision_model.embeddings.patch_embedding.weight": Source("visual.conv1.weight"),
           "vision_model.embeddings.position_embedding.weight":
               Source("visual.positional_embedding")}
    out.update({f"vision_model.pre_layrnorm.{k}": Source(f"visual.ln_pre.{k}") for k in _WB})
    out.update(_blocks("visual.", "vision_model.", vision_layers))
    out.update({f"vision_model.post_layernorm.{k}": Source(f"visual.ln_post.{k}") for k in _WB})
    out["visual_projection.weight"] = Source("visual.proj", transpose=True)
    if text_layers is not None:
        out["text_model.embeddings.token_embedding.weight"] = Source("token_embedding.weight")
        out["text_model.embeddings.position_embedding.weight"] = Source("positional_embedding")
        out.update(_blocks("", "text_model.", text_layers))
        out.update({f"text_model.final_layer_norm.{k}": Source(f"ln_final.{k}") for k in _WB})
        out["text_projection.weight"] = Source("text_projection", transpose=True)
        out["logit_scale"] = Source("logit_scale")
    return out


class Converted(Mapping[str, Tensor]):
    """The open_clip ``tensors`` under Hugging Face names, one tensor made per access (a fused
    in_proj is read once for its q, k and v)."""

    def __init__(self, tensors: Mapping[str, Tensor], mapping: dict[str, Source]) -> None:
        self.tensors, self.mapping = tensors, mapping
        self._last: tuple[str, Tensor] | None = None

    def __getitem__(self, name: str) -> Tensor:
        src = self.mapping[name]
        if self._last is None or self._last[0] != src.key:
            self._last = (src.key, self.tensors[src.key])
        return src.take(self._last[1])

    def __iter__(self) -> Iterator[str]:
        return iter(self.mapping)

    def __len__(self) -> int:
        return len(self.mapping)


def _info(tensors: Mapping[str, Tensor], name: str) -> TensorInfo:
    info = getattr(tensors, "info", None)
    return info(name) if callable(info) else TensorInfo.of(tensors[name])


def check_weights(tensors: Mapping[str, Tensor], mapping: dict[str, Source],
                  expected: Mapping[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    """The Hugging Face specs of the converted tensors, once every open_clip tensor is one the
    config describes, in the shape it describes, and a float; else one listed refusal."""
    if set(mapping) != set(expected):  # the installed transformers names CLIP differently
        raise UnsupportedModelError(
            "this version of transformers lays CLIP out differently from the open_clip mapping "
            f"(e.g. {sorted(set(mapping) ^ set(expected))[:3]}); report it with its version",
            details={"differ": sorted(set(mapping) ^ set(expected))[:50]})
    used = {s.key for s in mapping.values()}
    details: dict[str, list[Any]] = {
        "missing": sorted(used - set(tensors)), "unexpected": sorted(set(tensors) - used),
        "shape": [], "dtype": []}
    specs: dict[str, TensorInfo] = {}
    seen: set[str] = set()
    for name, src in mapping.items():
        if src.key not in tensors:
            continue
        info = _info(tensors, src.key)
        made = src.shape(info.shape)
        if made != expected[name] and src.key not in seen:
            details["shape"].append({"name": src.key, "expected": list(src.stored(expected[name])),
                                     "found": list(info.shape)})
        if not info.dtype.is_floating_point and src.key not in seen:
            details["dtype"].append({"name": src.key, "found": str(info.dtype)})
        seen.add(src.key)
        shape = expected[name]
        specs[name] = TensorInfo(info.dtype, shape, math.prod(shape) * info.dtype.itemsize)
    if any(details.values()):
        raise CorruptCheckpointError(
            f"{WEIGHTS} does not hold the model {CONFIG} describes ({mismatches(details)}); the "
            "config does not belong to these weights, or they are not a CLIP ViT",
            details=details)
    return specs


def expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in the Hugging Face model ``config`` describes (built on meta)."""
    cfg = {k: v for k, v in config.items()
           if k not in ("architectures", "model_type", "mergeshield_open_clip")}

    def build() -> torch.nn.Module:
        # transformers only here, where a model is built: reading and converting weights (the
        # arithmetic of `bv compute`, `merge`) never imports it (tests/mergeshield/test_imports.py)
        from transformers import (
            CLIPConfig,
            CLIPModel,
            CLIPVisionConfig,
            CLIPVisionModelWithProjection,
        )

        model: torch.nn.Module = (
            CLIPModel._from_config(CLIPConfig(**cfg), attn_implementation="eager")
            if config["model_type"] == "clip" else CLIPVisionModelWithProjection._from_config(
                CLIPVisionConfig(**cfg), attn_implementation="eager"))
        return model

    _, model = count_on_meta(build, CONFIG)
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


def _copies(root: Path) -> dict[str, Path]:
    inside = allowed_root(root)
    return {n: root / n for n in COPIED if regular_inside(root / n, inside)}


def convert(root: Path, tensors: Mapping[str, Tensor], *, cache_dir: str | Path | None,
            min_free_bytes: int | None = None, max_parameters: int = MAX_PARAMETERS) -> Path:
    """The Hugging Face CLIP folder made from the open_clip folder ``root`` (whose weights
    ``tensors`` are), written once per content under ``<cache>/mergeshield-open-clip``; the
    conversion must leave ``min_free_bytes`` free (None: no check). Nothing is left behind by a
    refused or failed conversion."""
    spec = OpenClipConfig.read(read_json_file(root / CONFIG))
    copies = _copies(root)
    digest = hashlib.sha256(json.dumps(
        [CONVERT_VERSION, sha256_file(root / WEIGHTS), sha256_file(root / CONFIG),
         [(n, sha256_file(p)) for n, p in copies.items()]]).encode()).hexdigest()
    folder = private_dir(cache_dir, "mergeshield-open-clip") / digest
    if (folder / "config.json").is_file():
        return folder
    has_text = any(not k.startswith("visual.") for k in tensors)
    config = spec.hf_config(has_text) | {
        "mergeshield_open_clip": {"converter": CONVERT_VERSION, "source": digest}}
    elements = sum(math.prod(_info(tensors, k).shape) for k in tensors)
    try:
        check_config(config, weight_elements=elements, max_parameters=max_parameters)
    except (CorruptCheckpointError, ModelTooLargeError) as exc:  # said of the file they gave
        raise type(exc)(f"{CONFIG}, as a Hugging Face config: {exc.message}",
                        details=exc.details) from None
    mapping = tensor_map(spec.vision.layers, spec.text_config()[0].layers if has_text else None)
    specs = check_weights(tensors, mapping, expected_shapes(config))
    if min_free_bytes is not None:
        ensure_room(folder.parent, sum(i.nbytes for i in specs.values()), min_free_bytes,
                    f"converting {WEIGHTS}")
    with built_once(folder, ".converting-") as work:
        save_checkpoint(work, Converted(tensors, mapping), specs=specs, config=config,
                        extra_files=copies, metadata={"format": "pt"})
        atomic_write_text(work / "preprocessor_config.json",
                          json.dumps(spec.processor(), indent=2) + "\n")
    return folder
