"""Regular files only: a FIFO, socket or device named like a model file is refused unopened."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from mergeshield.errors import UnsafeFileError
from mergeshield.file_safety import check_regular, open_regular, plain_text, read_regular


@pytest.fixture
def deadline() -> Iterator[None]:
    """Fail instead of hanging: open() of a FIFO with no writer blocks forever."""
    def fire(_sig: int, _frame: object) -> None:
        raise TimeoutError("blocked")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.usefixtures("deadline")
@pytest.mark.parametrize("check", [check_regular, open_regular, read_regular])
def test_a_fifo_is_refused_without_blocking(tmp_path: Path, check: object) -> None:
    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(UnsafeFileError, match="FIFO") as info:
        check(tmp_path / "model.safetensors")  # type: ignore[operator]
    assert info.value.code == "unsafe_file"
    assert info.value.details == {"file": "model.safetensors", "kind": "a FIFO"}


@pytest.mark.usefixtures("deadline")
def test_a_link_to_a_device_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.bin").symlink_to("/dev/zero")
    with pytest.raises(UnsafeFileError, match="character device"):
        read_regular(tmp_path / "x.bin")


def test_a_regular_file_reads(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(b"{}")
    assert read_regular(tmp_path / "a.json") == b"{}"
    fd = open_regular(tmp_path / "a.json")
    os.close(fd)


def test_lone_surrogates_are_not_plain_text() -> None:
    assert plain_text("vit.encoder.ä")
    assert not plain_text("vit.\ud800")
