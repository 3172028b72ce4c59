"""The quick zoo: layout, ground truth, and the paper's BV arithmetic at small scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageClassification, CLIPVisionModel

from mergeshield import checkpoints
from mergeshield.data import load_task
from mergeshield.evaluation import attack_success_rate, clean_accuracy
from mergeshield.models import Classifier, family_for
from mergeshield.task_vectors import TaskVector
from mergeshield.triggers import parse_trigger
from tests.support.zoo import Zoo


def test_manifest_lists_models_and_datasets(zoo: Zoo) -> None:
    on_disk = json.loads((zoo.root / "manifest.json").read_text())
    assert on_disk == zoo.manifest
    names = {m["name"] for m in zoo.manifest["models"]}
    for family in ("vit", "clip"):
        assert f"{family}-base" in names
        for task in ("mnist", "digits", "mnist-rot90"):
            assert {f"{family}-{task}-{k}" for k in ("clean", "badnets", "blended")} <= names
    for m in zoo.manifest["models"]:
        assert set(m) >= {"name", "path", "family", "task", "dataset", "base", "attack"}
        assert (zoo.root / m["path"] / "config.json").is_file()
        assert (zoo.root / m["path"] / "model.safetensors").is_file()
        if m["attack"] is not None:
            assert m["attack"]["type"] in ("badnets", "blended")
            parse_trigger(m["attack"]["trigger"])  # the full spec round-trips
    for d in zoo.manifest["datasets"]:
        task = load_task(str(zoo.root / d["path"]))
        assert list(task.test.classes) == d["classes"]


def test_every_backdoor_took_and_its_twins_share_the_recipe(zoo: Zoo) -> None:
    """Each task's fine-tunes are trained again, longer, until every planted backdoor reaches
    the floor, so what the tests of the zoo measure does not hinge on one CPU's kernels; the
    clean twin keeps the same recipe (a BV is the poisoning alone)."""
    from mergeshield.zoo import ZooConfig

    cfg = ZooConfig.for_speed(quick=True)
    by_task: dict[tuple[str, str], set[tuple[int, int]]] = {}
    for m in zoo.manifest["models"]:
        if m["base"] is None:
            continue
        got = m["measured"]
        by_task.setdefault((m["family"], m["task"]), set()).add((got["epochs"],
                                                                 got["min_steps"]))
        if m["attack"] is not None:
            assert got["asr"]["rate"] >= cfg.plant_floor, (m["name"], got["asr"])
        assert got["epochs"] >= cfg.finetune.epochs
    assert all(len(recipes) == 1 for recipes in by_task.values()), by_task


def test_task_models_use_public_layouts(zoo: Zoo) -> None:
    vit = AutoModelForImageClassification.from_pretrained(zoo.path("vit-mnist-clean"))
    assert vit.config.id2label[3] == "3"
    clip = CLIPVisionModel.from_pretrained(zoo.path("clip-mnist-clean"))
    assert clip.config.model_type == "clip_vision_model"
    with safe_open(str(zoo.path("clip-mnist-clean") / "model.safetensors"), "pt") as f:
        assert all(k.startswith("vision_model.") for k in f.keys())  # as the public task models


def _classifier(zoo: Zoo, name: str, weights: dict[str, torch.Tensor] | None = None
                ) -> tuple[Classifier, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    m = zoo.model(name)
    base_src = checkpoints.resolve(str(zoo.path(m["base"])))
    src = checkpoints.resolve(str(zoo.path(name)))
    family = family_for(base_src.config, src.config,
                        processor=checkpoints.read_json(base_src, "preprocessor_config.json"),
                        tokenizer_root=str(base_src.root))
    base = dict(family.canonical(checkpoints.open_checkpoint(base_src)))
    mine = dict(family.canonical(checkpoints.open_checkpoint(src)))
    classes = load_task(str(zoo.dataset(name))).test.classes
    clf = family.classifier(weights or mine, family.head_from(base, mine), classes)
    return clf, base, mine


@pytest.mark.parametrize("name", ["vit-mnist-badnets", "vit-mnist-rot90-badnets",
                                  "clip-mnist-rot90-badnets"])
def test_planted_backdoors_work_and_clean_twins_do_not_respond(zoo: Zoo, name: str) -> None:
    attack = zoo.model(name)["attack"]
    trigger, target = parse_trigger(attack["trigger"]), attack["target"]
    test = load_task(str(zoo.dataset(name))).test
    bd, _, _ = _classifier(zoo, name)
    clean, _, _ = _classifier(zoo, name.replace("badnets", "clean"))
    assert attack_success_rate(bd, test, trigger, target).rate > 0.8
    assert attack_success_rate(clean, test, trigger, target).rate < 0.1
    assert clean_accuracy(bd, test).rate > 0.5  # the backdoor keeps the model useful


def test_backdoor_vector_arithmetic(zoo: Zoo) -> None:
    """method.md: clean + BV carries the backdoor, 0.5·BV does not, θ_pre + BV transplants."""
    name = "vit-mnist-badnets"
    attack = zoo.model(name)["attack"]
    trigger, target = parse_trigger(attack["trigger"]), attack["target"]
    test = load_task(str(zoo.dataset(name))).test
    clf, base, bd = _classifier(zoo, name)
    _, _, clean = _classifier(zoo, "vit-mnist-clean")
    keys = [k for k in bd if k.startswith("vit.")]
    bv = TaskVector.between(clean, bd, keys)

    def asr(weights: dict[str, torch.Tensor]) -> float:
        clf.load_backbone(weights)
        return attack_success_rate(clf, test, trigger, target).rate

    assert asr(bv.apply_to(clean, 1.0)) > 0.8
    assert asr(bv.apply_to(clean, 2.0)) > 0.9
    assert asr(bv.apply_to(clean, 0.5)) < 0.5
    # the BV transplants onto the pre-trained model: most triggered images go to the target, where
    # the base sends few (measured 0.78–0.95 over builds of this zoo on one Xeon: a 0.8 threshold
    # failed the 1-thread build)
    transplanted, on_base = asr(bv.apply_to(base, 1.0)), asr(base)
    assert transplanted > 0.6 and transplanted > on_base + 0.4, (transplanted, on_base)


def test_gpu_scale_is_a_vit_of_tens_of_millions_of_parameters(zoo: Zoo) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    from mergeshield.experiments.zoo_models import ZooAccess
    from mergeshield.zoo import ZooConfig

    cfg = ZooConfig.for_scale("gpu")
    assert (cfg.scale, cfg.device) == ("gpu", "cuda")
    assert ZooConfig.for_scale("quick") == ZooConfig.for_speed(True)
    assert cfg.image_size == 56  # bigger images than the CPU scales' 28×28
    vit = ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch, num_channels=1,
                    hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                    num_attention_heads=cfg.heads, intermediate_size=2 * cfg.hidden, num_labels=10)
    with torch.device("meta"):  # count without allocating
        n = sum(p.numel() for p in ViTForImageClassification(vit).parameters())
    assert 20e6 < n < 60e6
    assert ZooAccess(zoo.root).scale == "quick"  # recorded (older zoos: derived from "quick")


def test_a_zoo_at_another_image_size_builds_and_scans(tmp_path: Path) -> None:
    """The GPU scale's larger images, on CPU and tiny: every dataset is resized, the models and
    processors say the new size, and a scan runs end to end on them."""
    from mergeshield.pipeline import ScanContext, ScanRequest, scan
    from mergeshield.training import FinetuneConfig
    from mergeshield.zoo import ZooConfig, build_zoo

    cfg = ZooConfig(quick=True, families=("vit",), image_size=42, hidden=32, layers=1,
                    pretrain_images=300, task_images=300, pretrain=FinetuneConfig(epochs=1),
                    finetune=FinetuneConfig(epochs=1))
    manifest = build_zoo(tmp_path, cfg)
    data = load_task(str(tmp_path / "datasets" / "mnist"))
    assert tuple(data.train.images.shape[1:]) == (1, 42, 42)
    model = next(m for m in manifest["models"] if m["name"] == "vit-mnist-badnets")
    folder = tmp_path / model["path"]
    assert json.loads((folder / "config.json").read_text())["image_size"] == 42
    assert json.loads((folder / "preprocessor_config.json").read_text())["size"]["height"] == 42
    report = scan(ScanRequest(suspect=str(folder), base=str(tmp_path / "models" / "vit-base"),
                              evaluation=str(tmp_path / "datasets" / "mnist"), max_eval=50,
                              inversion=False),
                  ScanContext(cache_dir=tmp_path / "cache"))
    assert report.metrics.clean_accuracy_before is not None
