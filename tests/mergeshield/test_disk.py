"""disk.py: what would leave less than ``min_free`` bytes on the disk is refused before it is
written (an archive's unpacking, a hub download), and nothing half-written stays behind."""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from mergeshield import archives
from mergeshield.disk import built_once, ensure_room, free_bytes
from mergeshield.errors import InsufficientStorageError
from mergeshield.hub import download_repo
from tests.support import hostile
from tests.support.hub import LoopbackHub


def test_ensure_room_counts_what_is_needed_and_what_must_stay_free(tmp_path: Path) -> None:
    free = free_bytes(tmp_path / "not" / "made" / "yet")  # its nearest existing parent
    ensure_room(tmp_path, 0, 0, "nothing")
    with pytest.raises(InsufficientStorageError) as info:
        ensure_room(tmp_path, 1, 2 * free, "a thing")
    assert info.value.code == "insufficient_storage" and isinstance(info.value, OSError)
    assert "a thing" in info.value.message and info.value.details["min_free"] == 2 * free
    with pytest.raises(InsufficientStorageError):
        ensure_room(tmp_path, 2 * free, 0, "more than the disk holds")


def _zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/config.json", "{}")
        zf.writestr("m/model.safetensors", b"\0" * 4096)
    return path


def _tar(path: Path) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in (("m/config.json", b"{}"), ("m/model.safetensors", b"\0" * 4096)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("make", [_zip, _tar], ids=["zip", "tar"])
def test_unpacking_that_would_fill_the_disk_is_refused_and_leaves_nothing(
        tmp_path: Path, make: Callable[[Path], Path]) -> None:
    archive = make(tmp_path / "a")
    full = archives.ArchiveLimits(min_free_bytes=free_bytes(tmp_path) + 2**40)
    with pytest.raises(InsufficientStorageError, match="unpacking a"):
        archives.unpack(archive, tmp_path / "out", full)
    assert not (tmp_path / "out").exists()
    fine = archives.ArchiveLimits(min_free_bytes=0)
    assert archives.unpack(archive, tmp_path / "ok", fine) == tmp_path / "ok" / "m"


def test_a_hub_download_that_would_fill_the_disk_is_refused_before_a_byte(
        hub: LoopbackHub, tmp_path: Path) -> None:
    hub.add_repo("zoo/base", hostile.save_base(tmp_path / "base"))
    cache = tmp_path / "cache"
    kw = {"revision": None, "token": None, "endpoint": hub.url, "cache_dir": cache,
          "patterns": ["*.safetensors", "*.json"]}
    with pytest.raises(InsufficientStorageError) as info:
        download_repo("zoo/base", min_free_bytes=free_bytes(tmp_path) + 2**40, **kw)
    assert info.value.details["needed"] > 0  # the weights' size, from the hub's file list
    assert not list(cache.rglob("*.safetensors"))
    folder, _sha, _names = download_repo("zoo/base", min_free_bytes=0, **kw)
    assert (folder / "model.safetensors").is_file()
    # once cached, a download needs no room: the files are not fetched again
    with pytest.raises(InsufficientStorageError) as again:
        download_repo("zoo/base", min_free_bytes=free_bytes(tmp_path) + 2**40, **kw)
    assert again.value.details["needed"] == 0


def test_a_folder_built_once_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    with built_once(folder, ".building-") as work:
        (work / "config.json").write_text("{}")
    assert (folder / "config.json").is_file()
    with pytest.raises(RuntimeError), built_once(tmp_path / "broken", ".building-") as work:
        (work / "config.json").write_text("{}")
        raise RuntimeError("the conversion failed half-way")
    assert not (tmp_path / "broken").exists()
    with built_once(folder, ".building-") as work:  # a racing builder finished first: kept
        (work / "config.json").write_text('{"late": true}')
    assert (folder / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no scratch folder stays
