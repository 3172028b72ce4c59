"""The embedded broker: kombu's filesystem transport, delivering in submission order.

kombu names a message file ``<monotonic ms>_<uuid>.<queue>.msg`` and consumes files in name
order. Those numbers have no fixed width (``999...`` sorts after ``1000...`` once uptime adds a
digit) and restart at each boot, so a scan could wait behind any number of later ones. Here a
message file is named by the wall clock in nanoseconds, zero-padded (names sort as submissions
do, across processes and reboots), and written under a hidden name then renamed, so a consumer
never reads a half-written message.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

TRANSPORT = "worker.broker:Transport"  # for Celery's ``broker_transport`` setting
_OURS = re.compile(r"^\d{20}_")


def message_name(queue: str) -> str:
    """``<20-digit ns>_<uuid>.<queue>.msg``: the name order is the submission order."""
    return f"{time.time_ns():020d}_{uuid.uuid4().hex}.{queue}.msg"


def rename_legacy(folder: Path) -> int:
    """Give message files queued under kombu's own names (before this transport) names of
    ours, by their write time, so they do not wait behind every new one; returns how many."""
    renamed = 0
    for path in folder.glob("*.msg"):
        if _OURS.match(path.name):
            continue
        with contextlib.suppress(OSError):  # another process renamed or consumed it first
            stamp = path.stat().st_mtime_ns
            path.rename(folder / f"{stamp:020d}_{path.name.partition('_')[2] or path.name}")
            renamed += 1
    return renamed


class Channel(filesystem.Channel):
    def _put(self, queue: Any, message: Any, **_: Any) -> None:  # type: ignore[override]
        """Put ``message`` on ``queue``: written aside, then renamed into place at once."""
        name = message_name(queue)
        folder = self.data_folder_out
        hidden = os.path.join(folder, f".{name}.part")  # not a ``<queue>.msg``: never consumed
        try:
            with open(hidden, "wb") as f:
                f.write(str_to_bytes(dumps(message)))
            os.replace(hidden, os.path.join(folder, name))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(hidden)
            raise ChannelError(f"Cannot add file {name!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel
