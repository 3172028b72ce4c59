"""The embedded (filesystem) broker delivers scans in the order they were sent."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from mergeshield.settings import Settings
from worker import broker
from worker.app import create_celery, send_scan


def test_message_names_sort_as_submissions_across_a_digit_boundary(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # kombu's own names (monotonic ms, unpadded) sort 10000 before 9999: a scan sent at 9999
    # waited behind every later one
    clock = iter([9_999, 10_000, 10**18, 10**19])
    monkeypatch.setattr(broker.time, "time_ns", lambda: next(clock))
    names = [broker.message_name("cpu") for _ in range(4)]
    assert sorted(names) == names
    assert all(n.endswith(".cpu.msg") and n.partition(".")[2] == "cpu.msg" for n in names)


def test_the_embedded_broker_is_first_in_first_out(tmp_path: Path) -> None:
    app = create_celery(Settings(data_dir=tmp_path))
    sent = [f"scan{i:02d}-{q}" for i, q in zip(range(12), itertools.cycle(("cpu", "gpu")),
                                               strict=False)]
    for scan_id in sent:
        send_scan(app, scan_id, scan_id.rsplit("-", 1)[1])
    assert not list((tmp_path / "broker" / "queue").glob(".*"))  # nothing left half-written
    got: dict[str, list[str]] = {"cpu": [], "gpu": []}
    with app.connection_for_read() as conn:
        assert isinstance(conn.transport, broker.Transport)
        for queue, ids in got.items():
            simple = conn.SimpleQueue(queue)
            while True:
                try:
                    message = simple.get(block=False)
                except simple.Empty:
                    break
                ids.append(message.headers["id"])
                message.ack()
            simple.close()
    assert got == {q: [s for s in sent if s.endswith(q)] for q in ("cpu", "gpu")}


def test_messages_queued_under_kombus_names_keep_their_place(tmp_path: Path) -> None:
    queue = tmp_path / "broker" / "queue"
    queue.mkdir(parents=True)
    old = queue / "9999_0123abcd.cpu.msg"  # kombu's name: sorts after every zero-padded one
    old.write_text("{}")
    os.utime(old, ns=(1_000_000_000, 1_000_000_000))  # written long ago
    app = create_celery(Settings(data_dir=tmp_path))  # prepares the broker folder
    send_scan(app, "new", "cpu")
    names = sorted(p.name for p in queue.iterdir())
    assert len(names) == 2 and names[0] == f"{1_000_000_000:020d}_0123abcd.cpu.msg"
    assert broker.rename_legacy(queue) == 0  # once only
