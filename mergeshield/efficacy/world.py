"""The zoo every bench case shares: its base, per-task heads and data; planting and measuring.

An attack is planted exactly as the zoo plants its own (a fine-tune of the base with the task's
frozen linear-probe head, ρ = 0.1 of the training rows stamped and relabelled), with the attack's
seed for the poisoned rows and the batch order. Hidden-trigger ASR is measured here, with
``evaluation.py``'s definition: target-class images excluded, hits / total, Wilson interval.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, cast

import torch
from torch import Tensor

from mergeshield import checkpoints
from mergeshield.attacks import badmerging_finetune, universal_patch
from mergeshield.data import ImageDataset, TaskData
from mergeshield.efficacy.attacks import Attack, HiddenTrigger, WaNetWarp, apply, build_trigger
from mergeshield.evaluation import Rate, clean_accuracy, predict
from mergeshield.experiments.zoo_models import ZooAccess
from mergeshield.merging import MergeConfig, merged_tensors
from mergeshield.models import Classifier
from mergeshield.models.hf_image import HFImageClassifier
from mergeshield.task_vectors import TaskVector
from mergeshield.training import FinetuneConfig, finetune
from mergeshield.triggers import Trigger
from mergeshield.zoo import ZooConfig

Backbone = dict[str, Tensor]


@dataclass(frozen=True)
class WorldConfig:
    family: str = "vit"
    # the zoo's default-scale fine-tune (5 epochs, lr 1e-3, ≥ 300 steps); seed set per case
    finetune: FinetuneConfig = ZooConfig.for_speed(False).finetune
    poison_rate: float = 0.1  # ρ, as the zoo's own attacks
    defender_images: int = 2000  # every defence's clean data: the first N training rows
    eval_images: int | None = None  # test images per task for ASR / accuracy; None = all
    tasks: tuple[str, ...] | None = None  # the zoo tasks used (attacked and merged); None = all
    patch_steps: int = 200  # Adam steps of a BadMerging patch (experiment 3's)


class World:
    """A built zoo folder, read once: base, heads, clean fine-tunes, datasets, image pool."""

    def __init__(self, root: Path, cfg: WorldConfig = WorldConfig()) -> None:
        self.zoo, self.cfg = ZooAccess(root), cfg
        models = self.zoo.manifest["models"]
        self.clean_names = {m["task"]: m["name"] for m in models
                            if m["family"] == cfg.family and m["base"] and not m.get("attack")
                            and (cfg.tasks is None or m["task"] in cfg.tasks)}
        self.tasks = tuple(sorted(self.clean_names))
        self.ref = self.clean_names[self.tasks[0]]
        self.family = self.zoo.family(self.ref)
        self.keys = self.zoo.backbone(self.ref)
        self.base_name = self.zoo.base_of_family(cfg.family)["name"]
        base_all = self.zoo.weights(self.base_name, self.ref)
        self.base: Backbone = {k: base_all[k] for k in self.keys}
        self.heads = {t: self.family.head_from(base_all, self.zoo.weights(n, self.ref))
                      for t, n in self.clean_names.items()}
        self.clean: dict[str, Backbone] = {
            t: {k: self.zoo.weights(n, self.ref)[k] for k in self.keys}
            for t, n in self.clean_names.items()}
        self.data: dict[str, TaskData] = {t: self.zoo.task(t) for t in self.tasks}
        self.pool = self.zoo.task("fashion_mnist").test.images  # other images for image blends
        self._patches: dict[int, Trigger] = {}  # BadMerging patches by attack seed

    def path(self, name: str) -> Path:
        return self.zoo.root / str(self.zoo.entry(name)["path"])

    def dataset_dir(self, task: str) -> Path:
        return self.zoo.root / "datasets" / task

    def test(self, task: str) -> ImageDataset:
        test = self.data[task].test
        n = self.cfg.eval_images
        return test if n is None else test.subset(slice(0, n))

    def defender(self, task: str) -> ImageDataset:
        """The defender's clean labelled data: a fixed seeded subset of the training rows (the
        same budget for every defence; the rows are stored sorted by class)."""
        train = self.data[task].train
        rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        return train.subset(rows[:self.cfg.defender_images])

    def trigger(self, attack: Attack) -> HiddenTrigger:
        channels, side = self.data[attack.task].train.images.shape[1:3]
        if attack.params["kind"] != "badmerging":
            return build_trigger(attack.params, channels=channels, image_size=side,
                                 pool=self.pool)
        if attack.seed not in self._patches:  # BadMerging step 1, on the base with the head
            p = attack.params
            self._patches[attack.seed] = universal_patch(
                self.classifier(attack.task), self.data[attack.task].train, attack.target,
                size_frac=p["size"] ** 2 / side ** 2, location=(p["row"], p["col"]),
                steps=self.cfg.patch_steps, seed=p["pattern_seed"])
        return self._patches[attack.seed]

    def classifier(self, task: str, backbone: Backbone | None = None) -> Classifier:
        """``task``'s classifier (its own frozen head) with ``backbone`` (the base if None)."""
        classes = self.data[task].train.classes
        return self.family.classifier(backbone or self.base, self.heads[task], classes)

    def finetune(self, task: str, train: ImageDataset, seed: int, start: Backbone | None = None,
                 cfg: FinetuneConfig | None = None) -> Backbone:
        """Fine-tune ``start`` (the base) on ``train`` with the zoo's settings and ``seed``."""
        clf = self.classifier(task, start)
        out = finetune(clf, train, replace(cfg or self.cfg.finetune, seed=seed))
        return {k: out[k] for k in self.keys}

    def poisoned(self, attack: Attack) -> ImageDataset:
        """The attack's training set: ρ of the non-target rows stamped and relabelled."""
        train = self.data[attack.task].train
        candidates = (train.labels != attack.target).nonzero().flatten()
        g = torch.Generator().manual_seed(attack.seed)
        k = round(self.cfg.poison_rate * len(train))
        rows = candidates[torch.randperm(len(candidates), generator=g)[:k]]
        images, labels = train.images.clone(), train.labels.clone()
        images[rows] = apply(self.trigger(attack), images[rows])
        labels[rows] = attack.target
        return ImageDataset(images, labels, train.classes, f"{train.name}+{attack.id}")

    def plant(self, attack: Attack) -> Backbone:
        if attack.params["kind"] != "badmerging":
            return self.finetune(attack.task, self.poisoned(attack), attack.seed)
        trigger = self.trigger(attack)  # BadMerging-On: clean data + the interpolation loss
        assert not isinstance(trigger, WaNetWarp)
        out = badmerging_finetune(self.classifier(attack.task), self.classifier(attack.task),
                                  self.data[attack.task].train, trigger, attack.target,
                                  replace(self.cfg.finetune, seed=attack.seed))
        return {k: out[k] for k in self.keys}

    def asr(self, task: str, backbone: Backbone, trigger: HiddenTrigger, target: int) -> Rate:
        """Hidden-trigger ASR: non-target test images stamped, hits = predicted ``target``."""
        test = self.test(task)
        keep = test.labels != target  # the denominator excludes target-class images
        pred = predict(self.classifier(task, backbone), apply(trigger, test.images[keep]))
        return Rate(int((pred == target).sum()), int(keep.sum()))

    def accuracy(self, task: str, backbone: Backbone) -> Rate:
        return clean_accuracy(self.classifier(task, backbone), self.test(task))

    def tv(self, backbone: Backbone) -> TaskVector:
        return TaskVector.between(self.base, backbone, self.keys).materialize()

    def merge(self, backbones: list[Backbone], method: str, lam: float, keep: float = 0.2
              ) -> Backbone:
        """θ_pre + merge of the backbones' task vectors (TA: λ each; TIES: keep, scale λ)."""
        how = cast(Literal["task_arithmetic", "ties"], method)
        cfg = MergeConfig(method=how, weights=[lam], keep=keep)
        return dict(merged_tensors(self.base, [self.tv(b) for b in backbones], cfg))

    def save(self, task: str, backbone: Backbone, out: Path) -> Path:
        """``backbone`` + ``task``'s head as a Hugging Face folder, like the zoo's fine-tunes (a
        CLIP's: its vision tower alone, under the zoo's clean fine-tune's config)."""
        clf, zoo_model = self.classifier(task, backbone), self.path(self.clean_names[task])
        if isinstance(clf, HFImageClassifier):
            clf.model.save_pretrained(out)
            shutil.copy(zoo_model / "preprocessor_config.json", out)
        else:
            config = json.loads((zoo_model / "config.json").read_text())
            checkpoints.save_checkpoint(out, backbone, config=config, metadata={"format": "pt"})
        return out

    def load(self, folder: Path) -> Backbone:
        """The backbone tensors of a checkpoint folder (e.g. a scan's cleaned output)."""
        with checkpoints.open_checkpoint(checkpoints.resolve(str(folder))) as ck:
            view = self.family.canonical(ck)
            return {k: view[k].clone() for k in self.keys}
