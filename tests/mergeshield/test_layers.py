"""Per-layer task-vector norms: grouping by block, natural order, norms that add up."""

from __future__ import annotations

import math

import pytest

from mergeshield.layers import layer_of, per_layer


@pytest.mark.parametrize(("name", "layer"), [
    ("vit.encoder.layer.3.output.dense.weight", "vit.encoder.layer.3"),
    ("text_model.encoder.layers.11.mlp.fc1.bias", "text_model.encoder.layers.11"),
    ("transformer.h.0.attn.c_attn.weight", "transformer.h.0"),
    ("blocks.2.norm1.weight", "blocks.2"),
    ("visual.transformer.resblocks.7.ln_1.weight", "visual.transformer.resblocks.7"),
    ("vit.embeddings.patch_embeddings.projection.weight", "vit.embeddings"),
    ("vit.layernorm.weight", "vit.layernorm"),
    ("visual_projection.weight", "visual_projection"),
    ("logit_scale", "logit_scale"),
])
def test_layer_of(name: str, layer: str) -> None:
    assert layer_of(name) == layer


def test_a_layer_norm_is_the_norm_of_its_tensors_together() -> None:
    layers = per_layer([
        ("vit.encoder.layer.10.output.dense.weight", 4, 3.0, 30.0),
        ("vit.encoder.layer.2.output.dense.weight", 4, 1.0, 10.0),
        ("vit.encoder.layer.10.output.dense.bias", 2, 4.0, 40.0),
        ("vit.embeddings.cls_token", 1, 0.0, 0.0),
    ])
    assert [x.name for x in layers] == ["vit.embeddings", "vit.encoder.layer.2",
                                        "vit.encoder.layer.10"]  # 2 before 10
    ten = layers[2]
    assert (ten.n_tensors, ten.numel) == (2, 6)
    assert math.isclose(ten.norm, 5.0) and math.isclose(ten.relative_norm, 0.1)
    assert layers[0].relative_norm == 0.0  # a zero base norm gives 0, never a division error


def test_every_tensor_is_counted_once() -> None:
    names = [f"m.layer.{i}.w{j}" for i in range(5) for j in range(3)] + ["m.head.w", "x"]
    layers = per_layer((n, 1, 1.0, 2.0) for n in names)
    assert sum(x.n_tensors for x in layers) == len(names)
    assert math.isclose(sum(x.norm ** 2 for x in layers), len(names))
