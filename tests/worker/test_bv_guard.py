"""The lock per injection-BV key: one build, waiters read the file, the dead are replaced."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from worker.bv_guard import db_guard
from worker.db import BvCacheEntry, Database, now

KEY = "base@rev:badnets:mnist"


def entry(db: Database, key: str = KEY) -> BvCacheEntry | None:
    with db.session() as s:
        return s.scalars(select(BvCacheEntry).where(BvCacheEntry.key == key)).first()


class Builder:
    """What ``measure`` does under the guard: build the cache file unless it is there."""

    def __init__(self, file: Path) -> None:
        self.file, self.builds, self.lock = file, 0, threading.Lock()

    def build_if_missing(self, seconds: float = 0.0) -> None:
        if self.file.exists():
            return
        with self.lock:
            self.builds += 1
        time.sleep(seconds)  # long enough for the other thread to find the row taken
        self.file.write_text("bv_inj")


def test_two_workers_build_once(db: Database, tmp_path: Path) -> None:
    cache = Builder(tmp_path / "bv.safetensors")
    start = threading.Barrier(2)

    def scan(i: int) -> str:
        guard = db_guard(db, f"builder-{i}", f"scan-{i}", stale_after=5, poll=0.05)
        start.wait(timeout=10)
        with guard(KEY):
            cache.build_if_missing(seconds=0.3)
            return cache.file.read_text()

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(scan, (1, 2), timeout=20)) == ["bv_inj", "bv_inj"]
    assert cache.builds == 1
    row = entry(db)
    assert row is not None and row.state == "ready"
    assert row.builder in ("builder-1", "builder-2")


def test_a_later_scan_finds_the_ready_entry(db: Database, tmp_path: Path) -> None:
    cache = Builder(tmp_path / "bv.safetensors")
    with db_guard(db, "builder-1", "scan-1", stale_after=5, poll=0.05)(KEY):
        cache.build_if_missing()
    t0 = time.monotonic()
    with db_guard(db, "builder-2", "scan-2", stale_after=5, poll=0.05)(KEY):
        cache.build_if_missing()
    assert time.monotonic() - t0 < 2  # no waiting on a ready row
    assert cache.builds == 1


def test_a_failed_build_frees_the_key(db: Database, tmp_path: Path) -> None:
    cache = Builder(tmp_path / "bv.safetensors")
    with (pytest.raises(RuntimeError, match="out of memory"),
          db_guard(db, "builder-1", "scan-1", stale_after=5, poll=0.05)(KEY)):
        row = entry(db)
        assert row is not None and (row.state, row.builder) == ("building", "builder-1")
        raise RuntimeError("out of memory")
    assert entry(db) is None
    with db_guard(db, "builder-2", "scan-2", stale_after=5, poll=0.05)(KEY):
        row = entry(db)
        assert row is not None and (row.state, row.builder) == ("building", "builder-2")
        cache.build_if_missing()
    assert cache.builds == 1 and cache.file.exists()
    row = entry(db)
    assert row is not None and row.state == "ready"


def test_a_stale_builder_is_taken_over(db: Database, tmp_path: Path) -> None:
    cache = Builder(tmp_path / "bv.safetensors")
    with db.session() as s:  # a builder that crashed a minute ago
        s.add(BvCacheEntry(key=KEY, state="building", builder="dead", scan_id="scan-0",
                           heartbeat_at=now() - timedelta(seconds=60)))
    t0 = time.monotonic()
    with db_guard(db, "builder-1", "scan-1", stale_after=5, poll=0.05)(KEY):
        row = entry(db)
        assert row is not None and (row.builder, row.scan_id) == ("builder-1", "scan-1")
        cache.build_if_missing()
    assert time.monotonic() - t0 < 2
    assert cache.builds == 1
    row = entry(db)
    assert row is not None and row.state == "ready"


def test_two_workers_take_over_a_stale_builder_once(db: Database, tmp_path: Path) -> None:
    cache = Builder(tmp_path / "bv.safetensors")
    with db.session() as s:
        s.add(BvCacheEntry(key=KEY, state="building", builder="dead", scan_id="scan-0",
                           heartbeat_at=now() - timedelta(seconds=60)))
    start = threading.Barrier(2)

    def scan(i: int) -> None:
        guard = db_guard(db, f"builder-{i}", f"scan-{i}", stale_after=5, poll=0.05)
        start.wait(timeout=10)
        with guard(KEY):
            cache.build_if_missing(seconds=0.3)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(scan, (1, 2), timeout=20))
    assert cache.builds == 1
    row = entry(db)
    assert row is not None and row.state == "ready" and row.builder != "dead"


def test_a_live_builder_is_waited_for(db: Database, tmp_path: Path) -> None:
    with db.session() as s:  # another worker building right now
        s.add(BvCacheEntry(key=KEY, state="building", builder="other", scan_id="scan-0"))
    entered = threading.Event()

    def wait_for_it() -> None:
        with db_guard(db, "builder-1", "scan-1", stale_after=5, poll=0.05)(KEY):
            entered.set()

    thread = threading.Thread(target=wait_for_it, daemon=True)
    thread.start()
    assert not entered.wait(0.3)  # still building: the guard holds back
    with db.session() as s:
        s.get_one(BvCacheEntry, KEY).state = "ready"
    assert entered.wait(5)
    thread.join(5)
