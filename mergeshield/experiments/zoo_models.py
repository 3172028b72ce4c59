"""Read a built zoo (``manifest.json`` + Hugging Face folders) into in-memory weights and data.

The zoo's models are tiny, so each checkpoint is read once, fully, under its family's canonical
tensor names; everything still goes through ``checkpoints.py`` and ``family_for``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from mergeshield import checkpoints
from mergeshield.data import TaskData, load_task
from mergeshield.errors import ConfigError
from mergeshield.models import ModelFamily, backbone_keys, family_for
from mergeshield.zoo import Scale


class ZooAccess:
    """Models, families and datasets of one zoo folder, loaded on demand and kept."""

    def __init__(self, root: Path, device: str = "cpu") -> None:
        path = Path(root) / "manifest.json"
        if not path.is_file():
            raise ConfigError(f"{root} holds no manifest.json: build it with "
                              "`mergeshield zoo build PATH --quick`")
        self.root = Path(root)
        self.device = torch.device(device)  # where experiments train and evaluate
        self.manifest: dict[str, Any] = json.loads(path.read_text())
        self.weights = cache(self._weights)
        self.family = cache(self._family)
        self.task = cache(self._task)

    @property
    def scale(self) -> Scale:
        """How the zoo was built (zoos from before the GPU scale record only ``quick``)."""
        return cast(Scale, self.manifest.get("scale", "quick" if self.manifest["quick"]
                                             else "default"))

    def entry(self, name: str) -> dict[str, Any]:
        """The manifest entry of model ``name``."""
        for m in self.manifest["models"]:
            if m["name"] == name:
                return dict(m)
        raise ConfigError(f"the zoo at {self.root} has no model {name!r}")

    def backdoored(self) -> list[dict[str, Any]]:
        """Every fine-tune that carries a planted attack, in manifest order."""
        return [dict(m) for m in self.manifest["models"] if m.get("attack")]

    def clean_of(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The clean fine-tune paired with ``entry`` (same family, task, seed and order)."""
        for m in self.manifest["models"]:
            if (m["family"], m["task"], m["base"], m.get("attack")) == (
                    entry["family"], entry["task"], entry["base"], None):
                return dict(m)
        raise ConfigError(f"the zoo has no clean fine-tune paired with {entry['name']!r}")

    def base_of_family(self, family: str) -> dict[str, Any]:
        """The pre-trained base of ``family`` (e.g. ``vit``)."""
        for m in self.manifest["models"]:
            if m["family"] == family and m["base"] is None:
                return dict(m)
        raise ConfigError(f"the zoo has no base model of family {family!r}")

    def _resolved(self, name: str) -> checkpoints.ResolvedSource:
        return checkpoints.resolve(str(self.root / self.entry(name)["path"]))

    def _family(self, name: str) -> ModelFamily:
        """The adapter that runs fine-tune ``name`` against its base."""
        base_src = self._resolved(self.entry(name)["base"])
        return family_for(base_src.config, self._resolved(name).config,
                          processor=checkpoints.read_json(base_src, "preprocessor_config.json"),
                          tokenizer_root=str(base_src.root))

    def _weights(self, name: str, family_of: str) -> dict[str, Tensor]:
        """Every tensor of ``name`` under the canonical names of ``family_of``'s family."""
        family = self.family(family_of)
        with checkpoints.open_checkpoint(self._resolved(name)) as ck:
            view = family.canonical(ck)
            return {k: view[k].clone() for k in view}

    def backbone(self, fine_tune: str) -> list[str]:
        """The tensors task and backdoor vectors cover for fine-tune ``fine_tune``."""
        base = self.weights(self.entry(fine_tune)["base"], fine_tune)
        keys, _skipped = backbone_keys(self.family(fine_tune), base,
                                       self.weights(fine_tune, fine_tune))
        return keys

    def _task(self, task: str) -> TaskData:
        for d in self.manifest["datasets"]:
            if d["name"] == task:
                return load_task(str(self.root / d["path"]))
        raise ConfigError(f"the zoo has no dataset {task!r}")
