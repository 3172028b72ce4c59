"""LoRA adapters merged into their base: the same tensors as PEFT's own merge, and a scan of an
adapter that makes the zoo's backdoored fine-tune finds its backdoor (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from mergeshield import adapters, checkpoints
from mergeshield.errors import (
    CorruptCheckpointError,
    IncompatibleModelsError,
    UnsupportedModelError,
)
from mergeshield.models import family_for
from mergeshield.pipeline import ScanContext, ScanRequest, scan
from mergeshield.unlearning import UnlearnConfig
from tests.support.zoo import Zoo


def _tiny_vit(labels: int = 3) -> transformers.ViTForImageClassification:
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=16,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=32, num_labels=labels)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config)


def _merge(adapter: Path, base: Path, cache: Path) -> dict[str, torch.Tensor]:
    src = adapters.merged_source(checkpoints.resolve(str(adapter)),
                                 checkpoints.resolve(str(base)), cache_dir=cache)
    with checkpoints.open_checkpoint(src) as ck:
        return {k: ck[k] for k in ck}


@pytest.mark.parametrize("options", [
    {}, {"use_rslora": True}, {"alpha_pattern": {"fc1": 2.0}, "rank_pattern": {"fc1": 2}}])
def test_the_merge_is_the_one_peft_makes(tmp_path: Path, options: dict[str, Any]) -> None:
    base = _tiny_vit(labels=10)
    base.save_pretrained(tmp_path / "base")
    tuned = peft.get_peft_model(_tiny_vit(labels=10), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"],
        modules_to_save=["classifier"], **options))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.5)  # PEFT starts B at zero: make the update non-trivial
    tuned.save_pretrained(tmp_path / "adapter")
    tuned.merge_and_unload().save_pretrained(tmp_path / "peft-merged")  # checkpoint names
    want = load_file(str(tmp_path / "peft-merged" / "model.safetensors"))
    got = _merge(tmp_path / "adapter", tmp_path / "base", tmp_path / "cache")
    assert got.keys() == want.keys()
    worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
    assert worst < 1e-5, worst
    before = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert sum(not torch.equal(got[k], before[k]) for k in got) == 2 * 3 + 2  # 3 LoRA × 2 layers
    assert got["classifier.weight"].shape == (10, 16)
    # written once: the same adapter and base read the cached merge
    assert len(list((tmp_path / "cache" / "mergeshield-adapters").iterdir())) == 1
    _merge(tmp_path / "adapter", tmp_path / "base", tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "mergeshield-adapters").iterdir())) == 1


def test_a_saved_head_takes_the_bfloat16_base_dtype_as_peft_loads_it(tmp_path: Path) -> None:
    """A float32 adapter (LoRA and a saved head) on a bfloat16 base: PEFT loads the head into
    the base's bfloat16 module, and the merge gives the same tensors, dtypes included."""
    _tiny_vit(labels=10).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    tuned = peft.get_peft_model(_tiny_vit(labels=10), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "fc1"], modules_to_save=["classifier"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.5)
    tuned.save_pretrained(tmp_path / "adapter")
    base = transformers.ViTForImageClassification.from_pretrained(tmp_path / "base")
    peft.PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().save_pretrained(
        tmp_path / "peft-merged")
    want = load_file(str(tmp_path / "peft-merged" / "model.safetensors"))
    got = _merge(tmp_path / "adapter", tmp_path / "base", tmp_path / "cache")
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in want.items()}
    assert got["classifier.weight"].dtype == torch.bfloat16
    assert all(torch.equal(got[k], want[k]) for k in want)


def _adapter_folder(folder: Path, tensors: dict[str, torch.Tensor], **config: Any) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / adapters.WEIGHTS))
    (folder / adapters.CONFIG).write_text(json.dumps(
        {"peft_type": "LORA", "lora_alpha": 8, "r": 4, **config}))
    return folder


@pytest.mark.parametrize(("config", "tensors", "error"), [
    ({"use_dora": True}, {}, UnsupportedModelError),
    ({"peft_type": "IA3"}, {}, UnsupportedModelError),
    ({}, {"q_proj.lora_A.weight": torch.ones(4, 16)}, CorruptCheckpointError),
    ({}, {"vit.layers.0.attention.q_proj.lora_A.weight": torch.ones(4, 16)},
     CorruptCheckpointError),  # A without B
    ({}, {"vit.layers.0.attention.q_proj.lora_A.weight": torch.ones(4, 24),
          "vit.layers.0.attention.q_proj.lora_B.weight": torch.ones(16, 4)},
     IncompatibleModelsError),  # made for a wider model
    ({}, {"vit.embeddings.lora_embedding_A": torch.ones(4, 16)}, UnsupportedModelError),
    ({}, {"not.in.base.weight": torch.ones(2)}, IncompatibleModelsError),
])
def test_what_is_not_a_plain_lora_of_this_base_is_refused(
        tmp_path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
        error: type[Exception]) -> None:
    _tiny_vit().save_pretrained(tmp_path / "base")
    named = {k if k.startswith("q_proj") else adapters.PREFIX + k: v for k, v in tensors.items()}
    folder = _adapter_folder(tmp_path / "adapter", named or {adapters.PREFIX + "x.weight":
                                                             torch.ones(1)}, **config)
    with pytest.raises(error):
        _merge(folder, tmp_path / "base", tmp_path / "cache")
    assert not list((tmp_path / "cache" / "mergeshield-adapters").glob("*/config.json"))


def test_an_adapter_that_makes_the_backdoored_fine_tune_is_flagged(
        zoo: Zoo, tmp_path: Path, bv_cache_dir: Path) -> None:
    """The zoo's BadNets fine-tune as a LoRA adapter of its base: every linear weight's task
    vector at full rank (B·A = Δ exactly), the other tensors saved whole, as modules_to_save
    are. The scan merges it, flags the backdoor and writes a full cleaned checkpoint."""
    name = "vit-mnist-badnets"
    base_src = checkpoints.resolve(str(zoo.path("vit-base")))
    assert base_src.config is not None
    # PEFT names modules as they are in memory (transformers>=5 renames them on load)
    live = {v: k for k, v in family_for(base_src.config, base_src.config)
            .checkpoint_names().items()}
    tensors: dict[str, torch.Tensor] = {}
    with checkpoints.open_checkpoint(checkpoints.resolve(str(zoo.path(name)))) as tuned, \
            checkpoints.open_checkpoint(base_src) as base:
        for key in tuned:
            module = live.get(key, key).removesuffix(".weight")
            if key.endswith(".weight") and tuned[key].ndim == 2 and ".layer" in key:
                u, s, vh = torch.linalg.svd(tuned[key].double() - base[key].double(),
                                            full_matrices=False)
                tensors[f"{adapters.PREFIX}{module}.lora_A.weight"] = vh.float().contiguous()
                tensors[f"{adapters.PREFIX}{module}.lora_B.weight"] = (u * s).float().contiguous()
            elif key not in base or not torch.equal(tuned[key], base[key]):
                tensors[adapters.PREFIX + live.get(key, key)] = tuned[key].contiguous()
    rank = next(v.shape[0] for k, v in tensors.items() if "lora_A" in k)
    folder = _adapter_folder(tmp_path / "adapter", tensors, lora_alpha=rank, r=rank)
    report = scan(ScanRequest(suspect=str(folder), base=str(zoo.path("vit-base")),
                              evaluation=str(zoo.dataset(name)), inversion=False,
                              unlearning=UnlearnConfig(enabled=False)),
                  ScanContext(out_dir=tmp_path / "out", cache_dir=bv_cache_dir))
    assert report.verdict.status == "backdoor_suspected", report.verdict
    assert [f.path for f in report.suspect.files][0] == adapters.WEIGHTS
    assert report.suspect.source == str(folder)
    model = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert model.config.num_labels == len(report.evaluation.classes)  # type: ignore[union-attr]
    # the adapter changes every tensor, so an exact adapter of the cleaned result is the whole
    # model again: none is offered, and the report says so next to the checkpoint
    assert report.output is not None and report.output.adapter is not None
    assert report.output.adapter.status == "not_smaller", report.output.adapter.message
    assert not (tmp_path / "out" / "adapter").exists()
