"""An ``open_clip_config.json`` read as data, and the Hugging Face CLIP config that computes the
same function.

``model_cfg`` (``embed_dim``, ``quick_gelu``, ``vision_cfg``, ``text_cfg``) is read with open_clip's
own defaults (its ``CLIPVisionCfg`` / ``CLIPTextCfg`` dataclasses); ``preprocess_cfg`` gives the
normalisation. ``quick_gelu`` decides ``hidden_act`` in both towers (QuickGELU, or torch's exact
``nn.GELU``, which is transformers' ``"gelu"``). An option is read only where its value keeps a
plain CLIP ViT and CLIP's own text transformer: a ModifiedResNet, timm or Hugging Face tower,
layer scale, attentional or average pooling, QK norm and the like are refused as
``unsupported_model``, never mapped approximately; an option this reader does not know is
accepted only when it is off (null or false).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mergeshield.errors import CorruptCheckpointError, UnsupportedModelError
from mergeshield.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = ["CONFIG", "OpenClipConfig", "Tower"]

CONFIG = "open_clip_config.json"
_OFF = (None, False)
# An option's accepted values; None: any (training only, or read only with an option refused
# here). open_clip's field names and defaults, e.g. ``CLIPVisionCfg.pool_type = 'tok'``.
_CUSTOM_BLOCK: dict[str, tuple[Any, ...] | None] = dict.fromkeys(
    ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
     "scale_fc"), _OFF)
_VISION: dict[str, tuple[Any, ...] | None] = {
    "patch_dropout": None, "attn_pooler_queries": None, "attn_pooler_heads": None,
    "output_tokens": None, "image_interpolation": None, "image_resize_mode": None,
    "timm_model_pretrained": None, "timm_pool": None, "timm_proj": None, "timm_proj_bias": None,
    "timm_drop": None, "timm_drop_path": None, "timm_model_kwargs": None,
    # with class-token pooling, LayerNorm of the pooled token is the pooled token of LayerNorm
    "final_ln_after_pool": None,
    "timm_model_name": (None, ""), "image_seq_len": (None,), "ls_init_value": (None,),
    "attentional_pool": _OFF, "no_ln_pre": _OFF, "pos_embed_type": ("learnable", None),
    "pool_type": ("tok", None), "act_kwargs": (None, {}), "block_type": (None, "default"),
    "global_average_pool": _OFF, "input_patchnorm": _OFF, **_CUSTOM_BLOCK,
}
_TEXT: dict[str, tuple[Any, ...] | None] = {
    # the tokenizer is the files beside the weights, whatever open_clip would load
    "hf_tokenizer_name": None, "tokenizer_mode": None, "tokenizer_kwargs": None,
    "tokenizer_type": None, "tiktoken_name": None, "pad_id": None, "bos_id": None,
    "output_tokens": None, "use_pad_mask": None, "correct_cls_mask": None,
    "hf_model_pretrained": None, "hf_proj_type": None, "hf_pooler_type": None,
    "hf_model_config": None,
    "final_ln_after_pool": None,  # token pooling: LayerNorm before or after it is the same
    "text_arch": ("clip", None), "variable_text": _OFF, "hf_model_name": (None, ""),
    "ls_init_value": (None,), "embed_cls": _OFF, "no_causal_mask": _OFF,
    "proj_bias": _OFF, "proj_type": ("linear", None), "act_kwargs": (None, {}),
    "block_type": (None, "default"), **_CUSTOM_BLOCK,
    # settings of open_clip's modern text tower: only their defaults leave CLIP's
    "attention_mode": ("causal", None), "pos_embed": ("rope", None),
    "rope_temperature": (10000.0, None), "mlp_type": ("swiglu", None), "norm_type": (None,),
    "norm_eps": (1e-6, None), "attn_gated": _OFF, "pre_norm": _OFF,
    "norm_placement": ("pre", None), "zero_init_residual": _OFF, "reg_tokens": (0, None),
    "value_residual": _OFF, "attention_bias": (None,), "mlp_bias": (None,), "gate_bias": (None,),
}
_MODEL: dict[str, tuple[Any, ...] | None] = {
    "init_logit_scale": None, "cast_dtype": None, "output_dict": None,  # init / runtime only
    "init_logit_bias": (None,), "nonscalar_logit_scale": _OFF, "custom_text": _OFF,
}
_WHY = {"timm_model_name": "a timm image tower", "hf_model_name": "a Hugging Face text tower",
        "text_arch": "open_clip's modern text tower", "ls_init_value": "layer scale",
        "custom_text": "a CustomTextCLIP", "init_logit_bias": "a SigLIP logit bias",
        "multimodal_cfg": "a CoCa model", "attentional_pool": "an attentional pooler"}
_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL's codes, as image processors say


def _corrupt(where: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{CONFIG}: {where} {what}; fix the config or re-export the "
                                  "model", details={"file": CONFIG, "field": where})


def _unsupported(where: str, value: Any, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{CONFIG}: {where} = {str(value)[:60]!r} ({why}) is not converted: only a plain CLIP "
        "ViT image tower and CLIP's own text transformer map exactly to Hugging Face CLIP; "
        "convert the model with its own tools and scan the Hugging Face folder",
        details={"file": CONFIG, "field": where})


def _refuse_options(cfg: Mapping[str, Any], rules: Mapping[str, tuple[Any, ...] | None],
                    read: set[str], where: str) -> None:
    for key, value in cfg.items():
        allowed = rules.get(key, _OFF)
        if key not in read and allowed is not None and value not in allowed:
            raise _unsupported(f"{where}.{key}", value, _WHY.get(key, "changes the model"))


def _section(cfg: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise _corrupt(f"{where}.{key}", "must be an object")
    return value


def _int(cfg: Mapping[str, Any], key: str, default: int | None, where: str,
         least: int = 1) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise _corrupt(f"{where}.{key}", "is missing")
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise _corrupt(f"{where}.{key}", f"must be an integer of at least {least}, not "
                                         f"{str(value)[:40]!r}")
    return value


def _positive(cfg: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = cfg.get(key, default)
    if (not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value)
            or value <= 0):
        raise _corrupt(f"{where}.{key}", f"must be a positive number, not {str(value)[:40]!r}")
    return float(value)


def _square(cfg: Mapping[str, Any], key: str, default: int, where: str) -> int:
    """An int, or a square (h, w) pair: Hugging Face CLIP takes square images and patches."""
    value = cfg.get(key, default)
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        return _int({key: value[0]}, key, None, where)
    if isinstance(value, list):
        raise _unsupported(f"{where}.{key}", value, "not square")
    return _int(cfg, key, default, where)


def _channels(value: Any, where: str) -> tuple[float, ...]:
    if not (isinstance(value, list) and len(value) == 3 and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in value)):
        raise _corrupt(where, "must be a list of 3 finite numbers (R, G, B)")
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class Tower:
    """One transformer tower, sized as a Hugging Face CLIP sub-config needs it."""

    layers: int
    width: int
    heads: int
    intermediate: int  # int(width · mlp_ratio), as open_clip sizes its MLP
    eps: float  # LayerNorm epsilon: torch's 1e-5 unless norm_kwargs sets it

    @classmethod
    def read(cls, cfg: Mapping[str, Any], where: str, width: int, heads: int) -> Tower:
        kwargs = cfg.get("norm_kwargs") or {}
        if not isinstance(kwargs, dict) or set(kwargs) - {"eps"}:
            raise _unsupported(f"{where}.norm_kwargs", kwargs, "a LayerNorm other than eps")
        ratio = _positive(cfg, "mlp_ratio", 4.0, where)
        if int(width * ratio) < 1:
            raise _corrupt(f"{where}.mlp_ratio", "makes an MLP of no units")
        return cls(_int(cfg, "layers", 12, where), width, heads, int(width * ratio),
                   _positive(kwargs, "eps", 1e-5, f"{where}.norm_kwargs"))

    def hf(self, act: str, embed_dim: int) -> dict[str, Any]:
        return {"hidden_size": self.width, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "hidden_act": act, "layer_norm_eps": self.eps, "projection_dim": embed_dim}


@dataclass(frozen=True)
class OpenClipConfig:
    """What the config says, checked; the text tower is read only when the weights hold one."""

    embed_dim: int
    act: str  # both towers' hidden_act: "quick_gelu" or "gelu"
    vision: Tower
    image_size: int
    patch_size: int
    text_cfg: dict[str, Any]  # checked by ``text_config`` only where the weights hold a text tower
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: int

    @classmethod
    def read(cls, raw: Mapping[str, Any] | None) -> OpenClipConfig:
        """The checked config of the parsed ``open_clip_config.json`` ``raw``."""
        if raw is None or not isinstance(raw.get("model_cfg"), dict):
            raise _corrupt("model_cfg", "is missing or not an object")
        model = raw["model_cfg"]
        _refuse_options(model, _MODEL, {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"},
                        "model_cfg")
        where = "model_cfg.vision_cfg"
        vision = _section(model, "vision_cfg", "model_cfg")
        if isinstance(vision.get("layers"), list):
            raise _unsupported(f"{where}.layers", vision["layers"], "a ModifiedResNet, not a ViT")
        _refuse_options(vision, _VISION, {"layers", "width", "head_width", "mlp_ratio",
                                          "patch_size", "image_size", "norm_kwargs",
                                          "image_mean", "image_std"}, where)
        quick = model.get("quick_gelu", False)
        if quick not in _OFF + (True,):
            raise _corrupt("model_cfg.quick_gelu", "must be true or false")
        width = _int(vision, "width", 768, where)
        heads = width // _int(vision, "head_width", 64, where)  # open_clip's own rounding
        if heads < 1:
            raise _corrupt(f"{where}.head_width", f"is wider than the tower ({width})")
        pre = _section(raw, "preprocess_cfg", "the file")
        if pre.get("mode", "RGB") != "RGB":
            raise _unsupported("preprocess_cfg.mode", pre["mode"], "not RGB")
        mean = pre.get("mean", vision.get("image_mean")) or list(OPENAI_CLIP_MEAN)
        std = pre.get("std", vision.get("image_std")) or list(OPENAI_CLIP_STD)
        if any(s <= 0 for s in _channels(std, "preprocess_cfg.std")):
            raise _corrupt("preprocess_cfg.std", "must be positive")
        return cls(embed_dim=_int(model, "embed_dim", None, "model_cfg"),
                   act="quick_gelu" if quick else "gelu",
                   vision=Tower.read(vision, where, width, heads),
                   image_size=_square(vision, "image_size", 224, where),
                   patch_size=_square(vision, "patch_size", 16, where),
                   text_cfg=_section(model, "text_cfg", "model_cfg"),
                   mean=_channels(mean, "preprocess_cfg.mean"),
                   std=_channels(std, "preprocess_cfg.std"),
                   resample=_RESAMPLE.get(str(pre.get("interpolation", "bicubic")), 3))

    def text_config(self) -> tuple[Tower, dict[str, Any]]:
        """The text tower and its Hugging Face text_config; refused where it is not CLIP's."""
        cfg, where = self.text_cfg, "model_cfg.text_cfg"
        _refuse_options(cfg, _TEXT, {"context_length", "vocab_size", "width", "heads", "layers",
                                     "mlp_ratio", "norm_kwargs", "pool_type", "eos_id"}, where)
        width, heads = _int(cfg, "width", 512, where), _int(cfg, "heads", 8, where)
        if width % heads:
            raise _corrupt(f"{where}.heads", f"does not divide width {width}")
        pool = cfg.get("pool_type", "argmax")
        if pool in ("argmax", None):
            # transformers pools at input_ids.argmax() when eos_token_id is 2 (its rule for
            # the first converted OpenAI checkpoints): open_clip's argmax pooling, exactly
            eos = 2
        elif pool == "eos":  # both pool at the first eos_id, unless it is 2
            eos = _int(cfg, "eos_id", None, where, least=0)
            if eos == 2:
                raise _unsupported(f"{where}.eos_id", eos, "transformers pools id 2 by argmax")
        else:
            raise _unsupported(f"{where}.pool_type", pool, "pools another token")
        tower = Tower.read(cfg, where, width, heads)
        # bos is never read by the model; transformers' default (49406) is outside small vocabs
        return tower, {**tower.hf(self.act, self.embed_dim), "eos_token_id": eos,
                       "bos_token_id": None,
                       "vocab_size": _int(cfg, "vocab_size", 49408, where),
                       "max_position_embeddings": _int(cfg, "context_length", 77, where)}

    def hf_config(self, has_text: bool) -> dict[str, Any]:
        """config.json of a ``CLIPModel`` (``has_text``) or a ``CLIPVisionModelWithProjection``."""
        vision = {"image_size": self.image_size, "patch_size": self.patch_size,
                  "num_channels": 3, **self.vision.hf(self.act, self.embed_dim)}
        if not has_text:
            return {"architectures": ["CLIPVisionModelWithProjection"],
                    "model_type": "clip_vision_model", **vision}
        return {"architectures": ["CLIPModel"], "model_type": "clip",
                "projection_dim": self.embed_dim, "text_config": self.text_config()[1],
                "vision_config": vision}

    def processor(self) -> dict[str, Any]:
        """preprocessor_config.json: the normalisation the model was trained with."""
        side = self.image_size
        return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                "size": {"shortest_edge": side}, "resample": self.resample,
                "do_center_crop": True, "crop_size": {"height": side, "width": side},
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": list(self.mean), "image_std": list(self.std),
                "do_convert_rgb": True}
