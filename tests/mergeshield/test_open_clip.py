"""open_clip.py / open_clip_config.py: open_clip folders read natively. A tiny real CLIPModel is
written in open_clip's layout (tests/support/open_clip.py); open_clip's own forward pass over
those tensors must give the original's features (so the layout is right), and the converted
model must give them too (so the reader is right). Every config or weights the mapping cannot
reproduce exactly is a stable-coded refusal that leaves nothing behind."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from mergeshield import checkpoints, open_clip
from mergeshield.errors import (
    CorruptCheckpointError,
    InvalidWeightsError,
    MergeShieldError,
    ModelTooLargeError,
    NothingScannableError,
    UnsafeFormatError,
    UnsupportedModelError,
    as_mergeshield_error,
)
from mergeshield.models import family_for
from mergeshield.models.clip import OPENAI_CLIP_MEAN
from mergeshield.pipeline import ScanContext, ScanRequest, scan
from mergeshield.unlearning import UnlearnConfig
from tests.support.hub import LoopbackHub
from tests.support.open_clip import (
    image_features,
    model_cfg,
    text_features,
    to_open_clip,
    write_open_clip,
)
from tests.support.tiny import char_vocab, load_dir
from tests.support.zoo import Zoo

CONTEXT = 32  # tokens per prompt: the class prompts, character by character
EOT = 513  # char_vocab()'s <|endoftext|>, its highest id, as 49407 is OpenAI's


def _config(act: str = "quick_gelu") -> CLIPConfig:
    """Towers of different widths and an MLP ratio of 3, so a missed transpose or a wrong
    intermediate size cannot pass by accident."""
    return CLIPConfig(
        text_config={"vocab_size": len(char_vocab()), "hidden_size": 24, "num_hidden_layers": 2,
                     "num_attention_heads": 3, "intermediate_size": 72,
                     "max_position_embeddings": CONTEXT, "hidden_act": act,
                     "bos_token_id": 512, "eos_token_id": EOT, "pad_token_id": EOT},
        vision_config={"image_size": 16, "patch_size": 4, "hidden_size": 16,
                       "num_hidden_layers": 2, "num_attention_heads": 2,
                       "intermediate_size": 48, "hidden_act": act},
        projection_dim=12)


def _model(act: str = "quick_gelu", seed: int = 0) -> CLIPModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CLIPModel(_config(act)).eval()


def _inputs() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 16, 16, generator=gen)
    ids = torch.full((3, CONTEXT), EOT)  # padded with end-of-text, as OpenAI's tokenizer does
    for row, n in enumerate((2, 5, CONTEXT - 1)):
        ids[row, 0] = 512
        ids[row, 1:n] = torch.randint(0, 512, (n - 1,), generator=gen)
    return pixels, ids


def _out(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else x.pooler_output  # transformers 5 returns outputs


@torch.no_grad()
def _hf_features(model: CLIPModel, pixels: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    return (_out(model.get_image_features(pixel_values=pixels)),
            _out(model.get_text_features(input_ids=ids)))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    CLIPTokenizer(vocab=char_vocab(), merges=[]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_the_converted_clip_computes_open_clips_features(tmp_path: Path, tokenizer_dir: Path,
                                                         act: str) -> None:
    model = _model(act)
    tensors, cfg = to_open_clip(model.state_dict()), model_cfg(model.config)
    assert cfg["quick_gelu"] is (act == "quick_gelu")
    folder = write_open_clip(tmp_path / "oc", tensors, cfg, tokenizer_from=tokenizer_dir)
    pixels, ids = _inputs()
    want_image, want_text = _hf_features(model, pixels, ids)
    # open_clip's forward over the written tensors is the original's: the layout is open_clip's
    torch.testing.assert_close(image_features(tensors, cfg, pixels), want_image)
    torch.testing.assert_close(text_features(tensors, cfg, ids), want_text)

    src = checkpoints.resolve(str(folder), cache_dir=tmp_path / "cache")
    assert src.kind == "directory" and src.weight_files == (folder / open_clip.WEIGHTS,)
    assert src.config is not None and src.config["architectures"] == ["CLIPModel"]
    converted = CLIPModel.from_pretrained(src.root).eval()
    assert converted.config.vision_config.hidden_act == act
    assert converted.config.text_config.hidden_act == act
    got_image, got_text = _hf_features(converted, pixels, ids)
    torch.testing.assert_close(got_image, want_image)
    torch.testing.assert_close(got_text, want_text)
    assert (src.root / "tokenizer.json").is_file()  # copied: a base builds its head with it


def test_a_vision_tower_alone_becomes_a_clip_vision_model_with_projection(tmp_path: Path) -> None:
    model = _model()
    tensors = {k: v for k, v in to_open_clip(model.state_dict()).items()
               if k.startswith("visual.")}
    cfg = model_cfg(model.config)
    folder = write_open_clip(tmp_path / "oc", tensors, cfg)
    src = checkpoints.resolve(str(folder), cache_dir=tmp_path / "cache")
    assert src.config is not None
    assert src.config["architectures"] == ["CLIPVisionModelWithProjection"]
    pixels, _ = _inputs()
    with torch.no_grad():
        got = CLIPVisionModelWithProjection.from_pretrained(src.root)(pixel_values=pixels)
    torch.testing.assert_close(got.image_embeds, image_features(tensors, cfg, pixels))
    with checkpoints.open_checkpoint(src) as ck:  # the task-vector layout the CLIP family reads
        assert {k for k in ck if not k.startswith("vision_model.")} == {"visual_projection.weight"}


def test_preprocess_cfg_gives_the_normalisation(tmp_path: Path) -> None:
    model = _model()
    tensors, cfg = to_open_clip(model.state_dict()), model_cfg(model.config)
    half = write_open_clip(tmp_path / "half", tensors, cfg,
                           preprocess={"mean": [0.5] * 3, "std": [0.5] * 3})
    plain = write_open_clip(tmp_path / "plain", tensors, cfg)
    got = [checkpoints.read_json(checkpoints.resolve(str(f), cache_dir=tmp_path / "c"),
                                 "preprocessor_config.json") for f in (half, plain)]
    assert got[0] is not None and got[0]["image_mean"] == [0.5] * 3
    assert got[1] is not None and got[1]["image_mean"] == list(OPENAI_CLIP_MEAN)  # open_clip's
    assert got[0]["crop_size"] == {"height": 16, "width": 16}


def test_converted_once_per_content_and_a_lone_weights_file_reads_as_its_folder(
        tmp_path: Path) -> None:
    model = _model()
    folder = write_open_clip(tmp_path / "oc", to_open_clip(model.state_dict()),
                             model_cfg(model.config))
    cache = tmp_path / "cache"
    first = checkpoints.resolve(str(folder), cache_dir=cache)
    written = (first.root / "model.safetensors").stat().st_mtime_ns
    again = checkpoints.resolve(str(folder), cache_dir=cache)
    assert again.root == first.root
    assert (again.root / "model.safetensors").stat().st_mtime_ns == written  # not rewritten
    lone = checkpoints.resolve(str(folder / open_clip.WEIGHTS), cache_dir=cache)
    assert (lone.root, lone.kind, lone.weight_files) == (first.root, "directory",
                                                         first.weight_files)
    assert [p for p, _, _ in lone.files_digest()] == [open_clip.WEIGHTS, "config.json"]
    config = json.loads((folder / open_clip.CONFIG).read_text())
    config["preprocess_cfg"] = {"mean": [0.5] * 3, "std": [0.5] * 3}
    (folder / open_clip.CONFIG).write_text(json.dumps(config))
    changed = checkpoints.resolve(str(folder), cache_dir=cache)
    assert changed.root != first.root  # the config is part of what is converted
    assert changed.files_digest()[1][2] != first.files_digest()[1][2]  # and of the report


def test_an_open_clip_repo_is_read_by_hub_id(tmp_path: Path, hub: LoopbackHub) -> None:
    model = _model()
    folder = write_open_clip(tmp_path / "oc", to_open_clip(model.state_dict()),
                             model_cfg(model.config))
    sha = hub.add_repo("acme/open-clip-tiny", folder)
    src = checkpoints.resolve("acme/open-clip-tiny", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert (src.kind, src.revision) == ("hub", sha)
    assert src.config is not None and src.config["architectures"] == ["CLIPModel"]
    assert src.weight_files[0].name == open_clip.WEIGHTS


def test_a_folder_with_a_hugging_face_config_is_read_in_that_layout(tmp_path: Path) -> None:
    model = _model()
    model.save_pretrained(tmp_path / "both")
    write_open_clip(tmp_path / "both", to_open_clip(model.state_dict()), model_cfg(model.config))
    src = checkpoints.resolve(str(tmp_path / "both"), cache_dir=tmp_path / "cache")
    assert src.root == tmp_path / "both" and src.weight_files[0].name == "model.safetensors"


def test_a_converted_base_builds_its_head_only_with_its_tokenizer(tmp_path: Path,
                                                                  tokenizer_dir: Path) -> None:
    model = _model()
    tensors, cfg = to_open_clip(model.state_dict()), model_cfg(model.config)
    for name, tokenizer in (("with", tokenizer_dir), ("without", None)):
        folder = write_open_clip(tmp_path / name, tensors, cfg, tokenizer_from=tokenizer)
        src = checkpoints.resolve(str(folder), cache_dir=tmp_path / "cache")
        assert src.config is not None
        family = family_for(src.config, src.config, tokenizer_root=str(src.root))
        with checkpoints.open_checkpoint(src) as ck:
            if tokenizer is None:  # transformers would build an empty tokenizer and guess
                with pytest.raises(UnsupportedModelError, match="no tokenizer files") as exc:
                    family.classifier(ck, ck, ("cat", "dog"))
                assert exc.value.code == "unsupported_model"
            else:
                head = family.classifier(ck, ck, ("cat", "dog")).get_buffer("text_features")
                assert head.shape == (2, 12) and not torch.allclose(head[0], head[1])


# -- refusals --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def written() -> tuple[dict[str, Tensor], dict[str, Any]]:
    model = _model()
    return to_open_clip(model.state_dict()), model_cfg(model.config)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change to ``model_cfg`` at the dotted ``path``."""
    def change(cfg: dict[str, Any]) -> None:
        *parents, key = path.split(".")
        for p in parents:
            cfg = cfg[p]
        cfg[key] = value
    return change


UNSUPPORTED = {
    "a ModifiedResNet": _set("vision_cfg.layers", [1, 1, 1, 1]),
    "a timm tower": _set("vision_cfg.timm_model_name", "vit_base_patch16_clip_224"),
    "a Hugging Face text tower": _set("text_cfg.hf_model_name", "xlm-roberta-base"),
    "layer scale": _set("vision_cfg.ls_init_value", 1e-5),
    "an attentional pooler": _set("vision_cfg.attentional_pool", True),
    "average pooling": _set("vision_cfg.pool_type", "avg"),
    "last-token text pooling": _set("text_cfg.pool_type", "last"),
    "a text projection bias": _set("text_cfg.proj_bias", True),
    "QK norm": _set("text_cfg.qk_norm", True),
    "a SigLIP logit bias": _set("init_logit_bias", -10.0),
    "CustomTextCLIP": _set("custom_text", True),
    "CoCa": _set("multimodal_cfg", {"width": 16}),
    "an option unknown here": _set("vision_cfg.fancy_new_thing", 3),
    "another LayerNorm": _set("vision_cfg.norm_kwargs", {"elementwise_affine": False}),
    "tanh GELU": _set("text_cfg.act_kwargs", {"approximate": "tanh"}),
    "non-square images": _set("vision_cfg.image_size", [16, 32]),
}
LIES = {  # a config that does not describe the weights
    "more layers": _set("vision_cfg.layers", 3),
    "a wider image tower": _set("vision_cfg.width", 32),
    "a wider text tower": _set("text_cfg.width", 48),
    "another embedding size": _set("embed_dim", 8),
    "another MLP ratio": _set("vision_cfg.mlp_ratio", 2.0),
    "another patch size": _set("vision_cfg.patch_size", 8),
    "a longer context": _set("text_cfg.context_length", 40),
    "heads that do not divide the width": _set("text_cfg.heads", 5),
    "a head wider than the tower": _set("vision_cfg.head_width", 32),
    "a width as text": _set("vision_cfg.width", "16"),
    "a negative MLP ratio": _set("text_cfg.mlp_ratio", -1),
    "quick_gelu as text": _set("quick_gelu", "yes"),
    "no embed_dim": lambda cfg: cfg.pop("embed_dim"),
}


def _refusal(tmp_path: Path, tensors: dict[str, Tensor], cfg: dict[str, Any], *,
             preprocess: dict[str, Any] | None = None) -> MergeShieldError:
    folder = write_open_clip(tmp_path / "oc", tensors, cfg, preprocess=preprocess)
    cache = tmp_path / "cache"
    with pytest.raises(MergeShieldError) as exc:
        checkpoints.resolve(str(folder), cache_dir=cache)
    assert as_mergeshield_error(exc.value) is exc.value  # ours, never a traceback
    json.dumps(exc.value.to_dict())
    assert not list(cache.glob("mergeshield-open-clip/*"))  # nothing half-converted stays
    return exc.value


@pytest.mark.parametrize("change", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_what_does_not_map_exactly_is_unsupported(
        tmp_path: Path, written: tuple[dict[str, Tensor], dict[str, Any]],
        change: Callable[[dict[str, Any]], None]) -> None:
    cfg = copy.deepcopy(written[1])
    change(cfg)
    error = _refusal(tmp_path, written[0], cfg)
    assert isinstance(error, UnsupportedModelError) and error.code == "unsupported_model"
    assert open_clip.CONFIG in error.message


@pytest.mark.parametrize("change", LIES.values(), ids=LIES.keys())
def test_a_config_that_lies_about_the_weights_is_corrupt(
        tmp_path: Path, written: tuple[dict[str, Tensor], dict[str, Any]],
        change: Callable[[dict[str, Any]], None]) -> None:
    cfg = copy.deepcopy(written[1])
    change(cfg)
    error = _refusal(tmp_path, written[0], cfg)
    assert isinstance(error, CorruptCheckpointError) and error.code == "corrupt_checkpoint"


def _drop(key: str) -> Callable[[dict[str, Tensor]], None]:
    def drop(tensors: dict[str, Tensor]) -> None:
        del tensors[key]
    return drop


WEIGHTS: dict[str, tuple[Callable[[dict[str, Tensor]], None], str]] = {
    "a missing tensor": (_drop("visual.ln_post.bias"), "missing"),
    "half a text tower": (_drop("token_embedding.weight"), "missing"),
    "a layer-scale tensor": (lambda t: t.update({
        "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(16)}), "unexpected"),
    "an untransposed projection": (lambda t: t.update(
        {"visual.proj": t["visual.proj"].T.contiguous()}), "shape"),
    "a fused projection of two parts": (lambda t: t.update(
        {"visual.transformer.resblocks.1.attn.in_proj_weight": torch.zeros(32, 16)}), "shape"),
    "an integer logit scale": (lambda t: t.update(
        {"logit_scale": torch.tensor(4, dtype=torch.int64)}), "dtype"),
}


@pytest.mark.parametrize("change", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_weights_the_config_does_not_describe_are_listed(
        tmp_path: Path, written: tuple[dict[str, Tensor], dict[str, Any]],
        change: tuple[Callable[[dict[str, Tensor]], None], str]) -> None:
    tensors = dict(written[0])
    change[0](tensors)
    error = _refusal(tmp_path, tensors, written[1])
    assert isinstance(error, CorruptCheckpointError) and error.details[change[1]]


@pytest.mark.parametrize(("preprocess", "error"), [
    ({"mean": [0.5, 0.5]}, CorruptCheckpointError), ({"std": [0.0, 1.0, 1.0]},
                                                     CorruptCheckpointError),
    ({"mode": "L"}, UnsupportedModelError)])
def test_a_bad_preprocess_cfg_is_refused(
        tmp_path: Path, written: tuple[dict[str, Tensor], dict[str, Any]],
        preprocess: dict[str, Any], error: type[MergeShieldError]) -> None:
    assert isinstance(_refusal(tmp_path, *written, preprocess=preprocess), error)


def test_hostile_tensors_and_config_bombs_are_refused_before_conversion(
        tmp_path: Path, written: tuple[dict[str, Tensor], dict[str, Any]]) -> None:
    nan = dict(written[0])
    nan["visual.class_embedding"] = torch.full((16,), float("nan"))
    assert isinstance(_refusal(tmp_path / "nan", nan, written[1]), InvalidWeightsError)
    bomb = copy.deepcopy(written[1])
    bomb["vision_cfg"].update(layers=200, width=65536, head_width=64)
    error = _refusal(tmp_path / "bomb", written[0], bomb)
    assert isinstance(error, ModelTooLargeError) and error.code == "model_too_large"


def test_pickles_remote_code_and_empty_folders_are_refused(tmp_path: Path) -> None:
    config = json.dumps({"model_cfg": {"embed_dim": 12}})
    cases: dict[str, tuple[dict[str, str | bytes], type[MergeShieldError], str]] = {
        "pt": ({"epoch_3.pt": b"\x80\x04N.", open_clip.CONFIG: config}, UnsafeFormatError,
               "unsafe_format"),
        "empty": ({open_clip.CONFIG: config}, NothingScannableError, "nothing_scannable"),
        "remote": ({open_clip.CONFIG: json.dumps({"auto_map": {"AutoModel": "x.Y"}}),
                    open_clip.WEIGHTS: b""}, UnsafeFormatError, "unsafe_format"),
        "not json": ({open_clip.CONFIG: "{", open_clip.WEIGHTS: b""}, CorruptCheckpointError,
                     "corrupt_checkpoint"),
    }
    for name, (files, error, code) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        for fname, data in files.items():
            path = folder / fname
            path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        with pytest.raises(error) as exc:
            checkpoints.resolve(str(folder), cache_dir=tmp_path / "cache")
        assert exc.value.code == code, name


# -- a scan --------------------------------------------------------------------------------------
def test_an_open_clip_suspect_is_scanned_against_the_zoos_clip_base(
        zoo: Zoo, bv_cache_dir: Path, tmp_path: Path) -> None:
    """The zoo's backdoored CLIP vision tower, saved as open_clip saves it, is read as exactly
    the zoo's tensors and ends in a report that flags it, as the Hugging Face layout does."""
    name, base = "clip-mnist-rot90-badnets", zoo.path("clip-base")
    with load_dir(zoo.path(name)) as ck, load_dir(base) as b:
        state = {k: ck[k] for k in ck} | {"visual_projection.weight": b["visual_projection.weight"]}
    folder = write_open_clip(tmp_path / "suspect", to_open_clip(state),
                             model_cfg(CLIPConfig.from_pretrained(base)),
                             preprocess={"mean": [0.5] * 3, "std": [0.5] * 3})
    with checkpoints.open_checkpoint(checkpoints.resolve(str(folder),
                                                         cache_dir=bv_cache_dir)) as got:
        assert set(got) == set(state) and all(torch.equal(got[k], v) for k, v in state.items())
    report = scan(ScanRequest(suspect=str(folder), base=str(base),
                              evaluation=str(zoo.dataset(name)), inversion=False,
                              unlearning=UnlearnConfig(enabled=False), inversion_steps=30,
                              max_eval=1000),
                  ScanContext(cache_dir=bv_cache_dir))
    assert report.suspect.family == "clip"
    assert report.suspect.architecture == "CLIPVisionModelWithProjection"
    assert [f.path for f in report.suspect.files] == [open_clip.WEIGHTS, "config.json"]
    assert report.task_vector is not None
    assert all(s.name.startswith("vision_model.") for s in report.task_vector.per_tensor)
    assert report.verdict.status == "backdoor_suspected"
