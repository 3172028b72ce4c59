"""merging.py: Task Arithmetic and TIES over saved checkpoints, with IBVS after the merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from mergeshield import checkpoints
from mergeshield.errors import ConfigError, IncompatibleModelsError
from mergeshield.merge_methods import dare_mergekit, ties
from mergeshield.merging import MergeConfig, merged_tensors, task_vectors
from mergeshield.models import HFImageFamily, family_for
from mergeshield.task_vectors import TaskVector
from tests.support.tiny import IMAGE, load_dir, read_state, save_finetuned, save_vit


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    base = save_vit(root / "base")
    return {"base": base, "t1": save_finetuned(base, root / "t1", seed=1),
            "t2": save_finetuned(base, root / "t2", seed=2),
            "bv": save_finetuned(base, root / "bv", seed=3)}


@pytest.fixture(scope="module")
def states(ckpts: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    return {k: read_state(v) for k, v in ckpts.items()}


def merge(ckpts: dict[str, Path], cfg: MergeConfig, bv: TaskVector | None = None,
          models: tuple[str, ...] = ("t1", "t2")) -> dict[str, torch.Tensor]:
    with load_dir(ckpts["base"]) as base:
        cks = [load_dir(ckpts[m]) for m in models]
        b, tvs, family = task_vectors(base, cks)
        assert isinstance(family, HFImageFamily)
        out = dict(merged_tensors(b, tvs, cfg, bv))
        for ck in cks:
            ck.close()
    return out


def expected_ta(states: dict[str, dict[str, torch.Tensor]], weights: list[float]
                ) -> dict[str, torch.Tensor]:
    base = states["base"]
    return {k: (v + sum(w * (states[t][k] - v) for w, t in zip(weights, ("t1", "t2"),
                                                                 strict=True))
                if k.startswith("vit.") else v)
            for k, v in base.items()}


@pytest.mark.parametrize("weights", [[0.3], [0.2, 0.7]])
def test_task_arithmetic_is_base_plus_weighted_task_vectors(
    ckpts: dict[str, Path], states: dict[str, dict[str, torch.Tensor]], weights: list[float],
) -> None:
    got = merge(ckpts, MergeConfig(weights=weights))
    want = expected_ta(states, weights * 2 if len(weights) == 1 else weights)
    assert list(got) == list(states["base"])  # the base's layout and order
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    assert torch.equal(got["classifier.weight"], states["base"]["classifier.weight"])


def test_ties_path_runs_and_trims(ckpts: dict[str, Path],
                                  states: dict[str, dict[str, torch.Tensor]]) -> None:
    got = merge(ckpts, MergeConfig(method="ties", weights=[1.0], keep=0.2))
    base = states["base"]
    tvs = [TaskVector.between(base, states[t], [k for k in base if k.startswith("vit.")])
           for t in ("t1", "t2")]
    tau = ties(tvs, keep=0.2, scale=1.0)
    for k in tau:
        torch.testing.assert_close(got[k], base[k] + tau[k], rtol=1e-6, atol=1e-6)
    changed = sum(int((got[k] != base[k]).sum()) for k in tau)
    total = sum(base[k].numel() for k in tau)
    assert 0.2 * total <= changed <= 0.4 * total  # ≤ 20% of each vector survives the trim


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_path_is_merge_methods_dare_with_its_seed_and_draw_names(
        ckpts: dict[str, Path], states: dict[str, dict[str, torch.Tensor]], method: str) -> None:
    cfg = MergeConfig(method=method, weights=[1.0, 0.5], densities=[0.5, 0.7], normalize=False,
                      seed=7, models=["org/a", "org/b"])
    got = merge(ckpts, cfg)
    base = states["base"]
    tvs = [TaskVector.between(base, states[t], [k for k in base if k.startswith("vit.")])
           for t in ("t1", "t2")]
    tau = dare_mergekit(tvs, [0.5, 0.7], [1.0, 0.5], consensus=method == "dare_ties", seed=7,
                        draws=["org/a", "org/b"])
    for k in tau:
        torch.testing.assert_close(got[k], base[k] + tau[k], rtol=1e-6, atol=1e-6)
    # another seed, or the same models under other names, draws other drops
    for other in ({"seed": 8}, {"models": ["org/b", "org/a"]}):
        moved = merge(ckpts, cfg.model_copy(update=other))
        assert any(not torch.equal(moved[k], got[k]) for k in tau), other


def test_subtracting_a_bv_after_the_merge(ckpts: dict[str, Path],
                                          states: dict[str, dict[str, torch.Tensor]]) -> None:
    base = states["base"]
    bv = TaskVector.between(base, states["bv"], [k for k in base if k.startswith("vit.")])
    got = merge(ckpts, MergeConfig(weights=[0.5], subtract_lambda=0.7), bv)
    want = expected_ta(states, [0.5, 0.5])
    for k in want:
        w = want[k] - 0.7 * bv[k] if k in bv else want[k]
        torch.testing.assert_close(got[k], w, rtol=1e-6, atol=1e-6)
    plain = merge(ckpts, MergeConfig(weights=[0.5]), bv)  # subtract_lambda=0: the bv is unused
    assert all(torch.allclose(plain[k], want[k], atol=1e-6) for k in want)


def test_a_merged_model_saves_and_loads_as_a_classifier(
    ckpts: dict[str, Path], tmp_path: Path,
) -> None:
    got = merge(ckpts, MergeConfig(weights=[0.3]))
    with load_dir(ckpts["base"]) as base:
        checkpoints.save_checkpoint(tmp_path / "merged", got, config=base.config)
    with load_dir(tmp_path / "merged") as ck:
        family = family_for(ck.config, ck.config)
        clf = family.classifier(ck, ck, ("c0", "c1", "c2"))
        assert clf(torch.rand(2, 1, IMAGE, IMAGE)).shape == (2, 3)
        assert all(torch.equal(ck[k], got[k]) for k in got)


def test_mismatched_models_are_refused(ckpts: dict[str, Path], tmp_path: Path) -> None:
    config = transformers.ViTConfig(image_size=IMAGE, patch_size=4, num_channels=1,
                                    hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, num_labels=3)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "wide")
    with load_dir(ckpts["base"]) as base, load_dir(tmp_path / "wide") as wide:
        with pytest.raises(IncompatibleModelsError):
            task_vectors(base, [wide])


def test_bad_merge_configs_are_refused(ckpts: dict[str, Path]) -> None:
    with load_dir(ckpts["base"]) as base:
        with pytest.raises(ConfigError):
            merged_tensors(base, [], MergeConfig())
    with pytest.raises(ConfigError):
        merge(ckpts, MergeConfig(weights=[0.1, 0.2, 0.3]))  # three weights, two models
    with pytest.raises(ValueError):
        MergeConfig(method="slerp")  # type: ignore[arg-type]


def test_ties_does_not_silently_ignore_per_task_weights(ckpts: dict[str, Path]) -> None:
    uneven = MergeConfig(method="ties", weights=[0.2, 1.0], keep=0.5)
    try:
        got = merge(ckpts, uneven)
    except ConfigError:
        return  # refusing is fine
    assert not all(torch.equal(got[k], v)
                   for k, v in merge(ckpts, uneven.model_copy(update={"weights": [0.2]})).items())


def test_a_model_missing_a_backbone_tensor_is_refused(ckpts: dict[str, Path],
                                                      tmp_path: Path) -> None:
    state = read_state(ckpts["t2"])
    del state["vit.layernorm.weight"]
    with load_dir(ckpts["base"]) as base:
        checkpoints.save_checkpoint(tmp_path / "cut", state, config=base.config)
        with load_dir(ckpts["t1"]) as t1, load_dir(tmp_path / "cut") as cut:
            with pytest.raises(IncompatibleModelsError):
                task_vectors(base, [t1, cut])
