"""Tensors grouped into layers, for per-layer task-vector norms.

A tensor belongs to the numbered block its name sits in (``vit.encoder.layer.3``,
``text_model.encoder.layers.11``, ``transformer.h.0``, ``blocks.2``); any other tensor to its first
two dotted components (``vit.embeddings``, ``vit.layernorm``) or, for short names, to its module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from mergeshield.report.schema import LayerStat

_BLOCK = re.compile(r"^(.*?\b(?:layers?|h|blocks?|resblocks)\.\d+)\.")
_DIGITS = re.compile(r"(\d+)")


def layer_of(name: str) -> str:
    """The layer a tensor name belongs to (see the module docstring)."""
    block = _BLOCK.match(name)
    if block:
        return block.group(1)
    parts = name.split(".")
    if len(parts) > 2:
        return ".".join(parts[:2])
    return parts[0] if len(parts) == 2 else name


def _natural(name: str) -> list[tuple[int, int | str]]:
    """Sort key with numbers compared as numbers (``layer.2`` before ``layer.10``)."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in _DIGITS.split(name) if p]


def per_layer(tensors: Iterable[tuple[str, int, float, float]]) -> list[LayerStat]:
    """(name, numel, ‖τ_t‖, ‖θ_base,t‖) per tensor → one ``LayerStat`` per layer, in layer order.

    A layer's norm is the L2 norm of all its tensors together: sqrt(Σ ‖τ_t‖²)."""
    sums: dict[str, list[float]] = {}  # layer -> [tensors, numel, Σ‖τ‖², Σ‖base‖²]
    for name, numel, norm, base_norm in tensors:
        acc = sums.setdefault(layer_of(name), [0, 0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += numel
        acc[2] += norm * norm
        acc[3] += base_norm * base_norm
    out = []
    for layer in sorted(sums, key=_natural):
        n, size, sq, base_sq = sums[layer]
        norm, base_norm = sq ** 0.5, base_sq ** 0.5
        out.append(LayerStat(name=layer, n_tensors=int(n), numel=int(size), norm=norm,
                             relative_norm=norm / base_norm if base_norm > 0 else 0.0))
    return out
