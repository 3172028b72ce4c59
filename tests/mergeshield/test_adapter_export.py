"""A scanned LoRA adapter's cleaned result, offered as an adapter of the same base: PEFT's own
merge of base + written adapter gives every tensor of the cleaned checkpoint, and so does ours;
where that is not exact, or no smaller, no adapter is written and the report says why (issue 15)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from mergeshield import adapter_export, adapters, checkpoints
from mergeshield.pipeline import ScanContext, ScanRequest, scan
from mergeshield.report import to_html, to_text
from mergeshield.report.schema import ScanReport

LAYER = "vit.encoder.layer.{i}."  # checkpoint names; PEFT names modules as they are in memory
Q0 = LAYER.format(i=0) + "attention.attention.query.weight"
FC1 = LAYER.format(i=1) + "intermediate.dense.weight"
NORM = LAYER.format(i=1) + "layernorm_before.weight"
POSITIONS = "vit.embeddings.position_embeddings"


def _tiny_vit(dtype: torch.dtype = torch.float32) -> transformers.ViTForImageClassification:
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=16,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=32, num_labels=10)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config)
    model.to(dtype)
    return model


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def lora(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    """(base folder, PEFT adapter folder): rank 4 on q_proj, v_proj and fc1, a new head saved;
    a float32 base, and a bfloat16 one (float32 LoRA factors then cost twice a weight's bytes)."""
    _tiny_vit(request.param).save_pretrained(tmp_path / "base")
    tuned = peft.get_peft_model(_tiny_vit(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"],
        modules_to_save=["classifier"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.5)  # PEFT starts B at zero: make the update non-trivial
    tuned.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "base", tmp_path / "adapter"


def _scan_with_bv(base: Path, adapter: Path, out: Path, edits: dict[str, torch.Tensor]
                  ) -> ScanReport:
    """The adapter scanned with a given BV (zero but for ``edits``) subtracted at λ=1: the
    cleaned checkpoint is suspect − edits, with nothing measured."""
    with checkpoints.open_checkpoint(checkpoints.resolve(str(base))) as ck:
        bv = {k: edits.get(k, torch.zeros(ck.info(k).shape)) for k in ck if k.startswith("vit.")}
    save_file(bv, str(out.parent / "bv.safetensors"))
    return scan(ScanRequest(suspect=str(adapter), base=str(base), fixed_lambda=1.0,
                            bv=str(out.parent / "bv.safetensors")),
                ScanContext(out_dir=out, cache_dir=out.parent / "cache"))


def _low_rank(rows: int, cols: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g) / 10


def _dense(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) / 10


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Every tensor equal to float rounding: a step of its dtype, at least 1e-5, of its scale."""
    assert got.keys() == want.keys()
    for key, w in want.items():
        scale, eps = float(w.abs().max()) if w.numel() else 0.0, torch.finfo(w.dtype).eps
        torch.testing.assert_close(got[key], w, rtol=eps, atol=max(1e-5, eps) * scale,
                                   msg=f"{key} differs")


def test_the_cleaned_adapter_is_the_cleaned_checkpoint_for_peft_and_for_us(
        lora: tuple[Path, Path], tmp_path: Path) -> None:
    """The cleaning adds a rank-2 change to a LoRA'd weight (LoRA at rank 6), a full-rank one to
    another (cheaper saved whole), and changes a layer norm and the position embeddings (saved
    whole, the latter as all of vit.embeddings)."""
    base, adapter = lora
    out = tmp_path / "out"
    report = _scan_with_bv(base, adapter, out, {
        Q0: _low_rank(16, 16, 2, 0), FC1: _dense((32, 16), 1), NORM: _dense((16,), 2),
        POSITIONS: _dense((1, 17, 16), 3)})
    assert report.output is not None and report.output.adapter is not None
    offered = report.output.adapter
    assert offered.status == "written", offered.message
    assert offered.directory == f"{out}/adapter"
    assert {f.path for f in offered.files} == {adapters.CONFIG, adapters.WEIGHTS}
    config = json.loads((out / "adapter" / adapters.CONFIG).read_text())
    q0 = "vit.layers.0.attention.q_proj"  # rank 4 + 2: 768 bytes of LoRA, 544 (bf16) whole
    saved = {"classifier", "vit.embeddings", "vit.layers.1.mlp.fc1",
             "vit.layers.1.layernorm_before"}
    if load_file(str(base / "model.safetensors"))[Q0].dtype == torch.float32:
        assert config["rank_pattern"] == {r"vit\.layers\.0\.attention\.q_proj": 6}
    else:
        assert config["rank_pattern"] == {}
        saved.add(q0)
    assert config["r"] == 4 and config["alpha_pattern"] == config["rank_pattern"]
    assert set(config["target_modules"]) == {
        q0, "vit.layers.1.attention.q_proj", "vit.layers.0.mlp.fc1",
        "vit.layers.0.attention.v_proj", "vit.layers.1.attention.v_proj"} - saved
    assert set(config["modules_to_save"]) == saved
    cleaned = load_file(str(out / "model.safetensors"))
    assert (out / "adapter" / adapters.WEIGHTS).stat().st_size < (
        out / "model.safetensors").stat().st_size
    # PEFT's own merge of the base and the written adapter
    model = transformers.ViTForImageClassification.from_pretrained(base)
    peft.PeftModel.from_pretrained(model, out / "adapter").merge_and_unload().save_pretrained(
        tmp_path / "peft-merged")
    _assert_same(load_file(str(tmp_path / "peft-merged" / "model.safetensors")), cleaned)
    # and this project's merge, which scans it
    src = adapters.merged_source(checkpoints.resolve(str(out / "adapter")),
                                 checkpoints.resolve(str(base)), cache_dir=tmp_path / "cache")
    with checkpoints.open_checkpoint(src) as ck:
        _assert_same({k: ck[k] for k in ck}, cleaned)
    assert offered.max_abs_error is not None
    assert "exact LoRA adapter" in to_text(report) and offered.message in to_html(report)
    # the adapter carries the cleaned checkpoint's provenance and cleaning status
    with checkpoints.open_checkpoint(checkpoints.resolve(str(out / "adapter"))) as ck:
        assert ck.metadata["mergeshield.scan_id"] == report.scan_id


def test_a_cleaning_that_moves_every_tensor_gives_no_adapter_and_says_why(
        lora: tuple[Path, Path], tmp_path: Path) -> None:
    """A dense change of every backbone tensor (as unlearning makes) needs every module saved
    whole: no smaller than the checkpoint, so none is written, and an earlier one is removed."""
    base, adapter = lora
    out = tmp_path / "out"
    first = _scan_with_bv(base, adapter, out, {Q0: _low_rank(16, 16, 2, 0)})
    assert first.output and first.output.adapter and first.output.adapter.status == "written"
    with checkpoints.open_checkpoint(checkpoints.resolve(str(base))) as ck:
        every = {k: _dense(ck.info(k).shape, i) for i, k in enumerate(ck) if k.startswith("vit.")}
    report = _scan_with_bv(base, adapter, out, every)
    assert report.output is not None and report.output.adapter is not None
    offered = report.output.adapter
    assert offered.status == "not_smaller"
    assert offered.directory is None and offered.files == []
    assert "not smaller than" in offered.message and "use the checkpoint" in offered.message
    assert not (out / "adapter").exists()
    assert not list(out.glob(".adapter-*"))  # no half-written folder left
    assert (out / "model.safetensors").is_file()  # the full checkpoint is still the download
    assert f"Adapter: {offered.message}" in to_text(report)


def test_a_cleaned_checkpoint_no_adapter_of_the_base_can_name_gets_no_adapter(
        lora: tuple[Path, Path], tmp_path: Path) -> None:
    """Where the cleaned tensors are not the base's (here one is missing), the offer refuses
    with the reason instead of writing an adapter that would leave it out."""
    base, adapter = lora
    merged = adapters.merged_source(checkpoints.resolve(str(adapter)),
                                    checkpoints.resolve(str(base)), cache_dir=tmp_path / "cache")
    cleaned = load_file(str(merged.tensor_files[0]))
    del cleaned[POSITIONS]
    out = tmp_path / "out"
    out.mkdir()
    save_file(cleaned, str(out / "model.safetensors"))
    shutil.copytree(adapter, out / "adapter")  # an older answer in the way
    got = adapter_export.offer(out, merged, checkpoints.resolve(str(base)),
                               [out / "model.safetensors"], metadata={}, base_label="base")
    assert got.status == "not_exact" and got.folder is None
    assert POSITIONS in got.message and "names its tensors unlike the base" in got.message
    assert not (out / "adapter").exists()


def test_a_cleaned_checkpoint_equal_to_the_scanned_adapter_gives_its_own_ranks_back(
        lora: tuple[Path, Path], tmp_path: Path) -> None:
    """Nothing subtracted (λ=0): the adapter written is the scanned one, at rank 4 everywhere."""
    base, adapter = lora
    out = tmp_path / "out"
    report = _scan_with_bv(base, adapter, out, {})
    assert report.output and report.output.adapter and report.output.adapter.status == "written"
    config = json.loads((out / "adapter" / adapters.CONFIG).read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {}
    assert config["modules_to_save"] == ["classifier"]
    want = load_file(str(adapter / adapters.WEIGHTS))
    got = load_file(str(out / "adapter" / adapters.WEIGHTS))
    # B·A equal however SVD splits it (α/r = 2), but for the base dtype's rounding of the merge
    eps = max(1e-5, torch.finfo(load_file(str(base / "model.safetensors"))[Q0].dtype).eps)
    for key in (k for k in want if "lora_A" in k):
        b = key.replace("lora_A", "lora_B")
        update = want[b] @ want[key] * 2
        assert float((got[b] @ got[key] - update).abs().max()) < 4 * eps * float(
            update.abs().max())


def test_a_cleaning_that_undoes_every_low_rank_update_keeps_one_zero_lora_module(
        lora: tuple[Path, Path], tmp_path: Path) -> None:
    """Only the saved head differs from the base: PEFT needs one LoRA module, so one adapted
    module carries a zero rank-1 update, and PEFT's merge still gives the cleaned tensors."""
    base, adapter = lora
    merged = adapters.merged_source(checkpoints.resolve(str(adapter)),
                                    checkpoints.resolve(str(base)), cache_dir=tmp_path / "cache")
    before = load_file(str(base / "model.safetensors"))
    cleaned = {k: v if k.startswith("classifier.") else before[k]
               for k, v in load_file(str(merged.tensor_files[0])).items()}
    out = tmp_path / "out"
    out.mkdir()
    save_file(cleaned, str(out / "model.safetensors"))
    got = adapter_export.offer(out, merged, checkpoints.resolve(str(base)),
                               [out / "model.safetensors"], metadata={}, base_label="base")
    assert got.status == "written", got.message
    assert "zero rank-1" in got.message
    config = json.loads((out / "adapter" / adapters.CONFIG).read_text())
    assert len(config["target_modules"]) == 1 and config["modules_to_save"] == ["classifier"]
    model = transformers.ViTForImageClassification.from_pretrained(base)
    peft.PeftModel.from_pretrained(model, out / "adapter").merge_and_unload().save_pretrained(
        tmp_path / "peft-merged")
    _assert_same(load_file(str(tmp_path / "peft-merged" / "model.safetensors")), cleaned)
