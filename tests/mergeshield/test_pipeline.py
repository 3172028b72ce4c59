"""``scan`` end to end on the quick zoo: verdicts, the cleaned checkpoint, incomplete scans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergeshield import bv_cache
from mergeshield.errors import IncompatibleModelsError
from mergeshield.pipeline import ScanContext, ScanRequest, scan
from mergeshield.report import exit_code
from mergeshield.report.schema import ScanReport, Severity
from mergeshield.triggers import INVERTED_FILE, digest, load_image_triggers
from mergeshield.unlearning import UnlearnConfig
from tests.support.zoo import Zoo
from tests.support.zoo import independent_asr as _independent_asr

FAST = {"inversion_steps": 30, "max_eval": 1000}
NO_REPAIR = UnlearnConfig(enabled=False)  # IBVS alone: tests not about the repair


def _request(zoo: Zoo, name: str, **kw: object) -> ScanRequest:
    m = zoo.model(name)
    return ScanRequest(suspect=str(zoo.path(name)), base=str(zoo.path(m["base"])),
                       evaluation=str(zoo.dataset(name)), **{**FAST, **kw})  # type: ignore[arg-type]


PROGRESS: list[tuple[str, float]] = []  # what the backdoored scan reported while it ran


@pytest.fixture(scope="module")
def backdoored(zoo: Zoo, bv_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[ScanReport, Path]:
    out = tmp_path_factory.mktemp("cleaned")
    report = scan(_request(zoo, "vit-mnist-badnets"),
                  ScanContext(out_dir=out, formats=("json", "sarif", "html"),
                              cache_dir=bv_cache_dir,
                              progress=lambda stage, f: PROGRESS.append((stage, f))))
    return report, out


def test_progress_moves_inside_the_long_stages(backdoored: tuple[ScanReport, Path]) -> None:
    """Issue 15: the service's percent sat still through inversion and the sweep."""
    for stage in ("invert_triggers", "sweep", "unlearn"):
        inside = [f for s, f in PROGRESS if s == stage and 0 < f < 1]
        assert len(inside) >= 2, (stage, [f for s, f in PROGRESS if s == stage][:10])
        ours = [f for s, f in PROGRESS if s == stage]
        assert ours == sorted(ours) or stage == "unlearn"  # a repair round starts again at 0


def test_backdoored_model_is_flagged(backdoored: tuple[ScanReport, Path]) -> None:
    report, out = backdoored
    assert report.verdict.status == "backdoor_suspected"
    assert report.verdict.severity in (Severity.HIGH, Severity.CRITICAL)
    assert exit_code(report, Severity.MEDIUM) == 1
    assert not report.incomplete
    assert {"report.json", "report.sarif", "report.html", "model.safetensors",
            "config.json"} <= {p.name for p in out.iterdir()}
    assert ScanReport.model_validate(json.loads((out / "report.json").read_text())) == report
    assert report.suspect.files and all(len(f.sha256) == 64 for f in report.suspect.files)
    sweep = report.sweep
    assert sweep is not None and sweep.points[0].lam == 0.0
    ids = {t.id for t in report.metrics.triggers}
    assert any(i.startswith("probe:") for i in ids) and any(i.startswith("inverted:") for i in ids)
    assert any(i.startswith("injection:") for i in ids)
    # each inverted trigger the report describes is stored beside it, as its digest says
    stored = load_image_triggers(out / INVERTED_FILE)
    inverted = {t.id: t.spec["sha256"] for t in report.metrics.triggers if t.source == "inverted"}
    assert inverted and {i: digest(t) for i, t in stored.items()} == inverted


def test_cleaned_checkpoint_lowers_the_planted_backdoor(zoo: Zoo,
                                                       backdoored: tuple[ScanReport, Path]) -> None:
    report, out = backdoored
    before_asr, before_acc = _independent_asr(zoo.path("vit-mnist-badnets"), zoo,
                                              "vit-mnist-badnets")
    after_asr, after_acc = _independent_asr(out, zoo, "vit-mnist-badnets")
    assert before_asr > 0.8
    assert after_asr < before_asr - 0.2, (before_asr, after_asr)
    assert before_acc - after_acc <= 0.02 + 0.005  # the budget, measured on the same images
    cleaning = report.cleaning
    assert cleaning is not None and cleaning.status in ("removed", "not_removed"), cleaning
    if cleaning.status == "removed":  # it says what it measured: the triggers it found
        assert cleaning.message.startswith("found backdoor removed: no trigger the scan found")
        assert cleaning.message.endswith("one it did not find may still work")
    else:
        assert cleaning.message.startswith("backdoor not removed")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["mergeshield.scan_id"] == report.scan_id
    assert float(meta["mergeshield.ibvs_lambda"]) == report.sweep.chosen_lambda  # type: ignore[union-attr]
    assert meta["mergeshield.recipe_hash"] == report.injection.recipe_hash  # type: ignore[union-attr]


def test_a_same_norm_random_direction_does_not_clean(zoo: Zoo, tmp_path: Path,
                                                     backdoored: tuple[ScanReport, Path]) -> None:
    """The control of method.md: the drop comes from BV_inj's direction, not from its size."""
    from mergeshield import checkpoints

    _, out = backdoored
    name = "vit-mnist-badnets"
    src = checkpoints.resolve(str(zoo.path(name)))
    with checkpoints.open_checkpoint(src) as suspect, \
            checkpoints.open_checkpoint(checkpoints.resolve(str(out))) as cleaned:
        keys = [k for k in suspect if k.startswith("vit.")]
        step = {k: suspect[k] - cleaned[k] for k in keys}  # λ·BV_inj as applied
        norm = torch.sqrt(sum((v.float() ** 2).sum() for v in step.values()))
        gen = torch.Generator().manual_seed(1)
        noise = {k: torch.randn(v.shape, generator=gen) for k, v in step.items()}
        scale = norm / torch.sqrt(sum((v ** 2).sum() for v in noise.values()))
        tensors = {k: (suspect[k] - scale * noise[k]) if k in noise else suspect[k]
                   for k in suspect}
        checkpoints.save_checkpoint(tmp_path, tensors, config=src.config)
    before_asr, _ = _independent_asr(zoo.path(name), zoo, name)
    random_asr, _ = _independent_asr(tmp_path, zoo, name)
    cleaned_asr, _ = _independent_asr(out, zoo, name)
    assert random_asr > before_asr - 0.1
    assert cleaned_asr < random_asr - 0.2


def test_clean_fine_tune_passes(zoo: Zoo, bv_cache_dir: Path) -> None:
    """Nothing found, so nothing is claimed removed; the precautionary repair (IBVS and the
    most suspicious inverted patch unlearned) is said, with its cost."""
    report = scan(_request(zoo, "vit-mnist-clean"), ScanContext(cache_dir=bv_cache_dir))
    assert report.verdict.status == "no_backdoor_found", report.verdict.reasons
    assert exit_code(report, Severity.MEDIUM) == 0
    assert report.injection is not None and report.injection.cached  # built by the first scan
    cleaning = report.cleaning
    assert cleaning is not None and cleaning.status == "precautionary", cleaning
    assert cleaning.unlearning and any(u.startswith("inverted:")
                                       for u in cleaning.unlearning[0].unlearned)
    # the precaution unlearns the patch and the blend; a warp only when it is a finding
    assert not any(u.startswith("inverted-warp") for u in cleaning.unlearning[0].unlearned)
    assert "precaution" in cleaning.message and "clean accuracy" in cleaning.message
    assert cleaning.clean_accuracy_cost_points is not None


def test_the_warp_search_is_a_described_and_stored_inverted_trigger(
        zoo: Zoo, bv_cache_dir: Path, tmp_path: Path) -> None:
    """``inversion_warp_shift`` (2 px per 28 by default): a smooth warp per target, judged like
    the other searches; the one that stands out is reported with its bound and stored beside the
    report (a merge plan measures it again), and the HTML report previews it."""
    report = scan(_request(zoo, "vit-mnist-clean", unlearning=NO_REPAIR),
                  ScanContext(out_dir=tmp_path, formats=("json", "html"), cache_dir=bv_cache_dir))
    warp = [t for t in report.metrics.triggers if t.id.startswith("inverted-warp:target-")]
    assert len(warp) == 1 and warp[0].source == "inverted"
    assert warp[0].spec["max_shift_pixels"] == pytest.approx(2.0)
    stored = load_image_triggers(tmp_path / INVERTED_FILE)
    assert digest(stored[warp[0].id]) == warp[0].spec["sha256"]
    assert warp[0].id in (tmp_path / "report.html").read_text()


def test_clip_vision_checkpoint_is_scanned_against_full_clip_base(zoo: Zoo,
                                                                  bv_cache_dir: Path) -> None:
    report = scan(_request(zoo, "clip-mnist-rot90-badnets", inversion=False, unlearning=NO_REPAIR),
                  ScanContext(cache_dir=bv_cache_dir))
    assert report.suspect.family == "clip"
    assert report.suspect.architecture == "CLIPVisionModel"
    assert report.verdict.status == "backdoor_suspected"
    assert report.task_vector is not None
    assert all(s.name.startswith("vision_model.") for s in report.task_vector.per_tensor)


def test_without_evaluation_data_the_scan_is_incomplete(zoo: Zoo, tmp_path: Path) -> None:
    request = ScanRequest(suspect=str(zoo.path("vit-mnist-badnets")),
                          base=str(zoo.path("vit-base")))
    report = scan(request, ScanContext(out_dir=tmp_path))
    assert report.verdict.status == "inconclusive"
    assert [r.code for r in report.incomplete] == ["no_evaluation_data"]
    assert exit_code(report, Severity.LOW) == 2
    assert report.task_vector is not None and report.task_vector.norm > 0
    assert not (tmp_path / "model.safetensors").exists()  # nothing sanitised without a measure


def test_unknown_family_gets_the_architecture_agnostic_part(tmp_path: Path) -> None:
    from mergeshield import checkpoints

    gen = torch.Generator().manual_seed(0)
    base = {"encoder.w": torch.randn(8, 8, generator=gen), "head.w": torch.randn(3, 8,
                                                                                 generator=gen),
            "pos_ids": torch.arange(8)}
    ft = {**base, "encoder.w": base["encoder.w"] + 0.1, "head.w": torch.randn(5, 8, generator=gen)}
    for name, tensors in (("base", base), ("ft", ft)):
        checkpoints.save_checkpoint(tmp_path / name, tensors, config={"model_type": "mystery"})
    report = scan(ScanRequest(suspect=str(tmp_path / "ft"), base=str(tmp_path / "base"),
                              evaluation="digits"))
    assert report.verdict.status == "inconclusive"
    assert "unsupported_model" in [r.code for r in report.incomplete]
    tv = report.task_vector
    assert tv is not None and [s.name for s in tv.per_tensor] == ["encoder.w"]
    assert abs(tv.norm - 0.8) < 1e-4  # 64 entries of 0.1
    reasons = {s.name: s.reason for s in tv.skipped}
    assert "non-float" in reasons["pos_ids"] and "differs" in reasons["head.w"]

    # IBVS subtraction with a given BV still works without a forward pass, at a given λ
    checkpoints.save_checkpoint(tmp_path / "bv", {"encoder.w": torch.full((8, 8), 0.05)})
    out = tmp_path / "cleaned"
    report = scan(ScanRequest(suspect=str(tmp_path / "ft"), base=str(tmp_path / "base"),
                              bv=str(tmp_path / "bv"), fixed_lambda=2.0),
                  ScanContext(out_dir=out))
    assert report.task_vector is not None
    assert report.task_vector.per_tensor[0].cosine_with_injection_bv == pytest.approx(1.0)
    with checkpoints.open_checkpoint(checkpoints.resolve(str(out))) as cleaned:
        assert torch.allclose(cleaned["encoder.w"], base["encoder.w"], atol=1e-6)  # ft − 2·0.05
        assert torch.equal(cleaned["head.w"], ft["head.w"]) and torch.equal(cleaned["pos_ids"],
                                                                            ft["pos_ids"])
    assert report.output is not None and report.output.metadata["mergeshield.ibvs_lambda"] == "2.0"


def test_mismatched_architectures_are_refused(zoo: Zoo) -> None:
    request = ScanRequest(suspect=str(zoo.path("vit-mnist-badnets")),
                          base=str(zoo.path("clip-base")), evaluation=str(zoo.dataset(
                              "vit-mnist-badnets")))
    with pytest.raises(IncompatibleModelsError) as info:
        scan(request)
    assert info.value.details


@pytest.mark.parametrize(("suspect_dtype", "base_dtype"), [
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32)])
def test_a_fine_tune_in_any_float_precision_is_scanned_and_comes_out_in_its_own(
        zoo: Zoo, tmp_path: Path, bv_cache_dir: Path, suspect_dtype: torch.dtype,
        base_dtype: torch.dtype) -> None:
    """Issue 15: a bf16 or fp16 fine-tune of an fp32 base (common on the hub) is a fine-tune,
    not an architecture mismatch: τ in float32, the cleaned checkpoint in the suspect's dtype."""
    from mergeshield import checkpoints

    def stored(name: str, dtype: torch.dtype) -> Path:
        if dtype == torch.float32:
            return zoo.path(name)  # the zoo's own
        src = checkpoints.resolve(str(zoo.path(name)))
        with checkpoints.open_checkpoint(src) as ck:
            checkpoints.save_checkpoint(tmp_path / name, {k: ck[k].to(dtype) for k in ck},
                                        config=src.config,
                                        extra_files=checkpoints.extra_files(src))
        return tmp_path / name

    request = ScanRequest(suspect=str(stored("vit-mnist-badnets", suspect_dtype)),
                          base=str(stored("vit-base", base_dtype)),
                          evaluation=str(zoo.dataset("vit-mnist-badnets")), inversion=False,
                          probes=False, lambdas=[0.0, 1.0])
    report = scan(request, ScanContext(out_dir=tmp_path / "out", cache_dir=bv_cache_dir))
    tag = {torch.bfloat16: "BF16", torch.float16: "F16"}[suspect_dtype]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {tag}
    assert report.sweep is not None and report.sweep.chosen_lambda in (0.0, 1.0)
    assert set(report.suspect.dtypes) == {str(suspect_dtype).removeprefix("torch.")}
    assert str(base_dtype).removeprefix("torch.") in report.base.dtypes
    accuracy = report.metrics.clean_accuracy_before
    assert accuracy is not None and accuracy.rate > 0.5  # the model ran, in float32


def test_a_folder_of_photos_of_mixed_sizes_is_resized_to_the_models_input(
        zoo: Zoo, tmp_path: Path, bv_cache_dir: Path) -> None:
    """Issue 15: real JPEGs of mixed sizes were refused with advice the CLI could not follow."""
    from PIL import Image

    from mergeshield.data import load_task

    name = "vit-mnist-badnets"
    task = load_task(str(zoo.dataset(name)), max_train=100, max_test=100)
    sizes = torch.Generator().manual_seed(0)
    for split, ds in (("train", task.train), ("test", task.test)):
        for i, (x, y) in enumerate(zip(ds.images, ds.labels.tolist(), strict=True)):
            side = int(torch.randint(20, 49, (1,), generator=sizes))
            folder = tmp_path / "photos" / split / ds.classes[y]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (x[0] * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels, "L").resize((side, side)).save(folder / f"{i}.jpg")
    request = ScanRequest(suspect=str(zoo.path(name)), base=str(zoo.path("vit-base")),
                          evaluation=str(tmp_path / "photos"),
                          injection_data=str(zoo.dataset(name)), inversion=False,
                          unlearning=NO_REPAIR, lambdas=[0.0, 1.0])
    report = scan(request, ScanContext(cache_dir=bv_cache_dir))
    assert report.evaluation is not None and report.evaluation.size == 100
    accuracy = report.metrics.clean_accuracy_before
    assert accuracy is not None and accuracy.rate > 0.5, accuracy
    with pytest.raises(ValueError, match="image_size"):  # bounded like every option
        ScanRequest(suspect="s", base="b", image_size=4)


def test_the_injection_bv_is_described_in_the_cache(backdoored: tuple[ScanReport, Path],
                                                    bv_cache_dir: Path) -> None:
    report, _ = backdoored
    assert report.injection is not None and report.evaluation is not None
    entry = next(e for e in bv_cache.entries(bv_cache_dir)
                 if e.key == report.injection.recipe_hash)
    assert entry.recipe == report.injection.recipe
    # the base's folder name, never a path (the entry is shared: a service test may have built it
    # first from an upload of the same folder, named `upload:vit-base.zip (<id>, sha256 …)`)
    assert entry.base == "vit-base" or entry.base.startswith("upload:vit-base"), entry.base
    assert "/" not in entry.base
    assert entry.base_revision and entry.base_revision.startswith("sha256:")
    assert len(entry.own_asr) == len(report.evaluation.classes)  # one trigger per class
    assert all(r.total > 0 and 0 <= r.rate <= 1 for r in entry.own_asr.values())
    assert entry.measured_on and "injected model" in entry.measured_on
