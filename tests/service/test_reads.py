"""service/reads.py: an async route's short reads run on the app's read threads."""

from __future__ import annotations

import threading

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from service import reads


def _app() -> FastAPI:
    app = FastAPI()
    app.state.reads = reads.executor()

    @app.get("/where")
    async def where(request: Request) -> dict[str, str]:
        here = threading.current_thread().name
        there = await reads.read(request, lambda: threading.current_thread().name)
        return {"route": here, "read": there}

    @app.get("/fails")
    async def fails(request: Request) -> None:
        await reads.read(request, int, "not a number")

    return app


def test_a_read_leaves_the_event_loop_for_a_read_thread() -> None:
    app = _app()
    with TestClient(app) as client:
        got = client.get("/where").json()
    app.state.reads.shutdown()
    assert got["read"].startswith("reads") and not got["route"].startswith("reads")


def test_a_read_that_raises_raises_in_the_route() -> None:
    app = _app()
    with TestClient(app) as client, pytest.raises(ValueError):
        client.get("/fails")
    app.state.reads.shutdown()


def test_the_pool_is_small() -> None:
    pool = reads.executor()
    assert pool._max_workers == reads.READ_THREADS <= 8  # not the 40 of the sync routes' pool
    pool.shutdown()
