"""A database lock per injection-BV key, so two workers never build the same BV_inj.

The first worker inserts a ``building`` row and builds; the others wait until it is ``ready``
and then read the cached file. A builder that stops beating (crashed) is taken over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from mergeshield import cancellation
from worker.db import BvCacheEntry, Database, now

log = logging.getLogger("mergeshield.worker")

BvGuard = Callable[[str], AbstractContextManager[None]]


def db_guard(db: Database, builder: str, scan_id: str, stale_after: float,
             poll: float = 0.5) -> BvGuard:
    """A ``ScanContext.bv_guard``: hold the key's row while building, wait while another does."""

    @contextmanager
    def guard(key: str) -> Iterator[None]:
        while not _acquire(db, key, builder, scan_id, stale_after):
            cancellation.check()  # a scan cancelled while it waits stops waiting
            time.sleep(poll)
        ok, stop = False, threading.Event()
        beat = threading.Thread(target=_beat, args=(db, key, builder, stop, stale_after / 4),
                                daemon=True)
        beat.start()
        try:
            yield
            ok = True
        finally:
            stop.set()
            beat.join(timeout=5)
            with db.session() as s:
                if ok:  # built (or found ready): later scans go straight to the file
                    s.execute(update(BvCacheEntry).where(BvCacheEntry.key == key)
                              .values(state="ready", heartbeat_at=now()))
                else:  # failed: let the next one try
                    s.execute(delete(BvCacheEntry).where(BvCacheEntry.key == key,
                                                         BvCacheEntry.builder == builder))

    return guard


def _acquire(db: Database, key: str, builder: str, scan_id: str, stale_after: float) -> bool:
    try:
        with db.session() as s:
            s.add(BvCacheEntry(key=key, state="building", builder=builder, scan_id=scan_id))
        return True
    except IntegrityError:
        pass
    with db.session() as s:
        row = s.scalars(select(BvCacheEntry).where(BvCacheEntry.key == key)).first()
        if row is None:
            return False  # released meanwhile: try to insert again
        if row.state == "ready":
            return True  # the caller re-reads the cache and finds it
        if row.heartbeat_at < now() - timedelta(seconds=stale_after):  # the builder died
            taken = s.execute(update(BvCacheEntry).where(
                BvCacheEntry.key == key, BvCacheEntry.builder == row.builder,
                BvCacheEntry.heartbeat_at == row.heartbeat_at)
                .values(builder=builder, scan_id=scan_id, heartbeat_at=now()))
            return bool(taken.rowcount)  # type: ignore[attr-defined]
        return False




def _beat(db: Database, key: str, builder: str, stop: threading.Event, interval: float) -> None:
    """Keep the row fresh while building, so waiters do not take a live build over."""
    while not stop.wait(interval):
        try:
            with db.session() as s:
                s.execute(update(BvCacheEntry).where(BvCacheEntry.key == key,
                                                     BvCacheEntry.builder == builder)
                          .values(heartbeat_at=now()))
        except Exception:  # a database hiccup: the next beat retries before the row goes stale
            log.exception("BV_inj build heartbeat failed")
