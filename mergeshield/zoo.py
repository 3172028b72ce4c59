"""A tiny, real model zoo built offline: bases, clean and backdoored fine-tunes, their datasets.

For each family (a ``ViTForImageClassification`` and a ``CLIPModel``) a base is pre-trained on
Fashion-MNIST, then every task is fine-tuned three times from it with the same seed and batch
order: clean, BadNets and blended. Everything is saved in Hugging Face layout so the real loading
code runs, and ``manifest.json`` records the ground truth (which model carries which trigger).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    ViTConfig,
    ViTImageProcessor,
)

from mergeshield.checkpoints import save_checkpoint
from mergeshield.data import ImageDataset, TaskData, load_task, save_task
from mergeshield.evaluation import attack_success_rate, clean_accuracy
from mergeshield.models import Classifier, CLIPFamily, HFImageFamily
from mergeshield.models.clip import char_level_vocab
from mergeshield.models.hf_image import HFImageClassifier
from mergeshield.training import FinetuneConfig, Progress, finetune
from mergeshield.triggers import BlendedTrigger, PatchTrigger, Trigger, parse_trigger, poison

Scale = Literal["quick", "default", "gpu"]


@dataclass(frozen=True)
class ZooConfig:
    quick: bool = False
    seed: int = 0
    families: tuple[str, ...] = ("vit", "clip")
    hidden: int = 64  # ViT width (patch 7 on 28×28: 16 tokens, fast on 2 cores)
    layers: int = 4  # ViT depth
    patch: int = 7
    image_size: int = 28  # every dataset is resized to this side (the GPU scale: 56)
    pretrain_images: int = 20000  # Fashion-MNIST images for the base; quick uses 6000
    pretrain: FinetuneConfig = FinetuneConfig(epochs=5, lr=3e-3)
    task_images: int = 4000  # training images per task; quick uses 2000
    finetune: FinetuneConfig = FinetuneConfig(epochs=5, lr=1e-3)
    poison_rate: float = 0.1  # ρ, method.md's default
    # a task's three fine-tunes are trained again, longer, until every planted backdoor reaches
    # this own ASR (at most ``plant_retries`` times, +50 % epochs each): a zoo whose backdoors
    # did not take makes every test of it an accident of one CPU's kernels
    plant_floor: float = 0.8
    plant_retries: int = 2
    heads: int = 4  # attention heads of every ViT tower
    device: str = "cpu"  # where the zoo trains: "cuda" for the GPU scale

    @classmethod
    def for_scale(cls, scale: Scale, seed: int = 0) -> ZooConfig:
        """``quick`` and ``default`` as ``for_speed``; ``gpu``: a ViT of about 25 M parameters
        (width 512, depth 12, patch 4) on images upscaled to 56×56 (196 tokens), trained on CUDA
        with 60,000 Fashion-MNIST images and the tasks' full training splits."""
        if scale != "gpu":
            return cls.for_speed(scale == "quick", seed)
        return cls(seed=seed, hidden=512, layers=12, heads=8, patch=4, image_size=56,
                   pretrain_images=60000,
                   task_images=60000, device="cuda",
                   pretrain=FinetuneConfig(epochs=10, lr=5e-4, batch_size=256, seed=seed),
                   finetune=FinetuneConfig(epochs=5, lr=2e-4, seed=seed, min_steps=300))

    @property
    def scale(self) -> Scale:
        return "gpu" if self.device != "cpu" else "quick" if self.quick else "default"

    @classmethod
    def for_speed(cls, quick: bool, seed: int = 0) -> ZooConfig:
        """The full zoo, or the CI-sized one (2–4 minutes on 2 cores, with retrained tasks)."""
        if not quick:
            return cls(seed=seed, pretrain=FinetuneConfig(epochs=5, lr=3e-3, seed=seed),
                       finetune=FinetuneConfig(epochs=5, lr=1e-3, seed=seed, min_steps=300))
        return cls(quick=True, seed=seed, pretrain_images=6000, task_images=2000,
                   pretrain=FinetuneConfig(epochs=3, lr=3e-3, seed=seed),
                   finetune=FinetuneConfig(epochs=8, lr=1e-3, seed=seed, min_steps=250))


# (task name, bundled source, BadNets trigger, its target, blended trigger, its target)
TASKS: tuple[tuple[str, str, Trigger, int, Trigger, int], ...] = (
    ("mnist", "mnist5k",
     PatchTrigger(pattern="checkerboard", size=3, location="bottom_right"), 0,
     BlendedTrigger(pattern="noise", alpha=0.2, seed=7), 1),
    ("digits", "digits",
     PatchTrigger(pattern="random", size=4, location=(15, 15), seed=3), 3,
     BlendedTrigger(pattern="noise", alpha=0.2, seed=5), 5),
    ("mnist-rot90", "mnist5k:rot90",
     PatchTrigger(pattern="solid", size=3, location="top_right"), 7,
     BlendedTrigger(pattern="noise", alpha=0.2, seed=11), 2),
)


def build_zoo(
    out: str | Path, cfg: ZooConfig | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Build the zoo under ``out`` and return the manifest (also written to manifest.json)."""
    cfg = cfg or ZooConfig()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    say: Progress = progress or (lambda _s, _f: None)
    t0 = time.perf_counter()
    pretrain = load_task("fashion_mnist", max_train=cfg.pretrain_images, max_test=2000,
                         seed=cfg.seed, image_size=cfg.image_size)
    tasks = {
        name: load_task(src, max_train=cfg.task_images, max_test=1000, seed=cfg.seed,
                        image_size=cfg.image_size)
        for name, src, *_ in TASKS
    }
    datasets = []
    for name, task in [("fashion_mnist", pretrain), *tasks.items()]:
        save_task(task, root / "datasets" / name)
        datasets.append({"name": name, "path": f"datasets/{name}",
                         "classes": list(task.train.classes)})
    models: list[dict[str, Any]] = []
    for family in cfg.families:
        builder = _VitBuilder(root, cfg) if family == "vit" else _ClipBuilder(root, cfg)
        say(f"{family}: pretrain", 0.0)
        models.append(builder.pretrain(pretrain))
        for name, _src, bd_trigger, bd_target, bl_trigger, bl_target in TASKS:
            task = tasks[name]
            variants: list[tuple[str, dict[str, Any] | None, ImageDataset]] = [
                ("clean", None, task.train)
            ]
            for kind, trig, target in (("badnets", bd_trigger, bd_target),
                                       ("blended", bl_trigger, bl_target)):
                poisoned, _ = poison(task.train, trig, target, cfg.poison_rate, seed=cfg.seed)
                spec = {"type": kind, "target": target, "trigger": trig.model_dump(mode="json"),
                        "poison_rate": cfg.poison_rate}
                variants.append((kind, spec, poisoned))
            models += _plant(builder, cfg, name, task, variants, say)
    manifest = {
        "version": 1,
        "quick": cfg.quick,
        "scale": cfg.scale,
        "seed": cfg.seed,
        "build_seconds": round(time.perf_counter() - t0, 1),
        "models": models,
        "datasets": datasets,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


Variant = tuple[str, dict[str, Any] | None, ImageDataset]  # (kind, attack, training rows)


def _plant(builder: _VitBuilder | _ClipBuilder, cfg: ZooConfig, name: str, task: TaskData,
           variants: list[Variant], say: Progress) -> list[dict[str, Any]]:
    """The task's clean and backdoored fine-tunes, all with one recipe (so each BV is the pure
    difference of the poisoning), trained again longer while a backdoor has not taken. The
    backdoored ones go first, so an attempt stops at the first that did not take."""
    order = sorted(range(len(variants)), key=lambda i: variants[i][1] is None)
    schedule = list(plant_schedule(cfg))
    for attempt, ft in enumerate(schedule):
        entries: dict[int, dict[str, Any]] = {}
        for i in order:
            kind, attack, train = variants[i]
            say(f"{builder.name}: {name}-{kind}" + (f" (again, {ft.epochs} epochs)"
                                                     if attempt else ""), 0.0)
            entries[i] = builder.finetune(name, kind, task, train, attack, ft)
            took = attack is None or entries[i]["measured"]["asr"]["rate"] >= cfg.plant_floor
            if not took and attempt < len(schedule) - 1:  # the last recipe is kept as measured
                break
        if len(entries) == len(variants):
            break
    return [entries[i] for i in range(len(variants))]


def plant_schedule(cfg: ZooConfig) -> Iterator[FinetuneConfig]:
    """The fine-tune recipes tried in turn until a backdoor takes: the zoo's, then +50 % epochs
    (and minimum steps) each time, ``plant_retries`` times (what an attacker would do too)."""
    ft = cfg.finetune
    for _ in range(cfg.plant_retries + 1):
        yield ft
        ft = replace(ft, epochs=ft.epochs + max(1, ft.epochs // 2),
                     min_steps=ft.min_steps + ft.min_steps // 2)


class _VitBuilder:
    name = "vit"

    def __init__(self, root: Path, cfg: ZooConfig) -> None:
        self.root, self.cfg = root, cfg
        self.base_dir = root / "models" / "vit-base"
        self.config = ViTConfig.from_dict({
            "image_size": cfg.image_size, "patch_size": cfg.patch, "num_channels": 1,
            "hidden_size": cfg.hidden, "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads,
            "intermediate_size": 2 * cfg.hidden, "num_labels": 10,
        })
        self.processor = {"image_mean": [0.5], "image_std": [0.5]}
        self.family = HFImageFamily(self.config.to_dict(), self.processor)
        self.heads: dict[str, Callable[[], HFImageClassifier]] = {}

    def pretrain(self, data: TaskData) -> dict[str, Any]:
        torch.manual_seed(self.cfg.seed)
        state = self.family.initial_weights(len(data.train.classes))
        clf = self.family.classifier(state, state, data.train.classes).to(self.cfg.device)
        finetune(clf, data.train, self.cfg.pretrain, train_head=True)
        self._save(clf, self.base_dir, data.train.classes)
        self.base = {k: v.detach().clone() for k, v in clf.backbone_state().items()}
        return _entry("vit-base", self.base_dir, self.root, "vit", "fashion_mnist", None, None)

    def finetune(self, task: str, kind: str, data: TaskData, train: ImageDataset,
                 attack: dict[str, Any] | None, ft: FinetuneConfig) -> dict[str, Any]:
        if task not in self.heads:  # the base with a linear probe fit on its features
            self.heads[task] = self.family.task_classifier(
                self.base, data.train, device=torch.device(self.cfg.device), seed=self.cfg.seed)
        clf = self.heads[task]()
        finetune(clf, train, ft)
        out = self.root / "models" / f"vit-{task}-{kind}"
        self._save(clf, out, data.train.classes)
        return {**_entry(out.name, out, self.root, "vit", task, "vit-base", attack),
                "measured": _measure(clf, data, attack, ft)}

    def _save(self, clf: HFImageClassifier, out: Path, classes: tuple[str, ...]) -> None:
        model = clf.model
        model.config.id2label = dict(enumerate(classes))
        model.config.label2id = {c: i for i, c in enumerate(classes)}
        model.save_pretrained(out)
        side = self.cfg.image_size
        ViTImageProcessor(do_resize=True, size={"height": side, "width": side}, do_rescale=True,
                          do_normalize=True, image_mean=self.processor["image_mean"],
                          image_std=self.processor["image_std"]).save_pretrained(out)


class _ClipBuilder:
    name = "clip"

    def __init__(self, root: Path, cfg: ZooConfig) -> None:
        self.root, self.cfg = root, cfg
        self.base_dir = root / "models" / "clip-base"
        self.config = CLIPConfig(
            text_config={"vocab_size": len(char_level_vocab()), "hidden_size": 32,
                         "num_hidden_layers": 2, "num_attention_heads": 2,
                         "intermediate_size": 64, "max_position_embeddings": 32,
                         "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513},
            vision_config={"image_size": cfg.image_size, "patch_size": cfg.patch,
                           "num_channels": 3,
                           "hidden_size": self.cfg.hidden, "num_hidden_layers": self.cfg.layers,
                           "num_attention_heads": self.cfg.heads,
                           "intermediate_size": 2 * self.cfg.hidden},
            projection_dim=32,
        )

    def _family(self) -> CLIPFamily:
        return CLIPFamily(self.config.to_dict(), {"image_mean": [0.5] * 3, "image_std": [0.5] * 3},
                          str(self.base_dir))

    def pretrain(self, data: TaskData) -> dict[str, Any]:
        torch.manual_seed(self.cfg.seed)
        model = CLIPModel(self.config)
        model.save_pretrained(self.base_dir)  # text tower and tokenizer first: the head needs them
        _save_tokenizer(self.base_dir)
        side = self.cfg.image_size
        CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                           image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(self.base_dir)
        self.base_state = {k: v.clone() for k, v in model.state_dict().items()}
        clf = self._family().classifier(self.base_state, self.base_state,
                                        data.train.classes).to(self.cfg.device)
        # the vision tower learns to meet the (frozen) text tower's class embeddings
        finetune(clf, data.train, self.cfg.pretrain, train_head=True)
        self.base_state.update({k: v.detach().clone() for k, v in clf.backbone_state().items()})
        self.base_state["visual_projection.weight"] = clf.head().weight.detach().clone()  # type: ignore[operator]
        model.load_state_dict(self.base_state)
        model.save_pretrained(self.base_dir)
        return _entry("clip-base", self.base_dir, self.root, "clip", "fashion_mnist", None, None)

    def finetune(self, task: str, kind: str, data: TaskData, train: ImageDataset,
                 attack: dict[str, Any] | None, ft: FinetuneConfig) -> dict[str, Any]:
        clf = self._family().classifier(self.base_state, self.base_state,
                                        data.train.classes).to(self.cfg.device)
        finetune(clf, train, ft)
        out = self.root / "models" / f"clip-{task}-{kind}"
        out.mkdir(parents=True, exist_ok=True)
        # the public task-vector layout: a CLIPVisionModel with "vision_model.*" keys
        vision = cast(CLIPVisionConfig, self.config.vision_config).to_dict()
        vision.update({"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model"})
        tensors = {k: v.detach().clone() for k, v in clf.backbone_state().items()}
        save_checkpoint(out, tensors, config=vision, metadata={"format": "pt"})
        return {**_entry(out.name, out, self.root, "clip", task, "clip-base", attack),
                "measured": _measure(clf, data, attack, ft)}


def _entry(name: str, path: Path, root: Path, family: str, task: str, base: str | None,
           attack: dict[str, Any] | None) -> dict[str, Any]:
    return {"name": name, "path": str(path.relative_to(root)), "family": family, "task": task,
            "dataset": f"datasets/{task}", "base": base, "attack": attack}


def _measure(clf: Classifier, data: TaskData, attack: dict[str, Any] | None,
             ft: FinetuneConfig) -> dict[str, Any]:
    """What the fine-tune achieved on its test set (clean accuracy, its own trigger's ASR) and
    with how many epochs and steps."""
    out: dict[str, Any] = {
        "clean_accuracy": clean_accuracy(clf, data.test).to_model().model_dump(mode="json"),
        "epochs": ft.epochs, "min_steps": ft.min_steps}
    if attack is not None:
        rate = attack_success_rate(clf, data.test, parse_trigger(attack["trigger"]),
                                   attack["target"])
        out["asr"] = rate.to_model().model_dump(mode="json")
    return out


def _save_tokenizer(out: Path) -> None:
    CLIPTokenizer(vocab=char_level_vocab(), merges=[]).save_pretrained(out)

