"""What every model family adapter provides.

An adapter turns checkpoint tensors into a ``Classifier``: a module that takes pixel-space images
(N, C, H, W) in [0, 1], applies the family's preprocessing (from the Hugging Face image-processor
config) and returns logits (N, K). It also says which tensors form the *backbone*: the part
that task vectors and backdoor vectors cover. Heads are per task and never part of τ or BV
(method.md, "Heads").
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mergeshield.errors import CorruptCheckpointError, IncompatibleModelsError, ModelRunError
from mergeshield.models.config_guard import MAX_IMAGE_SIDE
from mergeshield.tensor_stream import Range, ranged


@dataclass(frozen=True)
class Preprocessing:
    """Pixel [0,1] → model input: resize, channel conversion, normalisation."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(
        cls, processor: Mapping[str, Any] | None, image_size: Any, channels: Any
    ) -> Preprocessing:
        """From the processor config and the model's (untrusted) sizes; bad values refused."""
        for name, value, hi in (("image_size", image_size, MAX_IMAGE_SIDE),
                                ("num_channels", channels, 64)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
                raise CorruptCheckpointError(
                    f"config.json: {name} must be an integer from 1 to {hi}, not "
                    f"{str(value)[:40]!r}; fix the config", details={"file": "config.json",
                                                                    "field": name})
        p = dict(processor or {})
        mean = _floats(p.get("image_mean", [0.5] * channels), "image_mean", channels)
        std = _floats(p.get("image_std", [0.5] * channels), "image_std", channels)
        if any(s <= 0 for s in std):
            raise CorruptCheckpointError("preprocessor_config.json: image_std must be positive",
                                         details={"file": "preprocessor_config.json"})
        return cls(image_size, channels, mean[:channels], std[:channels])

    def __call__(self, pixels: Tensor) -> Tensor:
        x = pixels
        if x.shape[1] != self.channels:  # (N, C, H, W): grey ↔ RGB
            if self.channels == 1:
                x = x.mean(1, keepdim=True)
            else:
                x = x.expand(-1, self.channels, -1, -1)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = nn.functional.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True
            )
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def _floats(value: Any, name: str, channels: int) -> tuple[float, ...]:
    """A per-channel list of finite numbers from the processor config, else refused."""
    ok = (isinstance(value, list) and len(value) >= channels and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in value))
    if not ok:
        raise CorruptCheckpointError(
            f"preprocessor_config.json: {name} must be a list of at least {channels} finite "
            "numbers; fix the processor config",
            details={"file": "preprocessor_config.json", "field": name})
    return tuple(float(v) for v in value)


class Classifier(nn.Module, ABC):
    """A backbone plus a frozen head, called on pixel-space images."""

    preprocessing: Preprocessing

    @abstractmethod
    def logits(self, inputs: Tensor) -> Tensor:
        """Logits (N, K) for preprocessed inputs."""

    @abstractmethod
    def head(self) -> nn.Module:
        """The task head: frozen during fine-tuning, excluded from task vectors."""

    @abstractmethod
    def backbone_state(self) -> dict[str, Tensor]:
        """Backbone tensors under their checkpoint names (views, not copies)."""

    def forward(self, pixels: Tensor) -> Tensor:
        """Logits of pixel-space images; a crash inside the model (an architecture or dtype it
        cannot run) is a :class:`ModelRunError`, not a traceback. Out of memory stays itself."""
        try:
            return self.logits(self.preprocessing(pixels))
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError,
                NotImplementedError, AssertionError, ZeroDivisionError) as exc:
            raise ModelRunError(
                f"{type(self).__name__}: the model failed in its forward pass "
                f"({type(exc).__name__}: {str(exc)[:200]}); this architecture, dtype or config "
                "cannot be run by MergeShield", details={"reason": type(exc).__name__}) from exc

    def load_backbone(self, weights: Mapping[str, Tensor]) -> None:
        """Copy backbone tensors in place (names as in ``backbone_state``); all must be present."""
        own = self.backbone_state()
        missing = [k for k in own if k not in weights]
        if missing:
            raise IncompatibleModelsError(
                f"{len(missing)} backbone tensor(s) missing, e.g. {missing[:3]}",
                details={"missing": missing},
            )
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(weights[name].to(dtype=t.dtype, device=t.device))

    def backbone_parameters(self) -> list[nn.Parameter]:
        ids = {id(t) for t in self.backbone_state().values()}
        return [p for p in self.parameters() if id(p) in ids]


@dataclass(frozen=True)
class ModelFiles:
    """What an adapter needs from a checkpoint folder (read by ``checkpoints.py``)."""

    config: Mapping[str, Any]
    processor: Mapping[str, Any] | None = None  # preprocessor_config.json
    root: str | None = None  # local folder, for tokenizer files
    extra: Mapping[str, Any] = field(default_factory=dict)


class ModelFamily(ABC):
    """One family of models (ViT-like classifiers, CLIP, ...)."""

    name: str
    preprocessing: Preprocessing  # what its classifiers do to pixels (input side, mean, std)

    @classmethod
    @abstractmethod
    def matches(cls, config: Mapping[str, Any]) -> bool:
        """Whether a checkpoint with this config.json belongs to the family."""

    def checkpoint_names(self) -> dict[str, str]:
        """Tensor names in memory → names in a checkpoint, where they differ (PEFT adapters
        name modules as they are in memory); {}: the same names."""
        return {}

    @abstractmethod
    def is_backbone(self, name: str) -> bool:
        """Whether a tensor (canonical name) is part of task and backdoor vectors."""

    def canonical(self, weights: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """Checkpoint tensor names → the family's canonical names (identity by default)."""
        return weights

    @abstractmethod
    def classifier(
        self,
        backbone: Mapping[str, Tensor],
        head_source: Mapping[str, Tensor] | None,
        classes: tuple[str, ...],
    ) -> Classifier:
        """A classifier with the given backbone and the head taken from ``head_source``
        (``None``: a freshly initialised head, to be fit)."""

    def head_from(
        self, base: Mapping[str, Tensor], suspect: Mapping[str, Tensor]
    ) -> Mapping[str, Tensor]:
        """Where a suspect's head lives: in the suspect itself for most families."""
        return suspect

    @abstractmethod
    def task_classifier(
        self, base: Mapping[str, Tensor], data: Any, *, device: torch.device, seed: int = 0
    ) -> Callable[[], Classifier]:
        """A factory of fresh copies of the *base* with a head for ``data`` (an ImageDataset):
        the starting point of every fine-tune on that data (method.md, "Heads")."""

    @abstractmethod
    def head_keys(self, weights: Mapping[str, Tensor]) -> list[str]:
        """The tensors of ``weights`` that form its head (saved with a task model)."""


class PrefixedWeights(Mapping[str, Tensor]):
    """A read-only view of ``weights`` with ``prefix`` added to every name."""

    def __init__(self, inner: Mapping[str, Tensor], prefix: str) -> None:
        self.inner, self.prefix = inner, prefix

    def __getitem__(self, name: str) -> Tensor:
        if not name.startswith(self.prefix):
            raise KeyError(name)
        return self.inner[name[len(self.prefix) :]]

    def __iter__(self) -> Iterator[str]:
        return (self.prefix + k for k in self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    def info(self, name: str) -> Any:
        """Dtype and shape without reading data, when the inner mapping can tell."""
        return self.inner.info(name[len(self.prefix) :])  # type: ignore[attr-defined]

    def range_reader(self, name: str) -> Range | None:
        """Element ranges of ``name`` without the whole tensor, when the inner mapping can."""
        return ranged(self.inner, name[len(self.prefix) :])
