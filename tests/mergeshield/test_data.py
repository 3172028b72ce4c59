"""Datasets: bundled real data, derived tasks, local folders, save/load round trip, errors."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mergeshield import data
from mergeshield.data import ImageDataset, TaskData, bundled_names, load_task, save_task
from mergeshield.errors import DatasetError, HubError, SourceNotFoundError


def _check(task: TaskData, n_train: int, n_test: int, shape: tuple[int, int, int]) -> None:
    for ds, n in ((task.train, n_train), (task.test, n_test)):
        assert ds.images.shape == (n, *shape) and ds.images.dtype == torch.float32
        assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
        assert 0 <= float(ds.images.min()) and float(ds.images.max()) <= 1
        assert int(ds.labels.max()) < len(ds.classes)
        assert torch.equal(ds.images, torch.round(ds.images * 255) / 255)  # 8-bit values


def test_bundled_names() -> None:
    assert bundled_names() == ["digits", "fashion_mnist", "mnist5k"]


def test_digits() -> None:
    task = load_task("digits")
    _check(task, 1437, 360, (1, 8, 8))
    assert task.train.classes == tuple("0123456789") and task.name == "digits"
    assert float(task.train.images.max()) == 1.0
    assert load_task("digits").train.sha256() == task.train.sha256()  # deterministic split


def test_mnist5k() -> None:
    task = load_task("mnist5k")
    _check(task, 4000, 1000, (1, 28, 28))
    counts = torch.bincount(torch.cat([task.train.labels, task.test.labels]))
    assert counts.tolist() == [500] * 10


def test_fashion_mnist_stratified_subset() -> None:
    task = load_task("fashion_mnist", max_train=200, max_test=50)
    _check(task, 200, 50, (1, 28, 28))
    assert task.train.classes[0] == "T-shirt/top" and task.train.classes[9] == "Ankle boot"
    assert torch.bincount(task.train.labels).tolist() == [20] * 10


def test_subsets_are_seeded() -> None:
    task = load_task("digits", max_train=100, max_test=20)
    assert torch.bincount(task.train.labels).tolist() == [10] * 10
    again = load_task("digits", max_train=100, max_test=20)
    assert again.train.sha256() == task.train.sha256()
    other = load_task("digits", max_train=100, max_test=20, seed=1)
    assert other.train.sha256() != task.train.sha256()


def test_missing_package_data_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.setattr(data, "FASHION_DIR", tmp_path)
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_task("fashion_mnist")


def test_derived_tasks() -> None:
    base = load_task("digits")
    inv = load_task("digits:inverted")
    assert torch.allclose(inv.train.images, 1 - base.train.images, atol=1e-6)
    rot = load_task("digits:rot90")
    assert torch.equal(rot.test.images, torch.rot90(base.test.images, 1, (2, 3)))
    sub = load_task("digits:classes=0-4")
    assert sub.name == "digits:classes=0-4" and sub.train.classes == ("0", "1", "2", "3", "4")
    assert torch.equal(sub.train.labels, base.train.labels[base.train.labels < 5])
    picked = load_task("digits:classes=3,7:inverted")
    assert picked.test.classes == ("3", "7") and set(picked.test.labels.tolist()) == {0, 1}
    assert torch.equal(picked.test.images[picked.test.labels == 1],
                       inv.test.images[inv.test.labels == 7])
    with pytest.raises(DatasetError, match="0..9"):
        load_task("digits:classes=5-12")


def test_resize_and_channels() -> None:
    task = load_task("digits", image_size=16, channels=3, max_train=30, max_test=10)
    _check(task, 30, 10, (3, 16, 16))
    assert torch.equal(task.train.images[:, 0], task.train.images[:, 2])
    gray = load_task("digits", image_size=16, max_train=30, max_test=10)
    assert torch.equal(gray.train.images[:, 0], task.train.images[:, 0])


@pytest.mark.parametrize("source", ["digits:rot90", "digits:classes=2-5"])
def test_save_load_round_trip(tmp_path: Path, source: str) -> None:
    task = load_task(source, channels=3 if "rot" in source else None, max_train=300, max_test=100)
    save_task(task, tmp_path / "task")
    meta = json.loads((tmp_path / "task" / "mergeshield_task.json").read_text())
    assert meta == {"name": task.name, "source": source}
    back = load_task(str(tmp_path / "task"))
    assert back.name == task.name and back.source == str(tmp_path / "task")
    for a, b in ((task.train, back.train), (task.test, back.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert a.classes == b.classes and a.sha256() == b.sha256()


def _png(path: Path, value: int, size: tuple[int, int] = (6, 5), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0]) + ((3,) if mode == "RGB" else ()), value, dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)


def test_image_folder_with_splits(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("test", 2)):
        for ci, cls in enumerate(("cat", "ant", "bee")):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", 10 * ci + i, mode="RGB")
    task = load_task(str(tmp_path))
    _check(task, 12, 6, (3, 5, 6))
    assert task.train.classes == ("ant", "bee", "cat")
    cats = task.train.images[task.train.labels == 2]
    assert sorted(round(float(x) * 255) for x in cats[:, 0, 0, 0]) == [0, 1, 2, 3]
    small = load_task(str(tmp_path), channels=1, image_size=4)
    _check(small, 12, 6, (1, 4, 4))


def test_image_folder_classes_only_is_split_80_20(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        for i in range(10):
            _png(tmp_path / cls / f"{i}.jpg", 20 * i)
    task = load_task(str(tmp_path))
    _check(task, 16, 4, (1, 5, 6))
    assert load_task(str(tmp_path)).test.sha256() == task.test.sha256()


def test_image_folder_mixed_sizes_need_a_size(tmp_path: Path) -> None:
    for split in ("train", "test"):
        _png(tmp_path / split / "x" / "0.png", 3, size=(4, 4))
        _png(tmp_path / split / "x" / "1.png", 3, size=(8, 8))
    with pytest.raises(DatasetError, match="--image-size"):
        load_task(str(tmp_path))
    _check(load_task(str(tmp_path), image_size=6), 2, 2, (1, 6, 6))
    # a scan passes its model's input side: mixed sizes are resized to it, one size is kept
    _check(load_task(str(tmp_path), mixed_size=5), 2, 2, (1, 5, 5))
    _check(load_task(str(tmp_path), image_size=6, mixed_size=5), 2, 2, (1, 6, 6))


def test_hf_save_to_disk_with_validation_and_other_names(tmp_path: Path) -> None:
    feats = datasets.Features({"img": datasets.Image(),
                               "labels": datasets.ClassLabel(names=["no", "yes"])})
    images = [Image.fromarray(np.full((7, 7), 40 * i, np.uint8)) for i in range(6)]
    split = datasets.Dataset.from_dict({"img": images, "labels": [0, 1] * 3}, features=feats)
    datasets.DatasetDict({"train": split, "validation": split.select(range(2))}).save_to_disk(
        str(tmp_path / "hf"))
    task = load_task(str(tmp_path / "hf"))
    _check(task, 6, 2, (1, 7, 7))
    assert task.train.classes == ("no", "yes") and task.test.labels.tolist() == [0, 1]
    assert round(float(task.train.images[5, 0, 3, 3]) * 255) == 200


def test_hf_plain_columns(tmp_path: Path) -> None:
    pixels = np.arange(4 * 3 * 2 * 2, dtype=np.uint8).reshape(4, 3, 2, 2) * 5
    ds = datasets.Dataset.from_dict({"pixel_values": list(pixels), "label": ["b", "a", "b", "c"]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "hf"))
    task = load_task(str(tmp_path / "hf"))
    _check(task, 4, 4, (3, 2, 2))
    assert task.train.classes == ("a", "b", "c") and task.train.labels.tolist() == [1, 0, 1, 2]
    assert torch.equal(task.train.images, torch.from_numpy(pixels).float() / 255)


def test_parquet_folder(tmp_path: Path) -> None:
    feats = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["x"])})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(np.zeros((3, 3), np.uint8))] * 2, "label": [0, 0]},
        features=feats)
    (tmp_path / "data").mkdir()
    for split in ("train", "test"):
        ds.to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))
    _check(load_task(str(tmp_path)), 2, 2, (1, 3, 3))


def test_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match="bundled name"):
        load_task(str(tmp_path / "nowhere"))
    with pytest.raises(SourceNotFoundError):
        load_task("not_a_dataset")
    with pytest.raises(FileNotFoundError):  # SourceNotFoundError is also a FileNotFoundError
        load_task("./missing:inverted")


def test_garbage_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="not a dataset"):
        load_task(str(tmp_path))
    (tmp_path / "dataset_dict.json").write_text("{broken")
    with pytest.raises(DatasetError):
        load_task(str(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="is a file"):
        load_task(str(tmp_path / "file"))


def test_hub_unreachable_is_hub_error(tmp_path: Path) -> None:
    token = "hf_do_not_print_me"
    with pytest.raises(HubError) as info:
        load_task("someone/data", endpoint="http://127.0.0.1:9", token=token,
                  cache_dir=tmp_path)
    assert token not in str(info.value)


def test_hub_dataset(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    pytest.importorskip("tests.support.hub", reason="the loopback hub is not written yet")
    try:
        hub = request.getfixturevalue("hub")
    except pytest.FixtureLookupError:
        pytest.skip("no `hub` fixture registered")
    task = load_task("digits", max_train=20, max_test=10)
    save_task(task, tmp_path / "folder")
    hub.add_repo("acme/digits", tmp_path / "folder", repo_type="dataset")
    back = load_task("acme/digits", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    assert back.train.sha256() == task.train.sha256() and back.name == task.name


def test_image_dataset_checks_and_subset() -> None:
    ds = ImageDataset(torch.zeros(4, 1, 2, 2), torch.arange(4), ("a",) * 4, "t")
    assert len(ds.subset(slice(1, 3))) == 2 and len(ds.subset(torch.tensor([0, 3, 3]))) == 3
    assert ds.subset(ds.labels > 1).labels.tolist() == [2, 3]
    with pytest.raises(DatasetError):
        ImageDataset(torch.zeros(4, 2, 2), torch.arange(4), ("a",), "t")
    with pytest.raises(DatasetError):
        ImageDataset(torch.zeros(4, 1, 2, 2), torch.arange(3), ("a",), "t")


@pytest.mark.parametrize(("name", "known"), [
    ("mnist5k", True), ("digits:classes=0-4:rot90", True), ("org/data:inverted", True),
    ("nosuchdata", False), ("nosuchdata:rot90", False), ("mnist5k:nosuchmod", False),
    ("digits:classes=,", False), ("digits:classes=0-99999999999", False),
])
def test_check_dataset_name_refuses_what_no_loader_could_read(name: str, known: bool) -> None:
    if known:
        data.check_dataset_name(name)
    else:
        with pytest.raises(SourceNotFoundError, match="no dataset"):
            data.check_dataset_name(name)


def test_a_class_range_past_the_classes_is_refused_before_it_is_built() -> None:
    with pytest.raises(DatasetError, match=r"0\.\.9"):
        load_task("digits:classes=0-999999")  # would be a million-entry list, then refused
