"""models/: family selection, the transformers image and CLIP adapters, backbones, preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import Tensor, nn

from mergeshield import checkpoints, model_folder
from mergeshield.errors import (
    CorruptCheckpointError,
    DatasetError,
    IncompatibleModelsError,
    ModelRunError,
    ModelTooLargeError,
    UnsafeFormatError,
    UnsupportedModelError,
)
from mergeshield.models import (
    CLIPFamily,
    HFImageFamily,
    Preprocessing,
    backbone_keys,
    check_config,
    family_for,
)
from mergeshield.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TEMPLATES
from tests.support.tiny import (
    IMAGE,
    TinyNet,
    block_task,
    clip_config,
    load_dir,
    read_state,
    save_clip_base,
    save_vit,
    vision_config_dict,
)

CLASSES3 = ("c0", "c1", "c2")


def with_arch(config: transformers.PretrainedConfig, arch: str) -> dict[str, Any]:
    return {**config.to_dict(), "architectures": [arch]}


def vit_config_dict(folder: Path) -> dict[str, Any]:
    config = model_folder.read_json_file(folder / "config.json")
    assert config is not None
    return config


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_vit(tmp_path_factory.mktemp("vit"))


# -- family_for -----------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    with_arch(transformers.ViTConfig(image_size=IMAGE, patch_size=4, num_channels=1,
                                     hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32),
              "ViTForImageClassification"),
    with_arch(transformers.ConvNextConfig(num_channels=1, num_stages=2, hidden_sizes=[8, 16],
                                          depths=[1, 1], image_size=IMAGE),
              "ConvNextForImageClassification"),
    with_arch(transformers.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16],
                                        depths=[1, 1]), "ResNetForImageClassification"),
], ids=["vit", "convnext", "resnet"])
def test_image_classifiers_get_the_transformers_family(config: dict[str, Any]) -> None:
    family = family_for(config, config)
    assert isinstance(family, HFImageFamily)
    prefix = {"vit": "vit.", "convnext": "convnext.", "resnet": "resnet."}[config["model_type"]]
    assert family.is_backbone(prefix + "x.weight") and not family.is_backbone("classifier.weight")


def test_clip_models_get_the_clip_family() -> None:
    base = clip_config().to_dict()
    assert isinstance(family_for(base, base, tokenizer_root="x"), CLIPFamily)
    assert isinstance(family_for(base, vision_config_dict()), CLIPFamily)


@pytest.mark.parametrize(("base", "suspect"), [
    (None, {"model_type": "vit"}),
    ({"model_type": "vit"}, None),
    ({}, {"model_type": "vit"}),
    ({"model_type": "bert"}, {"model_type": "bert",
                              "architectures": ["BertForSequenceClassification"]}),
    ({"model_type": "vit"}, {"model_type": "vit", "architectures": ["ViTForMaskedImageModeling"]}),
    (vision_config_dict(), vision_config_dict()),  # a CLIP base needs its text tower
])
def test_everything_else_is_unsupported(base: dict[str, Any] | None,
                                        suspect: dict[str, Any] | None) -> None:
    with pytest.raises(UnsupportedModelError):
        family_for(base, suspect)


# -- the transformers image adapter ---------------------------------------------------------------
@pytest.fixture(scope="module")
def convnet_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny ConvNeXt and ResNet classifiers (3 classes, grey) saved with ``save_pretrained``."""
    configs = {
        "convnext": transformers.ConvNextConfig(num_channels=1, num_stages=2, hidden_sizes=[8, 16],
                                                depths=[1, 1], image_size=IMAGE, num_labels=3),
        "resnet": transformers.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16],
                                            depths=[1, 1], num_labels=3),  # has int BN buffers
    }
    out = {}
    for name, config in configs.items():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = transformers.AutoModelForImageClassification.from_config(config)
        out[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(out[name])
    return out


@pytest.mark.parametrize("arch", ["vit", "convnext", "resnet"])
def test_classifier_gives_the_same_logits_as_transformers(
    arch: str, vit_dir: Path, convnet_dirs: dict[str, Path],
) -> None:
    folder = vit_dir if arch == "vit" else convnet_dirs[arch]
    processor = {"image_mean": [0.2], "image_std": [0.3]}
    with load_dir(folder) as ck:
        family = family_for(ck.config, ck.config, processor=processor)
        clf = family.classifier(ck, ck, CLASSES3)
        floats = {k for k in ck if ck.info(k).dtype.is_floating_point}
    reference = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    pixels = torch.rand(6, 1, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    inputs = clf.preprocessing(pixels)
    with torch.no_grad():
        want = reference(pixel_values=inputs).logits
        torch.testing.assert_close(clf.logits(inputs), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(clf(pixels), want, rtol=0, atol=1e-6)
    if arch == "vit":  # the processor's statistics are used
        torch.testing.assert_close(inputs, (pixels - 0.2) / 0.3)
    # the backbone speaks checkpoint names (transformers 5 renames modules in memory)
    assert set(clf.backbone_state()) == {k for k in floats if k.startswith(f"{arch}.")}
    assert set(clf.checkpoint_state()) == floats  # type: ignore[operator]


def test_head_size_must_match_the_dataset_classes(vit_dir: Path) -> None:
    with load_dir(vit_dir) as ck:
        family = family_for(ck.config, ck.config)
        with pytest.raises(DatasetError) as info:
            family.classifier(ck, ck, ("a", "b", "c", "d", "e"))
    assert info.value.details["head_outputs"] == 3


def test_a_fresh_head_for_new_classes_keeps_the_backbone(vit_dir: Path) -> None:
    state, config = read_state(vit_dir), vit_config_dict(vit_dir)
    family = family_for(config, config)
    clf = family.classifier(state, None, ("a", "b", "c", "d", "e"))
    assert clf(torch.rand(2, 1, IMAGE, IMAGE)).shape == (2, 5)
    assert all(torch.equal(t, state[k]) for k, t in clf.backbone_state().items())
    assert isinstance(family, HFImageFamily)
    init = family.initial_weights(5)
    assert init.keys() == state.keys() and init["classifier.weight"].shape == (5, 16)


def test_task_classifier_fits_a_head_once_and_copies_it(vit_dir: Path) -> None:
    state, config = read_state(vit_dir), vit_config_dict(vit_dir)
    family = family_for(config, config)
    make = family.task_classifier(state, block_task(60, n_classes=3), device=torch.device("cpu"))
    a, b = make(), make()
    assert a is not b
    assert torch.equal(a.head().weight, b.head().weight)  # type: ignore[arg-type]
    assert not torch.equal(a.head().weight, state["classifier.weight"])  # type: ignore[arg-type]


# -- backbone_keys --------------------------------------------------------------------------------
def test_backbone_keys_of_a_known_family_skip_heads_and_non_float_tensors(vit_dir: Path) -> None:
    state = read_state(vit_dir)
    suspect = {**state, "vit.embeddings.position_ids": torch.arange(17)}
    with load_dir(vit_dir) as ck:
        family = family_for(ck.config, ck.config)
        keys, skipped = backbone_keys(family, ck, suspect)
    assert keys == [k for k in state if k.startswith("vit.")]
    assert dict(skipped) == {
        "classifier.weight": "head (per task, not part of the task vector)",
        "classifier.bias": "head (per task, not part of the task vector)",
        "vit.embeddings.position_ids": "non-float dtype int64",
    }


def test_a_backbone_weight_stored_as_integers_is_not_a_fine_tune(vit_dir: Path) -> None:
    state = read_state(vit_dir)
    name = next(k for k in state if k.startswith("vit.") and k.endswith("weight"))
    with load_dir(vit_dir) as ck:
        family = family_for(ck.config, ck.config)
        with pytest.raises(IncompatibleModelsError) as info:
            backbone_keys(family, ck, {**state, name: state[name].to(torch.int8)})
    assert info.value.details["dtype"] == [{"name": name, "base": "torch.float32",
                                            "other": "torch.int8"}]


def test_backbone_keys_of_an_unknown_family_take_shared_float_tensors() -> None:
    base = {"a": torch.zeros(2, 2), "b": torch.zeros(3), "h": torch.zeros(3, 4)}
    suspect = {"a": torch.ones(2, 2), "b": torch.ones(3, dtype=torch.float16),
               "h": torch.ones(5, 4), "new": torch.ones(1), "steps": torch.tensor(3)}
    keys, skipped = backbone_keys(None, base, suspect)
    assert keys == ["a", "b"]  # "b": another float precision is still the same tensor
    reasons = dict(skipped)
    assert reasons["h"] == "shape or dtype kind differs from the base (a head?)"
    assert reasons["new"] == "not in the base model"
    assert reasons["steps"] == "non-float dtype int64"
    with pytest.raises(IncompatibleModelsError):
        backbone_keys(None, base, {"other": torch.ones(1)})


# -- CLIP -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CLIPModel base, and one fine-tuned vision tower saved in three layouts."""
    root = tmp_path_factory.mktemp("clip")
    base = save_clip_base(root / "base")
    state = read_state(base)
    gen = torch.Generator().manual_seed(1)
    tower = {k.removeprefix("vision_model."): v + 0.05 * torch.randn(v.shape, generator=gen)
             for k, v in state.items() if k.startswith("vision_model.")}
    out = {"base": base}
    prefixed = {f"vision_model.{k}": v for k, v in tower.items()}
    checkpoints.save_checkpoint(root / "prefixed", prefixed, config=vision_config_dict())
    checkpoints.save_checkpoint(root / "bare", tower, config=vision_config_dict())
    model = transformers.CLIPVisionModel(clip_config().vision_config)
    missing, unexpected = model.load_state_dict(tower, strict=False)
    if missing or unexpected:  # transformers<5 keeps the prefix in memory
        model.load_state_dict({f"vision_model.{k}": v for k, v in tower.items()})
    model.save_pretrained(root / "saved")
    out.update(prefixed=root / "prefixed", bare=root / "bare", saved=root / "saved")
    return out


def clip_logits(dirs: dict[str, Path], suspect: str, pixels: Tensor) -> Tensor:
    with load_dir(dirs["base"]) as base, load_dir(dirs[suspect]) as ck:
        family = family_for(base.config, ck.config, tokenizer_root=str(dirs["base"]))
        clf = family.classifier(family.canonical(ck), family.head_from(base, ck), CLASSES3)
        with torch.no_grad():
            return clf(pixels)


def test_clip_task_checkpoints_in_every_layout_give_the_same_logits(
    clip_dirs: dict[str, Path],
) -> None:
    pixels = torch.rand(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    prefixed = clip_logits(clip_dirs, "prefixed", pixels)
    assert prefixed.shape == (4, 3)
    torch.testing.assert_close(clip_logits(clip_dirs, "bare", pixels), prefixed, rtol=0, atol=0)
    torch.testing.assert_close(clip_logits(clip_dirs, "saved", pixels), prefixed, rtol=0, atol=0)
    assert not torch.allclose(clip_logits(clip_dirs, "base", pixels), prefixed)


def test_clip_zero_shot_logits_match_transformers(clip_dirs: dict[str, Path]) -> None:
    pixels = torch.rand(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    model = transformers.CLIPModel.from_pretrained(clip_dirs["base"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(clip_dirs["base"])

    def features(out: Any) -> Tensor:
        emb = out if isinstance(out, Tensor) else out.pooler_output  # (N, D)
        return nn.functional.normalize(emb, dim=-1)

    with torch.no_grad():
        rows = [features(model.get_text_features(
            **tok([t.format(c) for t in TEMPLATES], padding=True, return_tensors="pt"))).mean(0)
            for c in CLASSES3]
        text = nn.functional.normalize(torch.stack(rows), dim=-1)  # (K, D)
        mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
        image = features(model.get_image_features(pixel_values=(pixels - mean) / std))
        want = model.logit_scale.exp() * image @ text.T
    torch.testing.assert_close(clip_logits(clip_dirs, "base", pixels), want, rtol=1e-5, atol=1e-5)


def test_clip_backbone_is_the_vision_tower(clip_dirs: dict[str, Path]) -> None:
    with load_dir(clip_dirs["base"]) as base, load_dir(clip_dirs["bare"]) as ck:
        family = family_for(base.config, ck.config)
        keys, _ = backbone_keys(family, family.canonical(base), family.canonical(ck))
        base_keys, skipped = backbone_keys(family, base, base)
    assert keys and all(k.startswith("vision_model.") for k in keys)
    assert set(keys) == set(base_keys)
    assert {k for k, _ in skipped} == {k for k in base if not k.startswith("vision_model.")}


def test_clip_head_needs_the_base_text_tower_and_tokenizer(clip_dirs: dict[str, Path]) -> None:
    with load_dir(clip_dirs["base"]) as base:
        no_tokenizer = family_for(base.config, base.config)
        with pytest.raises(UnsupportedModelError):
            no_tokenizer.classifier(base, base, CLASSES3)
        with pytest.raises(UnsupportedModelError):
            no_tokenizer.classifier(base, None, CLASSES3)


# -- preprocessing --------------------------------------------------------------------------------
def test_grey_to_rgb_and_back() -> None:
    grey = torch.rand(2, 1, 4, 4)
    rgb = Preprocessing(4, 3, (0.0,) * 3, (1.0,) * 3)(grey)
    assert rgb.shape == (2, 3, 4, 4) and all(torch.equal(rgb[:, c], grey[:, 0]) for c in range(3))
    colour = torch.rand(2, 3, 4, 4)
    back = Preprocessing(4, 1, (0.0,), (1.0,))(colour)
    torch.testing.assert_close(back, colour.mean(1, keepdim=True))


def test_resize_to_the_model_resolution() -> None:
    flat = torch.full((3, 1, 28, 28), 0.25)
    out = Preprocessing(16, 1, (0.0,), (1.0,))(flat)
    assert out.shape == (3, 1, 16, 16)
    torch.testing.assert_close(out, torch.full((3, 1, 16, 16), 0.25))


def test_normalisation_per_channel() -> None:
    x = torch.rand(2, 3, 4, 4)
    out = Preprocessing(4, 3, (0.1, 0.2, 0.3), (0.5, 0.25, 2.0))(x)
    for c, (m, s) in enumerate([(0.1, 0.5), (0.2, 0.25), (0.3, 2.0)]):
        torch.testing.assert_close(out[:, c], (x[:, c] - m) / s)


def test_preprocessing_from_config() -> None:
    assert Preprocessing.from_config(None, 16, 1) == Preprocessing(16, 1, (0.5,), (0.5,))
    imagenet = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    assert Preprocessing.from_config(imagenet, 224, 1) == Preprocessing(224, 1, (0.485,),
                                                                        (0.229,))
    assert Preprocessing.from_config(imagenet, 224, 3).mean == (0.485, 0.456, 0.406)


# -- untrusted configs (models/config_guard.py) ----------------------------------------------------
def test_a_bf16_convnext_checkpoint_runs_in_float32(convnet_dirs: dict[str, Path]) -> None:
    """The config's dtype is not ours to take: a bf16 ConvNeXt (weights and config) is built in
    float32 and runs on float32 pixels instead of crashing in its first convolution."""
    with load_dir(convnet_dirs["convnext"]) as ck:
        config = {**ck.config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}
        bf16 = {k: ck[k].to(torch.bfloat16) if ck[k].is_floating_point() else ck[k] for k in ck}
    clf = family_for(config, config).classifier(bf16, bf16, CLASSES3)
    assert {p.dtype for p in clf.parameters()} == {torch.float32}
    assert clf(torch.rand(2, 1, IMAGE, IMAGE)).shape == (2, 3)


def test_the_attention_implementation_is_ours_whatever_the_config_says(vit_dir: Path) -> None:
    with load_dir(vit_dir) as ck:
        config = {**ck.config, "attn_implementation": "kernels-community/flash-attn",
                  "_attn_implementation": "flash_attention_2"}
        clf = family_for(config, config).classifier(ck, ck, CLASSES3)
    assert clf.model.config._attn_implementation == "sdpa"  # type: ignore[union-attr]


def test_a_crash_in_the_forward_pass_is_a_stable_error() -> None:
    class Broken(TinyNet):
        def logits(self, inputs: Tensor) -> Tensor:
            raise RuntimeError("Input type (float) and bias type (c10::BFloat16) differ")

    with pytest.raises(ModelRunError, match="forward pass") as info:
        Broken()(torch.rand(2, 1, IMAGE, IMAGE))
    assert info.value.code == "model_failed"


@pytest.mark.parametrize(("edit", "error", "match"), [
    ({"auto_map": {"AutoModel": "evil.Model"}}, UnsafeFormatError, "custom Python code"),
    ({"vision_config": {"auto_map": {"a": "b"}}}, UnsafeFormatError, "vision_config.auto_map"),
    ({"image_size": "16"}, CorruptCheckpointError, "image_size must be an integer"),
    ({"num_channels": "1"}, CorruptCheckpointError, "num_channels must be an integer"),
    ({"num_attention_heads": 3}, CorruptCheckpointError, "not a multiple"),
    ({"hidden_act": "no-such-activation"}, CorruptCheckpointError, "no model can be built"),
    ({"hidden_size": 8192, "num_hidden_layers": 48, "num_attention_heads": 64},
     ModelTooLargeError, "over the limit"),
])
def test_a_config_is_checked_before_any_model_is_built(
        vit_dir: Path, edit: dict[str, Any], error: type[Exception], match: str) -> None:
    with load_dir(vit_dir) as ck:
        config = {**ck.config, **edit}
    with pytest.raises(error, match=match):
        check_config(config)
    with pytest.raises(error, match=match):
        family_for(config, config)


def test_a_size_our_preprocessing_cannot_use_is_refused_when_the_family_is_made(
        vit_dir: Path) -> None:
    with load_dir(vit_dir) as ck:
        config = {**ck.config, "image_size": [16, 16]}  # ViT takes it; our resize needs a side
    check_config(config)
    with pytest.raises(CorruptCheckpointError, match="image_size must be an integer"):
        family_for(config, config)


def test_a_config_must_agree_with_the_weights_and_the_limit(vit_dir: Path) -> None:
    with load_dir(vit_dir) as ck:
        config = ck.config
        elements = sum(int(torch.tensor(ck.info(k).shape).prod()) for k in ck)
    check_config(config, weight_elements=elements)
    with pytest.raises(CorruptCheckpointError, match="does not belong to these weights"):
        check_config(config, weight_elements=100)
    with pytest.raises(ModelTooLargeError, match="over the limit of 1,000"):
        check_config(config, max_parameters=1000)


@pytest.mark.parametrize("files", [
    {"tokenizer_config.json": '{"tokenizer_class": "NoSuchTokenizerFast"}'},
    {"vocab.json": "not json", "tokenizer.json": "not json"},
])
def test_broken_clip_tokenizer_files_are_a_stable_error(
        clip_dirs: dict[str, Path], tmp_path: Path, files: dict[str, str]) -> None:
    base = tmp_path / "base"
    base.mkdir()
    for p in clip_dirs["base"].iterdir():
        (base / p.name).write_bytes(p.read_bytes())
    for name, text in files.items():
        (base / name).write_text(text)
    with load_dir(base) as ck:
        family = family_for(ck.config, ck.config, tokenizer_root=str(base))
        with pytest.raises(CorruptCheckpointError, match="tokenizer files cannot be loaded or"):
            family.classifier(ck, ck, CLASSES3)


def test_a_clip_classifier_built_without_random_init_is_the_initialised_one(
    clip_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The meta-device build (no random initialisation) gives the same tensors and logits as
    the build it replaces; the position ids, which no checkpoint holds, included."""
    from mergeshield.models import clip

    pixels = torch.rand(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    fast = clip_logits(clip_dirs, "prefixed", pixels)
    with load_dir(clip_dirs["base"]) as base:
        family = family_for(base.config, base.config, tokenizer_root=str(clip_dirs["base"]))
        assert isinstance(family, clip.CLIPFamily)
        quick = family._model_to_fill(base)
        full = transformers.CLIPModel(family.config)
        for name, buf in full.named_buffers():
            if name.endswith("position_ids"):
                assert torch.equal(dict(quick.named_buffers())[name], buf)
        lacking = {k: base[k] for k in base if not k.startswith("text_model.")}
        assert not any(t.is_meta for t in family._model_to_fill(lacking).parameters())
    monkeypatch.setattr(clip.CLIPFamily, "_model_to_fill", lambda self, _head: (
        transformers.CLIPModel._from_config(self.config, attn_implementation="sdpa")))
    torch.testing.assert_close(clip_logits(clip_dirs, "prefixed", pixels), fast, rtol=0, atol=0)
