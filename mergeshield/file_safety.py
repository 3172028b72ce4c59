"""Files a model folder may hold: regular files only, and names that are valid Unicode.

A FIFO named ``model.safetensors`` blocks ``open()`` forever, a device never ends, a socket
cannot be read: each is refused with :class:`UnsafeFileError` before it is opened. Symbolic
links are judged where the model folder is known (``model_folder.py``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mergeshield.errors import ConfigError, UnsafeFileError

__all__ = ["check_regular", "open_regular", "plain_text", "read_at_most", "read_option_file",
           "read_regular",
           "special_file_error"]

_SPECIAL = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def special_file_error(path: Path, mode: int) -> UnsafeFileError:
    kind = _SPECIAL.get(stat.S_IFMT(mode), "not a regular file")
    return UnsafeFileError(
        f"{path.name}: refused, it is {kind}, not a regular file; reading it could block forever "
        "or read from a device. Put the real file there", details={"file": path.name,
                                                                  "kind": kind})


def check_regular(path: Path) -> None:
    """Refuse ``path`` (followed if a link) unless it is a regular file, without opening it:
    a FIFO named ``model.safetensors`` would block ``open()`` forever, a device never ends."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the open that follows says so
    if not stat.S_ISREG(mode):
        raise special_file_error(path, mode)


def open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, which must be a regular file. Opened non-blocking and
    checked with ``fstat`` on the descriptor, so a file swapped for a FIFO after
    :func:`check_regular` cannot block either (O_NONBLOCK changes nothing for regular files)."""
    check_regular(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise special_file_error(path, mode)
    return fd


def read_regular(path: Path) -> bytes:
    """The bytes of a regular file (never a FIFO or device)."""
    with os.fdopen(open_regular(path), "rb") as f:
        return f.read()


def read_at_most(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file of at most ``limit`` bytes; None when it holds more (never
    reads past ``limit + 1``, never opens a FIFO or device)."""
    with os.fdopen(open_regular(path), "rb") as f:
        raw = f.read(limit + 1)
    return raw if len(raw) <= limit else None


def read_option_file(path: Path, limit: int, what: str) -> bytes:
    """A file the user names as an option (a trigger list, a merge plan): at most ``limit``
    bytes of a regular file, else ``invalid_config`` saying so (a FIFO: ``unsafe_file``)."""
    try:
        raw = read_at_most(path, limit)
    except OSError as exc:
        raise ConfigError(f"{path.name}: cannot read the {what} ({exc.strerror})",
                          details={"file": path.name}) from None
    if raw is None:
        raise ConfigError(f"{path.name}: a {what} holds at most {limit} bytes",
                          details={"file": path.name})
    return raw


def plain_text(value: str) -> bool:
    """Whether ``value`` is encodable as UTF-8: a lone surrogate (``"\\ud800"`` in JSON, or a
    pickled str) is not, and would fail every later write of the name (report, output)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
