"""Tiny models and data built in code, for tests that must run the real library paths in seconds.

Builders, not fixtures: each test module wraps the ones it needs in its own (module-scoped)
fixtures, so nothing here is downloaded and nothing is shared between modules by accident.

- ``vit_config`` / ``save_vit`` / ``save_finetuned``: a ViT classifier (hidden 16, one layer,
  16×16 grey images) saved with ``save_pretrained`` and "fine-tuned" copies saved with
  ``checkpoints.save_checkpoint``, so the real loading code (and transformers-5 renaming) runs.
- ``save_clip_base``: a full ``CLIPModel`` with a character-level tokenizer (as ``zoo.py`` does);
  ``vision_config_dict`` is the config.json of a ``CLIPVisionModel`` task checkpoint.
- ``TinyNet``: a small MLP ``Classifier`` (``backbone.*`` + ``classifier`` head) for training and
  inversion tests; ``block_task`` a separable synthetic task; ``CountingMapping`` counts reads;
  ``tv_of`` a task vector by hand, ``assert_tv_close`` / ``assert_tv_equal`` compare two.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTForImageClassification

from mergeshield import checkpoints
from mergeshield.data import ImageDataset
from mergeshield.models import Classifier, Preprocessing
from mergeshield.models.clip import char_level_vocab
from mergeshield.task_vectors import TaskVector

IMAGE = 16  # px; every tiny model and task here uses 16×16 images


# -- ViT (transformers) ----------------------------------------------------------------------------
def vit_config(num_labels: int = 3, channels: int = 1) -> ViTConfig:
    return ViTConfig(image_size=IMAGE, patch_size=4, num_channels=channels, hidden_size=16,
                     num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     num_labels=num_labels)


def save_vit(folder: Path, *, seed: int = 0, num_labels: int = 3) -> Path:
    """A randomly initialised ViT classifier saved with ``save_pretrained``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ViTForImageClassification(vit_config(num_labels))
    model.save_pretrained(folder)
    return folder


def load_dir(folder: Path) -> checkpoints.Checkpoint:
    return checkpoints.open_checkpoint(checkpoints.resolve(str(folder)))


def read_state(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a saved checkpoint, in memory (for expected values)."""
    with load_dir(folder) as ck:
        return {k: ck[k].clone() for k in ck}


def save_finetuned(src: Path, out: Path, *, seed: int, scale: float = 0.05,
                   prefix: str = "vit.") -> Path:
    """A copy of ``src`` whose ``prefix`` tensors moved by seeded noise (a stand-in fine-tune)."""
    state = read_state(src)
    gen = torch.Generator().manual_seed(seed)
    moved = {k: v + scale * torch.randn(v.shape, generator=gen) if k.startswith(prefix) else v
             for k, v in state.items()}
    with load_dir(src) as ck:
        config = ck.config
    checkpoints.save_checkpoint(out, moved, config=config)
    return out


# -- CLIP ------------------------------------------------------------------------------------------
def char_vocab() -> dict[str, int]:
    return char_level_vocab()


def clip_config() -> CLIPConfig:
    return CLIPConfig(
        text_config={"vocab_size": len(char_vocab()), "hidden_size": 16, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 32,
                     "max_position_embeddings": 32, "bos_token_id": 512, "eos_token_id": 513,
                     "pad_token_id": 513},
        vision_config={"image_size": IMAGE, "patch_size": 4, "num_channels": 3,
                       "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 32},
        projection_dim=16,
    )


def save_clip_base(folder: Path, *, seed: int = 0) -> Path:
    """A full CLIPModel plus tokenizer files (the zero-shot head needs its text tower)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(clip_config())
    model.save_pretrained(folder)
    CLIPTokenizer(vocab=char_vocab(), merges=[]).save_pretrained(folder)
    return folder


def vision_config_dict() -> dict[str, Any]:
    """config.json of a CLIPVisionModel task checkpoint (the task-arithmetic layout)."""
    vision = clip_config().vision_config.to_dict()
    vision.update({"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model"})
    return vision


# -- a small MLP classifier and synthetic data -----------------------------------------------------
class TinyNet(Classifier):
    """flatten → linear → ReLU (the backbone) → linear head: trains in milliseconds on CPU."""

    def __init__(self, n_classes: int = 4, *, channels: int = 1, width: int = 32,
                 seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.backbone = nn.Sequential(
                nn.Flatten(), nn.Linear(channels * IMAGE * IMAGE, width), nn.ReLU()
            )
            self.classifier = nn.Linear(width, n_classes)
        self.preprocessing = Preprocessing(IMAGE, channels, (0.5,) * channels, (0.5,) * channels)

    def logits(self, inputs: Tensor) -> Tensor:
        out: Tensor = self.classifier(self.backbone(inputs))
        return out

    def head(self) -> nn.Module:
        return self.classifier

    def backbone_state(self) -> dict[str, Tensor]:
        return {f"backbone.{k}": v for k, v in self.backbone.state_dict(keep_vars=True).items()}


def block_task(n: int, *, n_classes: int = 4, seed: int = 0, name: str = "blocks"
               ) -> ImageDataset:
    """Faint noise (≤ 0.3) with a bright 3×3 block in the quadrant of the class: separable."""
    gen = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.rand(n, 1, IMAGE, IMAGE, generator=gen)  # (N, 1, H, W) pixel space
    labels = torch.arange(n) % n_classes
    labels = labels[torch.randperm(n, generator=gen)]
    half = IMAGE // 2
    for k in range(n_classes):
        r, c = 2 + half * ((k // 2) % 2), 2 + half * (k % 2)
        images[labels == k, :, r:r + 3, c:c + 3] = 0.9
    return ImageDataset(images, labels, tuple(f"c{k}" for k in range(n_classes)), name)


class CountingMapping(Mapping[str, Tensor]):
    """A read-only tensor mapping that records every tensor read (``in`` reads nothing)."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self._tensors = dict(tensors)
        self.reads: list[str] = []

    def __getitem__(self, name: str) -> Tensor:
        self.reads.append(name)
        return self._tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def tv_of(values: dict[str, list[float]]) -> TaskVector:
    """A task vector written by hand: name -> values."""
    return TaskVector.from_tensors({k: torch.tensor(v) for k, v in values.items()})


def assert_tv_close(a: TaskVector, b: TaskVector, **tol: float) -> None:
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)


def assert_tv_equal(a: TaskVector, b: TaskVector) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
