"""An untrusted config.json, made safe to build a model from.

Three checks before any model exists: no remote code anywhere (``auto_map`` or
``trust_remote_code`` at any depth, sub-configs included), the fields every family reads have
the right type and a sane range, and the parameter count, counted on PyTorch's ``meta`` device
(shapes only, no memory), is under ``max_parameters`` and agrees with the weights on disk. A model
is then built from a *sanitised* copy: the attention implementation is ours ("sdpa" where the
architecture supports it, else "eager"; a config's ``attn_implementation`` could name a hub
kernel repo to download and run) and the dtype is float32 (the adapters feed float32 pixels).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from mergeshield.errors import CorruptCheckpointError, ModelTooLargeError, UnsafeFormatError

__all__ = ["MAX_PARAMETERS", "attention_for", "attention_lower_bound", "check_fields",
           "check_parameters", "check_size", "count_on_meta", "find_remote_code", "sanitised"]

# Default ceiling on a model's parameters: ViT-g/14 has ~1 B; a 2 B-parameter model needs 8 GB in
# float32 and about four times that while a scan fine-tunes and sweeps. A caller may raise it.
MAX_PARAMETERS = 2_000_000_000
REMOTE_KEYS = ("auto_map", "trust_remote_code")
# Keys never passed on to transformers: remote code, a chosen attention kernel, a dtype, a
# quantiser (each loads or runs code we did not choose, or changes what the adapters feed in).
DROPPED = frozenset({*REMOTE_KEYS, "attn_implementation", "_attn_implementation",
                     "_attn_implementation_internal", "_attn_implementation_autoset",
                     "experts_implementation", "dtype", "torch_dtype", "quantization_config",
                     "use_kernels", "kernel_config", "_name_or_path"})
# an input side: every image is resized to it, so it sets the memory of each forward pass
# (EVA-02 and BEiT classify at 448-560 px)
MAX_IMAGE_SIDE = 2048
MAX_TOKENS = 16384  # (image_size / patch_size)²: attention memory grows with its square
# (lowest, highest) of the integer fields the families read, wherever they appear
INT_FIELDS: dict[str, tuple[int, int]] = {
    "image_size": (1, MAX_IMAGE_SIDE), "patch_size": (1, MAX_IMAGE_SIDE), "num_channels": (1, 64),
    "hidden_size": (1, 65536), "num_hidden_layers": (0, 256), "num_attention_heads": (1, 1024),
    "intermediate_size": (1, 262144), "num_labels": (1, 100_000), "embedding_size": (1, 65536),
    "projection_dim": (1, 65536), "vocab_size": (1, 2**21), "max_position_embeddings": (1, 2**20),
    "encoder_stride": (1, 8192), "embed_dim": (1, 65536), "window_size": (1, 8192),
}
ONLY_INT = frozenset({"hidden_size", "num_hidden_layers", "num_channels", "num_labels"})
LIST_FIELDS: dict[str, tuple[int, int]] = {  # each element's range; at most 16 elements
    "depths": (0, 256), "hidden_sizes": (1, 65536), "num_heads": (1, 1024),
}
MAX_DEPTH = 256  # layers (num_hidden_layers, or the sum of depths) per (sub-)config


def find_remote_code(value: Any, where: str = "") -> str | None:
    """The dotted path of the first ``auto_map`` / ``trust_remote_code`` key at any depth."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if key in REMOTE_KEYS and item not in (None, False, {}, []):
                return path
            if (found := find_remote_code(item, path)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := find_remote_code(item, f"{where}[{i}]")) is not None:
                return found
    return None


def refuse_remote_code(value: Any, file: str) -> None:
    """UnsafeFormatError when ``value`` (a parsed JSON file) asks for custom Python code."""
    if (path := find_remote_code(value)) is not None:
        raise UnsafeFormatError(
            f"{file}: refused, {path} asks for custom Python code (auto_map / "
            "trust_remote_code), which MergeShield never runs; use a checkpoint of an "
            "architecture built into transformers", details={"file": file, "key": path})


def sanitised(config: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy without the keys in ``DROPPED``, at every depth."""
    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items() if k not in DROPPED}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value
    out: dict[str, Any] = clean(config)
    return out


def _bad(file: str, where: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{file}: {where} {what}; fix the config or re-export the model",
                                  details={"file": file, "field": where})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_fields(config: Mapping[str, Any], file: str = "config.json", where: str = "") -> None:
    """Types and ranges of the fields a model is built from, in every sub-config."""
    for key, value in config.items():
        path = f"{where}.{key}" if where else str(key)
        if isinstance(value, Mapping):
            check_fields(value, file, path)
        elif key in INT_FIELDS and value is not None:
            lo, hi = INT_FIELDS[key]
            # some architectures take a list (LeViT's heads per stage, a (height, width) size)
            items = value if isinstance(value, list) and key not in ONLY_INT else [value]
            if not 0 < len(items) <= 16 or not all(_is_int(v) and lo <= v <= hi for v in items):
                raise _bad(file, path, f"must be an integer from {lo} to {hi}, not "
                                       f"{str(value)[:40]!r}")
        elif key in LIST_FIELDS and value is not None:
            lo, hi = LIST_FIELDS[key]
            if (not isinstance(value, list) or not 0 < len(value) <= 16
                    or not all(_is_int(v) and lo <= v <= hi for v in value)):
                raise _bad(file, path, f"must be a list of 1 to 16 integers from {lo} to {hi}")
    depth = config.get("num_hidden_layers") or 0
    if isinstance(config.get("depths"), list):
        depth = max(depth, sum(config["depths"]))
    if depth > MAX_DEPTH:
        raise _bad(file, where or "the model", f"has {depth} layers, more than {MAX_DEPTH}")
    side, patch = config.get("image_size"), config.get("patch_size")
    if isinstance(side, int) and isinstance(patch, int) and (side // patch) ** 2 > MAX_TOKENS:
        raise _bad(file, where or "the model", f"image_size {side} / patch_size {patch} makes "
                                                f"{(side // patch) ** 2} tokens per image, more "
                                                f"than {MAX_TOKENS}")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if (isinstance(hidden, int) and isinstance(heads, int) and heads > 0
            and "head_dim" not in config and hidden % heads):
        raise _bad(file, where or "the model", f"hidden_size {hidden} is not a multiple of "
                                                f"num_attention_heads {heads}")


def attention_lower_bound(config: Mapping[str, Any]) -> int:
    """A lower bound on the parameters, from arithmetic alone: each attention layer holds at
    least its four hidden × hidden projections (q, k, v, o), in every sub-config. A config bomb
    (hidden 8192 × 48 layers) is refused by this before even a meta build is tried."""
    total = 0
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    if (isinstance(hidden, int) and isinstance(layers, int)
            and config.get("num_attention_heads") is not None):
        total += 4 * hidden * hidden * layers
    return total + sum(attention_lower_bound(v) for v in config.values()
                       if isinstance(v, Mapping))


def check_size(config: Mapping[str, Any], max_parameters: int, file: str = "config.json") -> None:
    """Fields checked (``check_fields``) and the arithmetic lower bound under the limit."""
    check_fields(config, file)
    bound = attention_lower_bound(config)
    if bound > max_parameters:
        raise ModelTooLargeError(
            f"{file} describes a model of at least {bound:,} parameters, over the limit of "
            f"{max_parameters:,}; scan a smaller model or raise max_parameters",
            details={"file": file, "parameters_at_least": bound,
                     "max_parameters": max_parameters})


def count_on_meta(build: Callable[[], nn.Module], file: str = "config.json"
                  ) -> tuple[int, nn.Module]:
    """(parameters, the module) of ``build()`` run on the meta device: shapes, no memory. A
    config transformers cannot build from is a corrupt checkpoint, not a traceback."""
    try:
        with torch.device("meta"):
            model = build()
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError,
            AssertionError, ZeroDivisionError, OverflowError, NotImplementedError) as exc:
        raise CorruptCheckpointError(
            f"{file}: no model can be built from this config ({type(exc).__name__}: "
            f"{str(exc)[:200]}); fix the config or re-export the model",
            details={"file": file, "reason": type(exc).__name__}) from None
    return sum(p.numel() for p in model.parameters()), model


def check_parameters(count: int, *, backbone: int, weight_elements: int | None,
                     max_parameters: int, file: str = "config.json") -> None:
    """Refuse a model over ``max_parameters``, or whose config describes more backbone
    parameters than the weights hold (a small upload asking for a huge model)."""
    if count > max_parameters:
        raise ModelTooLargeError(
            f"{file} describes a model of {count:,} parameters, over the limit of "
            f"{max_parameters:,}; scan a smaller model or raise max_parameters",
            details={"file": file, "parameters": count, "max_parameters": max_parameters})
    if weight_elements is not None and backbone > weight_elements:
        raise CorruptCheckpointError(
            f"{file} describes a backbone of {backbone:,} parameters but the weights hold only "
            f"{weight_elements:,} values: the config does not belong to these weights",
            details={"file": file, "parameters": backbone, "weight_elements": weight_elements})


def attention_for(model_class: Any) -> str:
    """Our attention implementation for ``model_class``: SDPA where supported, else eager."""
    cls = model_class[0] if isinstance(model_class, tuple) else model_class
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
