"""open_clip's layout, written and run in test code, to check ``mergeshield.open_clip`` against.

- ``to_open_clip``: Hugging Face CLIP tensors under open_clip's names, the inverse of the mapping
  transformers' ``convert_clip_original_pytorch_to_hf.py`` applies (q, k, v concatenated into
  ``in_proj``, projections transposed back to width × embed).
- ``model_cfg`` / ``write_open_clip``: the ``open_clip_config.json`` of a Hugging Face config,
  and a folder as open_clip's ``push_to_hf_hub`` leaves it (config, safetensors, tokenizer).
- ``image_features`` / ``text_features``: open_clip's forward pass (``VisionTransformer`` and
  ``encode_text``) written from its source over the open_clip tensors, with torch's own
  ``multi_head_attention_forward`` reading the fused ``in_proj`` as ``nn.MultiheadAttention``
  does: an implementation that shares no code or key mapping with the reader under test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from torch.nn import functional as F  # noqa: N812
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

_NAMES = {"vision_model.embeddings.class_embedding": "visual.class_embedding",
          "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
          "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
          "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
          "text_model.embeddings.position_embedding.weight": "positional_embedding",
          "logit_scale": "logit_scale"}
_NORMS = {"vision_model.pre_layrnorm": "visual.ln_pre", "vision_model.post_layernorm":
          "visual.ln_post", "text_model.final_layer_norm": "ln_final"}
_LAYER = re.compile(r"^(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_PARTS = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
          "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def to_open_clip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face CLIP tensors (a ``CLIPModel``, or ``vision_model.*`` with or without
    ``visual_projection``) under open_clip's names."""
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for name, t in state.items():
        if name in _NAMES:
            out[_NAMES[name]] = t
        elif name in ("visual_projection.weight", "text_projection.weight"):
            out["visual.proj" if name.startswith("visual") else "text_projection"] = t.T
        elif (norm := name.rsplit(".", 1)[0]) in _NORMS:
            out[f"{_NORMS[norm]}.{name.rsplit('.', 1)[1]}"] = t
        elif m := _LAYER.match(name):
            tower, i, part, kind = m.groups()
            block = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{i}."
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault(f"{block}attn.in_proj_{kind}", {})[part[10]] = t
            else:
                out[f"{block}{_PARTS[part]}.{kind}"] = t
        else:
            raise KeyError(f"no open_clip name for {name}")
    for key, qkv in fused.items():
        out[key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return {k: v.contiguous() for k, v in out.items()}


def model_cfg(config: CLIPConfig | CLIPVisionConfig, embed_dim: int | None = None
              ) -> dict[str, Any]:
    """open_clip's ``model_cfg`` describing a Hugging Face CLIP config."""
    v = config.vision_config if isinstance(config, CLIPConfig) else config
    cfg: dict[str, Any] = {
        "embed_dim": embed_dim or getattr(config, "projection_dim", None),
        "quick_gelu": v.hidden_act == "quick_gelu",
        "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size,
                       "layers": v.num_hidden_layers, "width": v.hidden_size,
                       "head_width": v.hidden_size // v.num_attention_heads,
                       "mlp_ratio": v.intermediate_size / v.hidden_size}}
    if isinstance(config, CLIPConfig):
        t: CLIPTextConfig = config.text_config
        cfg["text_cfg"] = {"context_length": t.max_position_embeddings,
                           "vocab_size": t.vocab_size, "width": t.hidden_size,
                           "heads": t.num_attention_heads, "layers": t.num_hidden_layers,
                           "mlp_ratio": t.intermediate_size / t.hidden_size}
    return cfg


def write_open_clip(folder: Path, tensors: Mapping[str, Tensor], cfg: Mapping[str, Any], *,
                    preprocess: Mapping[str, Any] | None = None,
                    tokenizer_from: Path | None = None) -> Path:
    """An open_clip folder: ``open_clip_config.json``, ``open_clip_model.safetensors`` (the
    open_clip-named ``tensors``) and, from ``tokenizer_from``, the tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(dict(tensors), folder / "open_clip_model.safetensors")
    config = {"model_cfg": dict(cfg), "preprocess_cfg": dict(preprocess or {})}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_from is not None:
        for p in tokenizer_from.iterdir():
            if p.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
                (folder / p.name).write_bytes(p.read_bytes())
    return folder


# -- open_clip's forward pass --------------------------------------------------------------------
def _act(x: Tensor, quick: bool) -> Tensor:
    return x * torch.sigmoid(1.702 * x) if quick else F.gelu(x)  # QuickGELU or nn.GELU


def _norm(x: Tensor, s: Mapping[str, Tensor], key: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], s[f"{key}.weight"], s[f"{key}.bias"])  # eps 1e-5


def _transformer(x: Tensor, s: Mapping[str, Tensor], prefix: str, layers: int, heads: int,
                 quick: bool, mask: Tensor | None) -> Tensor:
    """open_clip's ``Transformer`` on (L, N, D), nn.MultiheadAttention's sequence-first layout."""
    width = x.shape[-1]
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        h = _norm(x, s, f"{b}ln_1")
        attn, _ = F.multi_head_attention_forward(
            h, h, h, width, heads, s[f"{b}attn.in_proj_weight"], s[f"{b}attn.in_proj_bias"],
            None, None, False, 0.0, s[f"{b}attn.out_proj.weight"], s[f"{b}attn.out_proj.bias"],
            training=False, need_weights=False, attn_mask=mask)
        x = x + attn
        h = _norm(x, s, f"{b}ln_2")
        h = F.linear(h, s[f"{b}mlp.c_fc.weight"], s[f"{b}mlp.c_fc.bias"])
        x = x + F.linear(_act(h, quick), s[f"{b}mlp.c_proj.weight"], s[f"{b}mlp.c_proj.bias"])
    return x


@torch.no_grad()
def image_features(s: Mapping[str, Tensor], cfg: Mapping[str, Any], pixels: Tensor) -> Tensor:
    """open_clip's ``encode_image`` (N, embed) of normalised pixels (N, 3, H, W)."""
    v = cfg["vision_cfg"]
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=v["patch_size"])  # (N, D, g, g)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (N, g², D)
    cls = s["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + s["visual.positional_embedding"]
    x = _norm(x, s, "visual.ln_pre").permute(1, 0, 2)
    x = _transformer(x, s, "visual.", v["layers"], v["width"] // v["head_width"],
                     cfg["quick_gelu"], None).permute(1, 0, 2)
    return _norm(x[:, 0], s, "visual.ln_post") @ s["visual.proj"]  # class token


@torch.no_grad()
def text_features(s: Mapping[str, Tensor], cfg: Mapping[str, Any], ids: Tensor) -> Tensor:
    """open_clip's ``encode_text`` (N, embed) of token ids (N, context_length): causal
    attention, pooled at the highest id of each row (the end-of-text token)."""
    t = cfg["text_cfg"]
    n = ids.shape[1]
    x = s["token_embedding.weight"][ids] + s["positional_embedding"]
    mask = torch.full((n, n), float("-inf")).triu(1)
    x = _transformer(x.permute(1, 0, 2), s, "", t["layers"], t["heads"], cfg["quick_gelu"],
                     mask).permute(1, 0, 2)
    x = _norm(x, s, "ln_final")
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ s["text_projection"]
