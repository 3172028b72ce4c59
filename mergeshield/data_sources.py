"""Where a task's images come from: local image folders, `datasets` folders and hub datasets.

Each reader returns ``(train, test)`` :class:`~mergeshield.data.ImageDataset` pairs in pixel
space; :func:`mergeshield.data.load_task` picks the reader and shapes the result.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mergeshield.data import TASK_FILE, ImageDataset, Pair, _pair, _resize, _to_float
from mergeshield.errors import DatasetError
from mergeshield.hub import download_repo

__all__ = ["download_dataset", "read_folder"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
TEST_SPLITS = ("test", "validation", "valid", "val")


def _pil_to_tensor(img: Image.Image, mode: str) -> torch.Tensor:
    arr = np.asarray(img.convert(mode), dtype=np.uint8)
    return _to_float(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


def _stack_images(images: Sequence[Any], image_size: int | None) -> torch.Tensor:
    """PIL images or arrays (HW, HWC or CHW) -> (N, C, H, W); sizes may differ if resized."""
    if images and isinstance(images[0], Image.Image):
        mode = "L" if all(im.mode in ("L", "1", "I", "I;16", "F") for im in images) else "RGB"
        tensors = [_pil_to_tensor(im, mode) for im in images]
    else:
        tensors = []
        for a in images:
            arr = np.asarray(a)
            arr = arr[None] if arr.ndim == 2 else arr
            if arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3, 4):
                arr = arr.transpose(2, 0, 1)  # channels last -> first
            t = torch.as_tensor(arr.astype(np.float32))
            tensors.append(t if arr.dtype != np.uint8 and t.max() <= 1 else t / 255)
    if len({t.shape for t in tensors}) > 1:
        if image_size is None:
            raise DatasetError("images have different sizes: give an image size to resize them "
                               "to (--image-size, ScanRequest.image_size)")
        tensors = [_resize(t[None], image_size)[0] for t in tensors]
    return torch.stack(tensors) if tensors else torch.zeros(0, 1, 1, 1)


def _from_hf(dd: Any, name: str, image_size: int | None) -> Pair:
    import datasets

    test_split = next((s for s in TEST_SPLITS if s in dd), None)
    if "train" not in dd or test_split is None:
        raise DatasetError(f"{name}: need a 'train' and a 'test' (or 'validation') split, "
                           f"found {sorted(dd)}")
    feats = dd["train"].features
    img_col = next((c for c, f in feats.items() if isinstance(f, datasets.Image)), None)
    img_col = img_col or next((c for c in ("image", "img", "pixel_values") if c in feats), None)
    lab_col = next((c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
    lab_col = lab_col or next((c for c in ("label", "labels") if c in feats), None)
    if img_col is None or lab_col is None:
        raise DatasetError(f"{name}: no image column (an Image feature or image/img/pixel_values) "
                           f"or label column (a ClassLabel or label/labels) in {list(feats)}")
    raw = {s: list(dd[s][lab_col]) for s in ("train", test_split)}
    if isinstance(feats[lab_col], datasets.ClassLabel):
        classes = tuple(feats[lab_col].names)
    elif all(isinstance(v, str) for r in raw.values() for v in r):
        classes = tuple(sorted({v for r in raw.values() for v in r}))
    else:
        classes = tuple(str(i) for i in range(max(int(v) for r in raw.values() for v in r) + 1))
    out = []
    for split in ("train", test_split):
        labels = [classes.index(v) if isinstance(v, str) else int(v) for v in raw[split]]
        x = _stack_images(list(dd[split][img_col]), image_size)
        out.append(ImageDataset(x, torch.tensor(labels, dtype=torch.int64), classes,
                                f"{name}/{'train' if split == 'train' else 'test'}"))
    return out[0], out[1]


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()  # read now and close the file: folders may hold more images than open files
        return im


def _from_image_folder(root: Path, name: str,
                       image_size: int | None) -> Pair | None:
    def listing(d: Path) -> dict[str, list[Path]]:
        return {c.name: sorted(p for p in c.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                for c in sorted(d.iterdir()) if c.is_dir()}

    test_dir = next((root / s for s in TEST_SPLITS if (root / s).is_dir()), None)
    splits = ([listing(root / "train"), listing(test_dir)]
              if (root / "train").is_dir() and test_dir else [listing(root)])
    classes = tuple(sorted({c for s in splits for c in s}))
    files = [[(p, classes.index(c)) for c, ps in s.items() for p in ps] for s in splits]
    if not classes or not all(files):
        return None
    sets = [(_stack_images([_open(p) for p, _ in rows], image_size),
             torch.tensor([c for _, c in rows], dtype=torch.int64)) for rows in files]
    if len(sets) == 1:
        return _pair(name, sets[0][0], sets[0][1], classes, len(sets[0][1]) // 5)
    return (ImageDataset(sets[0][0], sets[0][1], classes, f"{name}/train"),
            ImageDataset(sets[1][0], sets[1][1], classes, f"{name}/test"))


def _from_folder(root: Path, name: str, image_size: int | None) -> Pair:
    import datasets

    if (root / "dataset_dict.json").exists():
        try:
            return _from_hf(datasets.load_from_disk(str(root)), name, image_size)
        except (OSError, ValueError, KeyError) as e:
            raise DatasetError(f"{root}: unreadable save_to_disk dataset: {e}") from e
    parquet = sorted(root.rglob("*.parquet"))
    if parquet:
        files: dict[str, list[str]] = {}
        for p in parquet:
            split = p.parent.name if p.parent.name in ("train", *TEST_SPLITS) else p.stem
            files.setdefault(split.split("-")[0], []).append(str(p))
        return _from_hf(datasets.load_dataset("parquet", data_files=files), name, image_size)
    found = _from_image_folder(root, name, image_size)
    if found is None:
        raise DatasetError(f"{root} is not a dataset: expected a `save_to_disk` folder, parquet "
                           "files, or image folders root/{train,test}/<class>/*.png")
    return found


def download_dataset(repo_id: str, revision: str | None, token: str | None,
                     endpoint: str | None, cache_dir: str | Path | None,
                     local_files_only: bool = False) -> Path:
    """The local snapshot folder of hub dataset ``repo_id`` at ``revision``."""
    return download_repo(repo_id, repo_type="dataset", revision=revision, token=token,
                         endpoint=endpoint, cache_dir=cache_dir,
                         local_files_only=local_files_only)[0]


def read_folder(root: Path, image_size: int | None,
                default_name: str | None = None) -> tuple[str, Pair]:
    """(task name, (train, test)) of a folder; the name comes from save_task's file if present."""
    if not root.is_dir():
        raise DatasetError(f"{root} is a file: give a dataset folder")
    name = default_name or root.name
    if (root / TASK_FILE).exists():
        try:
            name = str(json.loads((root / TASK_FILE).read_text())["name"])
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{root / TASK_FILE} is unreadable: {e}") from e
    return name, _from_folder(root, name, image_size)
