"""Short database reads for async routes, on a few threads of their own.

A status poll's read takes a tenth of a millisecond; handing it to the 40 threads that sync routes
share cost five times that under load, because up to 40 runnable threads then take turns at the
GIL with the event loop. ``READ_THREADS`` threads keep the loop free while the database answers
(a network round trip on PostgreSQL) without that crowd (docs/decisions.md, "The API's
per-request cost").
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from starlette.requests import HTTPConnection

P = ParamSpec("P")
T = TypeVar("T")
READ_THREADS = 4  # one was as fast on SQLite; a few let PostgreSQL round trips overlap


def executor() -> ThreadPoolExecutor:
    """The pool an app's reads run on (``app.state.reads``, shut down with the app)."""
    return ThreadPoolExecutor(READ_THREADS, thread_name_prefix="reads")


async def read(conn: HTTPConnection, work: Callable[P, T], *args: P.args,
               **kwargs: P.kwargs) -> T:
    """``work(*args, **kwargs)`` on the app's read threads, awaited in the event loop."""
    pool: ThreadPoolExecutor = conn.app.state.reads
    return await asyncio.get_running_loop().run_in_executor(
        pool, functools.partial(work, *args, **kwargs))
