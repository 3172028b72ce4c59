"""archives.py on real zip and tar files: happy paths, hostile members, bombs and damaged files."""

from __future__ import annotations

import io
import json
import stat
import struct
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save

from mergeshield.archives import ArchiveLimits, _Extraction, is_archive, unpack
from mergeshield.errors import (
    CorruptCheckpointError,
    InputError,
    MergeShieldError,
    SourceNotFoundError,
    UnsafeArchiveError,
)

TAR_MODES = ["w", "w:gz", "w:bz2", "w:xz"]


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: Sequence[tarfile.TarInfo | tuple[str, bytes]],
         mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
                continue
            info = tarfile.TarInfo(m[0])
            info.size = len(m[1])
            tf.addfile(info, io.BytesIO(m[1]))
    return path


def _link(name: str, kind: bytes, target: str = "/etc/passwd") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _hf_files() -> dict[str, bytes]:
    weights = save({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    return {"config.json": json.dumps({"model_type": "vit"}).encode(), "model.safetensors": weights}


def _refused(tmp_path: Path, archive: Path, error: type[MergeShieldError],
             **limits: int) -> MergeShieldError:
    """Unpack must fail with ``error``, leave no dest and write nothing beside the archive."""
    dest = tmp_path / "out"
    with pytest.raises(error) as info:
        unpack(archive, dest, ArchiveLimits(**limits))
    assert not dest.exists()
    assert {p.name for p in tmp_path.rglob("*")} == {archive.name}
    assert str(tmp_path) not in str(info.value)
    return info.value


def test_zip_with_one_top_folder_returns_that_folder(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "m.zip", {f"vit/{k}": v for k, v in _hf_files().items()})
    root = unpack(archive, tmp_path / "out")
    assert root == tmp_path / "out" / "vit"
    assert sorted(p.name for p in root.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((root / "config.json").read_text()) == {"model_type": "vit"}
    np.testing.assert_array_equal(load_file(root / "model.safetensors")["w"],
                                  np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("mode", TAR_MODES)
def test_tar_with_one_top_folder_returns_that_folder(tmp_path: Path, mode: str) -> None:
    folder = tarfile.TarInfo("./vit")
    folder.type = tarfile.DIRTYPE
    archive = _tar(tmp_path / "m.tar", [folder, *[(f"./vit/{k}", v) for k, v in
                                                  _hf_files().items()]], mode)
    assert is_archive(archive)
    root = unpack(archive, tmp_path / "out")
    assert root == tmp_path / "out" / "vit"
    assert (root / "model.safetensors").read_bytes() == _hf_files()["model.safetensors"]


def test_files_at_the_top_return_dest(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "m.tgz", [*_hf_files().items(), ("sub/readme.md", b"hi")])
    dest = tmp_path / "out"
    dest.mkdir()  # an existing empty folder is fine
    assert unpack(archive, dest) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors", "sub"]
    assert (dest / "sub" / "readme.md").read_bytes() == b"hi"


def test_is_archive_sniffs_content_not_suffix(tmp_path: Path) -> None:
    hidden = _zip(tmp_path / "weights.safetensors", {"a.txt": b"a"})
    plain = tmp_path / "model.safetensors"
    plain.write_bytes(_hf_files()["model.safetensors"])
    torch_like = _zip(tmp_path / "pytorch_model.bin",  # what torch.save writes: a zip
                      {"archive/data.pkl": b"\x80", "archive/version": b"3"})
    named_zip = tmp_path / "fake.zip"
    named_zip.write_text("{}")
    assert is_archive(hidden)
    assert is_archive(_tar(tmp_path / "t", [("a", b"a")], "w:xz"))
    assert not any(is_archive(p) for p in [plain, torch_like, named_zip, tmp_path, tmp_path / "no"])


@pytest.mark.parametrize("name", ["/abs/evil", "../evil", "a/../../evil", "C:/evil",
                                  "a\\..\\..\\evil", "\\\\server\\share\\evil", "a/" + "x" * 300,
                                  "."])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_escaping_names_are_refused(tmp_path: Path, name: str, kind: str) -> None:
    members = [("ok.json", b"{}"), (name, b"evil")]  # the good member is written, then removed
    archive = (_zip(tmp_path / "m.zip", dict(members)) if kind == "zip"
               else _tar(tmp_path / "m.tgz", list(members)))
    error = _refused(tmp_path, archive, UnsafeArchiveError)
    assert error.code == "unsafe_archive"
    assert error.details == {"archive": archive.name, "member": name[:200],
                             "problem": error.details["problem"]}
    assert "re-create the archive" in str(error)


@pytest.mark.parametrize("member", [_link("model.safetensors", tarfile.SYMTYPE),
                                    _link("model.safetensors", tarfile.LNKTYPE, "config.json"),
                                    _link("dev", tarfile.CHRTYPE), _link("pipe", tarfile.FIFOTYPE)])
def test_tar_links_and_devices_are_refused(tmp_path: Path, member: tarfile.TarInfo) -> None:
    archive = _tar(tmp_path / "m.tar", [("config.json", b"{}"), member], "w")
    error = _refused(tmp_path, archive, UnsafeArchiveError)
    assert isinstance(error, InputError) and error.details["member"] == member.name


def test_zip_symlink_member_is_refused(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("model.safetensors")
    link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "m.zip", "w") as zf:
        zf.writestr("config.json", b"{}")
        zf.writestr(link, "/etc/passwd")
    error = _refused(tmp_path, tmp_path / "m.zip", UnsafeArchiveError)
    assert "symbolic link" in str(error)


@pytest.mark.parametrize("names", [["a.json", "a.json"], ["a", "a/b"], ["a/b", "a"], ["a/", "a"]])
def test_duplicate_and_clashing_names_are_refused(tmp_path: Path, names: list[str]) -> None:
    archive = _tar(tmp_path / "m.tar", [(n, b"x") for n in names], "w")
    _refused(tmp_path, archive, UnsafeArchiveError)
    with pytest.warns(UserWarning, match="Duplicate name"), \
            zipfile.ZipFile(tmp_path / "m.zip", "w") as zf:
        zf.writestr("a.json", b"1")
        zf.writestr("a.json", b"2")
    (tmp_path / "m.tar").unlink()
    _refused(tmp_path, tmp_path / "m.zip", UnsafeArchiveError)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_too_many_files_are_refused(tmp_path: Path, kind: str) -> None:
    members = {f"f{i}.txt": b"x" for i in range(6)}
    archive = (_zip(tmp_path / "m.zip", members) if kind == "zip"
               else _tar(tmp_path / "m.tgz", list(members.items())))
    assert unpack(archive, tmp_path / "ok", ArchiveLimits(max_files=6)) == tmp_path / "ok"
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="limit of 5 members"):
        unpack(archive, dest, ArchiveLimits(max_files=5))
    assert not dest.exists()


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_size_over_the_limit_is_refused(tmp_path: Path, kind: str) -> None:
    members = [("config.json", b"{}"), ("model.safetensors", bytes(1_000_000))]  # ~1 KB packed
    archive = (_zip(tmp_path / "m.zip", dict(members)) if kind == "zip"
               else _tar(tmp_path / "m.tgz", members))
    assert archive.stat().st_size < 10_000
    error = _refused(tmp_path, archive, UnsafeArchiveError, max_bytes=100_000)
    assert "100000 unpacked bytes" in str(error)


@pytest.mark.parametrize(("limits", "message"), [({"max_bytes": 100_000}, "unpacked bytes"),
                                                  ({"max_files": 2}, "limit of 2 members")])
def test_zip_limits_are_judged_from_the_directory_before_any_write(
        tmp_path: Path, limits: dict[str, int], message: str) -> None:
    # the first member would be refused on its own; the limits refuse the zip before reaching it
    archive = _zip(tmp_path / "m.zip", {"../evil": b"x", "a": bytes(1_000_000), "b": b"b"})
    assert message in str(_refused(tmp_path, archive, UnsafeArchiveError, **limits))


def test_zip_header_that_lies_about_size_stops_at_the_limit(tmp_path: Path) -> None:
    data = bytes(1_000_000)
    archive = _zip(tmp_path / "bomb.zip", {"model.safetensors": data})
    raw = bytearray(archive.read_bytes())
    for signature, offset in [(b"PK\x03\x04", 22), (b"PK\x01\x02", 24)]:  # local, central
        at = raw.index(signature) + offset
        assert struct.unpack_from("<I", raw, at)[0] == len(data)
        struct.pack_into("<I", raw, at, 100)  # claims 100 bytes; the stream inflates to 1 MB
    archive.write_bytes(bytes(raw))
    # zipfile stops at the claimed size, then the CRC of the whole member no longer matches
    error = _refused(tmp_path, archive, CorruptCheckpointError, max_bytes=10_000)
    assert error.details["member"] == "model.safetensors"


def test_bytes_are_counted_as_written_not_as_declared(tmp_path: Path) -> None:
    ex = _Extraction("m.zip", tmp_path, ArchiveLimits(max_bytes=3000))
    src = io.BytesIO(bytes(10_000))
    with pytest.raises(UnsafeArchiveError):
        ex.write("big", tmp_path / "big", lambda n: src.read(min(n, 1000)))
    assert (tmp_path / "big").stat().st_size == 3000  # the chunk that crossed was never written


def test_damaged_archives_are_corrupt(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "m.zip", {"model.safetensors": bytes(range(256)) * 100})
    raw = bytearray(archive.read_bytes())
    raw[60:70] = b"\xff" * 10  # inside the deflate stream of the only member
    archive.write_bytes(bytes(raw))
    error = _refused(tmp_path, archive, CorruptCheckpointError)
    assert "damaged" in str(error) and error.code == "corrupt_checkpoint"
    archive.unlink()
    whole = _tar(tmp_path / "t.tar", [("model.safetensors", bytes(5000))], "w").read_bytes()
    (tmp_path / "t.tar").write_bytes(whole[:2048])  # header plus part of the data
    _refused(tmp_path, tmp_path / "t.tar", CorruptCheckpointError)
    (tmp_path / "t.tar").write_bytes(b"not an archive at all")
    assert "not a zip or tar" in str(_refused(tmp_path, tmp_path / "t.tar", CorruptCheckpointError))


def test_a_missing_archive_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match="no archive file 'gone.zip'"):
        unpack(tmp_path / "gone.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_destination_with_files_is_refused_and_kept(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "m.zip", {"a.txt": b"a"})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        unpack(archive, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_a_refusal_empties_an_existing_destination(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "m.tgz", [("a/b.txt", b"b"), ("../evil", b"x")])
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchiveError):
        unpack(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "evil").exists()
