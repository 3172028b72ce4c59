"""backdoor_vectors.py: BVs from saved checkpoints, and how BVs compare."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from mergeshield import checkpoints
from mergeshield.backdoor_vectors import (
    backdoor_vector,
    from_checkpoints,
    similarity,
    tensor_similarity,
)
from mergeshield.errors import IncompatibleModelsError
from mergeshield.task_vectors import TaskVector, cosine
from tests.support.tiny import IMAGE, load_dir, read_state, save_finetuned, save_vit


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A "clean" and a "backdoored" fine-tune of one tiny ViT base."""
    root = tmp_path_factory.mktemp("bv")
    base = save_vit(root / "base")
    return (save_finetuned(base, root / "clean", seed=1),
            save_finetuned(base, root / "backdoored", seed=2))


def test_bv_from_checkpoints_is_backdoored_minus_clean_over_the_backbone(
    pair: tuple[Path, Path],
) -> None:
    clean, bd = read_state(pair[0]), read_state(pair[1])
    with load_dir(pair[0]) as a, load_dir(pair[1]) as b:
        bv = from_checkpoints(a, b).materialize()
    assert set(bv) == {k for k in clean if k.startswith("vit.")}  # no head, ever
    for k in bv:
        torch.testing.assert_close(bv[k], bd[k] - clean[k], rtol=0, atol=0)
    assert bv.norm() > 0


def test_bv_of_checkpoints_without_config_covers_shared_float_tensors(
    pair: tuple[Path, Path], tmp_path: Path,
) -> None:
    clean, bd = read_state(pair[0]), read_state(pair[1])
    checkpoints.save_checkpoint(tmp_path / "a", clean)  # no config.json: unknown family
    checkpoints.save_checkpoint(tmp_path / "b", {**bd, "extra.weight": torch.ones(2)})
    with load_dir(tmp_path / "a") as a, load_dir(tmp_path / "b") as b:
        assert a.config is None
        bv = from_checkpoints(a, b).materialize()
    assert set(bv) == set(clean)  # the equal-shaped heads are shared floats too
    torch.testing.assert_close(bv["classifier.weight"],
                               bd["classifier.weight"] - clean["classifier.weight"])


def test_bv_of_different_architectures_is_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    config = transformers.ViTConfig(image_size=IMAGE, patch_size=4, num_channels=1,
                                    hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, num_labels=3)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "wide")
    with load_dir(pair[0]) as a, load_dir(tmp_path / "wide") as b:
        with pytest.raises(IncompatibleModelsError) as info:
            from_checkpoints(a, b)
    assert info.value.details["shape"]


def cut_copy(src: Path, out: Path, name: str) -> Path:
    """``src`` saved again without tensor ``name``."""
    state = read_state(src)
    del state[name]
    with load_dir(src) as ck:
        checkpoints.save_checkpoint(out, state, config=ck.config)
    return out


def test_bv_against_a_clean_model_missing_a_tensor_is_refused(
    pair: tuple[Path, Path], tmp_path: Path,
) -> None:
    cut = cut_copy(pair[0], tmp_path / "cut", "vit.layernorm.weight")
    with load_dir(cut) as a, load_dir(pair[1]) as b, pytest.raises(IncompatibleModelsError) as info:
        from_checkpoints(a, b)
    assert info.value.details["unexpected"] == ["vit.layernorm.weight"]


def test_bv_of_a_backdoored_model_missing_a_tensor_is_refused(
    pair: tuple[Path, Path], tmp_path: Path,
) -> None:
    cut = cut_copy(pair[1], tmp_path / "cut", "vit.layernorm.weight")
    with load_dir(pair[0]) as a, load_dir(cut) as b, pytest.raises(IncompatibleModelsError) as info:
        from_checkpoints(a, b)
    assert info.value.details["missing"] == ["vit.layernorm.weight"]


def test_backdoor_vector_on_plain_dicts() -> None:
    clean = {"w": torch.tensor([1.0, 2.0]), "h": torch.zeros(1)}
    bd = {"w": torch.tensor([1.5, 1.0]), "h": torch.ones(1)}
    bv = backdoor_vector(clean, bd, ["w"])
    assert list(bv) == ["w"] and bv["w"].tolist() == [0.5, -1.0]


def test_similarity_matrix_is_symmetric_with_a_unit_diagonal() -> None:
    gen = torch.Generator().manual_seed(0)
    bvs = [TaskVector.from_tensors({"a": torch.randn(5, generator=gen),
                                    "b": torch.randn(2, 3, generator=gen)}) for _ in range(3)]
    bvs.append(-bvs[0])
    m = similarity(bvs)
    assert len(m) == 4 and all(len(row) == 4 for row in m)
    for i in range(4):
        assert m[i][i] == 1.0
        for j in range(4):
            assert m[i][j] == pytest.approx(m[j][i], abs=1e-6)
            assert -1 - 1e-6 <= m[i][j] <= 1 + 1e-6
    assert m[0][1] == pytest.approx(cosine(bvs[0], bvs[1]))
    assert m[0][3] == pytest.approx(-1.0, abs=1e-6)


def test_tensor_similarity_over_shared_tensors() -> None:
    a = TaskVector.from_tensors({"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([1.0])})
    b = TaskVector.from_tensors({"x": torch.tensor([1.0, 1.0]), "z": torch.tensor([3.0])})
    assert tensor_similarity(a, b) == pytest.approx({"x": 2 ** -0.5})
