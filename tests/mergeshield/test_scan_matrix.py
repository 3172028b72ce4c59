"""What can I scan: every image-classifier family transformers offers here and CLIP, in every
float precision, through ``scan``, ``bv compute`` and ``merge``; a sharded checkpoint by hub id too.
Each row must end in a report or a written checkpoint, never an error. The table it measures is
written to docs/scan-matrix.md (the README's "what can I scan" links it), as the dashboard's
browser test writes its screenshots (issue 15)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers

from mergeshield import checkpoints
from mergeshield.cli import main as cli
from mergeshield.ibvs import InjectionRecipe
from mergeshield.pipeline import ScanContext, ScanRequest, scan
from mergeshield.unlearning import UnlearnConfig
from tests.support.hub import LoopbackHub
from tests.support.open_clip import model_cfg, to_open_clip, write_open_clip
from tests.support.tiny import char_vocab, clip_config, vision_config_dict

DOC = Path(__file__).resolve().parents[2] / "docs" / "scan-matrix.md"
IMAGE = 16
# tiny configs of the real architectures (grey 16×16 images, 10 classes: the bundled digits)
FAMILIES: dict[str, Callable[[], transformers.PreTrainedModel]] = {
    "ViT": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=IMAGE, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=10)),
    "DeiT": lambda: transformers.DeiTForImageClassification(transformers.DeiTConfig(
        image_size=IMAGE, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=10)),
    "BEiT": lambda: transformers.BeitForImageClassification(transformers.BeitConfig(
        image_size=IMAGE, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=10, use_mean_pooling=True)),
    "Swin": lambda: transformers.SwinForImageClassification(transformers.SwinConfig(
        image_size=IMAGE, patch_size=2, num_channels=1, embed_dim=8, depths=[1, 1],
        num_heads=[1, 2], window_size=2, num_labels=10)),
    "ConvNeXt": lambda: transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        num_channels=1, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)),
    "ResNet": lambda: transformers.ResNetForImageClassification(transformers.ResNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)),
}
# (suspect dtype, base dtype): a fine-tune stored in another precision than its base is common
PRECISIONS = {"fp32": (torch.float32, torch.float32), "fp16": (torch.float16, torch.float32),
              "bf16": (torch.bfloat16, torch.float32), "bf16 + bf16 base": (torch.bfloat16,
                                                                          torch.bfloat16)}
FAST = {"probes": False, "inversion": False, "unlearning": UnlearnConfig(enabled=False),
        "lambdas": [0.0, 1.0], "max_eval": 100, "recipe": InjectionRecipe(epochs=1, max_train=100)}


def _pair(make: Callable[[], transformers.PreTrainedModel], root: Path, suspect: torch.dtype,
          base: torch.dtype, shard: str | None = None) -> tuple[Path, Path]:
    """A base and a 'fine-tune' of it (the base plus small noise), saved in those dtypes."""
    torch.manual_seed(0)
    model = make()
    model.to(base).save_pretrained(root / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    extra = {"max_shard_size": shard} if shard else {}
    model.to(suspect).save_pretrained(root / "suspect", **extra)
    return root / "suspect", root / "base"


def _clip_pair(root: Path, suspect: torch.dtype, base: torch.dtype) -> tuple[Path, Path]:
    """A full CLIP base (its text tower makes the zero-shot head) and a fine-tuned vision tower
    in the task-vector layout (``CLIPVisionModel``), saved in those dtypes."""
    torch.manual_seed(0)
    transformers.CLIPModel(clip_config()).to(base).save_pretrained(root / "base")
    transformers.CLIPTokenizer(vocab=char_vocab(), merges=[]).save_pretrained(root / "base")
    with checkpoints.open_checkpoint(checkpoints.resolve(str(root / "base"))) as ck:
        tower = {k: (ck[k].float() + 0.01 * torch.randn(ck[k].shape)).to(suspect)
                 for k in ck if k.startswith("vision_model.")}
    checkpoints.save_checkpoint(root / "suspect", tower, config=vision_config_dict())
    return root / "suspect", root / "base"


def _open_clip_pair(root: Path) -> tuple[Path, Path]:
    """The CLIP pair in open_clip's own layout (``open_clip_config.json`` +
    ``open_clip_model.safetensors``): a full base with its tokenizer, a bf16 fine-tune of it."""
    torch.manual_seed(0)
    config = clip_config()
    model = transformers.CLIPModel(config)
    transformers.CLIPTokenizer(vocab=char_vocab(), merges=[]).save_pretrained(root / "tokenizer")
    base = {k: v.detach() for k, v in model.state_dict().items()}
    tuned = {k: (v + 0.01 * torch.randn(v.shape) if k.startswith("vision_model.") else v)
             .to(torch.bfloat16) for k, v in base.items()}
    write_open_clip(root / "base", to_open_clip(base), model_cfg(config),
                    tokenizer_from=root / "tokenizer")
    write_open_clip(root / "suspect", to_open_clip(tuned), model_cfg(config))
    return root / "suspect", root / "base"


def _lora_pair(root: Path) -> tuple[Path, Path]:
    """A ViT base and a PEFT LoRA adapter of it (the attention's q and v at rank 4, random B so it
    changes the model; the new head saved whole), written by PEFT itself."""
    torch.manual_seed(0)
    model = FAMILIES["ViT"]()
    model.save_pretrained(root / "base")
    tuned = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"],
        init_lora_weights=False))
    tuned.save_pretrained(root / "adapter")
    return root / "adapter", root / "base"


def _cli(*args: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return cli(list(args))


def test_every_family_and_precision_scans_computes_a_bv_and_merges(
        tmp_path: Path, hub: LoopbackHub) -> None:
    rows: list[tuple[str, str, str, str, str, str]] = []
    cache = tmp_path / "cache"
    for family in [*FAMILIES, "CLIP"]:
        for precision, (sus_dtype, base_dtype) in PRECISIONS.items():
            root = tmp_path / family / precision.replace(" ", "-")
            suspect, base = (_clip_pair(root, sus_dtype, base_dtype) if family == "CLIP"
                             else _pair(FAMILIES[family], root, sus_dtype, base_dtype))
            report = scan(ScanRequest(suspect=str(suspect), base=str(base), evaluation="digits",
                                      **FAST),
                          ScanContext(out_dir=root / "out", cache_dir=cache))
            assert report.metrics.clean_accuracy_before is not None, (family, precision)
            assert (root / "out" / "model.safetensors").is_file(), (family, precision)
            bv = _cli("bv", "compute", "--clean", str(base), "--backdoored", str(suspect),
                      "--out", str(root / "bv"))
            merged = _cli("merge", str(suspect), "--base", str(base), "--out",
                          str(root / "merged"))
            assert (bv, merged) == (0, 0), (family, precision, bv, merged)
            if family == "CLIP":  # the task-vector layout: a vision tower, its head zero-shot
                transformers.CLIPVisionModel.from_pretrained(root / "out")
            else:
                loaded = transformers.AutoModelForImageClassification.from_pretrained(
                    root / "out")
                assert loaded.config.num_labels == 10
            rows.append((family, precision, "folder", "report", "written", "written"))
    # open_clip's own layout, converted on reading: a report, a BV and a merge in HF layout
    suspect, base = _open_clip_pair(tmp_path / "open_clip")
    report = scan(ScanRequest(suspect=str(suspect), base=str(base), evaluation="digits", **FAST),
                  ScanContext(out_dir=tmp_path / "open_clip" / "out", cache_dir=cache))
    assert report.metrics.clean_accuracy_before is not None
    assert (_cli("bv", "compute", "--clean", str(base), "--backdoored", str(suspect), "--out",
                 str(tmp_path / "open_clip" / "bv")),
            _cli("merge", str(suspect), "--base", str(base), "--out",
                 str(tmp_path / "open_clip" / "merged"))) == (0, 0)
    transformers.CLIPModel.from_pretrained(tmp_path / "open_clip" / "out")
    rows.append(("CLIP", "bf16", "open_clip folder", "report", "written", "written"))
    # a LoRA adapter: scanned, a BV computed and merged as the model it makes with the base
    suspect, base = _lora_pair(tmp_path / "lora")
    report = scan(ScanRequest(suspect=str(suspect), base=str(base), evaluation="digits", **FAST),
                  ScanContext(out_dir=tmp_path / "lora" / "out", cache_dir=cache))
    assert report.metrics.clean_accuracy_before is not None
    assert report.output is not None and report.output.adapter is not None
    assert (_cli("bv", "compute", "--clean", str(base), "--backdoored", str(suspect), "--base",
                 str(base), "--out", str(tmp_path / "lora" / "bv")),
            _cli("merge", str(suspect), "--base", str(base), "--out",
                 str(tmp_path / "lora" / "merged"))) == (0, 0)
    transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "lora" / "merged")
    assert _cli("bv", "compute", "--clean", str(base), "--backdoored", str(suspect), "--out",
                str(tmp_path / "lora" / "no-base")) == 2  # an adapter alone names no model
    rows.append(("ViT", "fp32", "LoRA adapter (PEFT)", "report", "written", "written"))
    # a sharded checkpoint, by hub id through the real client (the loopback hub)
    suspect, base = _pair(FAMILIES["ViT"], tmp_path / "hub", torch.bfloat16, torch.float32,
                          shard="2KB")
    assert len(list(suspect.glob("*.safetensors"))) > 1
    hub.add_repo("acme/vit-sharded", suspect)
    hub.add_repo("acme/vit-base", base)
    report = scan(ScanRequest(suspect="acme/vit-sharded", base="acme/vit-base",
                              evaluation="digits", **FAST),
                  ScanContext(endpoint=hub.url, cache_dir=cache, out_dir=tmp_path / "hub-out"))
    assert report.suspect.kind == "hub" and len(report.suspect.files) > 2
    rows.append(("ViT", "bf16", "hub id, sharded", "report", "–", "–"))
    DOC.write_text(_table(rows))


def _table(rows: list[tuple[str, str, str, str, str, str]]) -> str:
    lines = ["# What can I scan", "",
             "Written by `tests/mergeshield/test_scan_matrix.py` from tiny models built from each",
             "architecture's real transformers config (random weights; the suspect is the base",
             "plus noise). Each row ran `scan` (with the bundled `digits` evaluation data, so the",
             "forward pass, BV_inj, the sweep and the cleaned checkpoint all ran), `mergeshield bv",
             "compute` and `mergeshield merge`. The cleaned checkpoint loads with transformers.",
             "CLIP: a full CLIPModel base and a fine-tuned CLIPVisionModel tower (the task-vector",
             "layout), the head zero-shot from the base's text tower. A LoRA adapter is read",
             "as the model it makes with its base (`bv compute` given `--base`); its merge with",
             "PEFT's own: `tests/mergeshield/test_adapters.py`.",
             "",
             "| family | suspect / base precision | source | scan | bv compute | merge |",
             "|---|---|---|---|---|---|"]
    names = {"fp32": "fp32 / fp32", "fp16": "fp16 / fp32", "bf16": "bf16 / fp32",
             "bf16 + bf16 base": "bf16 / bf16"}
    for family, precision, source, *outcomes in rows:
        lines.append(f"| {family} | {names.get(precision, precision)} | {source} | "
                     + " | ".join(outcomes) + " |")
    return "\n".join(lines) + "\n"
