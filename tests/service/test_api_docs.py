"""``/docs`` renders in a real browser with every request off the server refused: its scripts and
styles come from the installed package, not a CDN (issue 15)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.sync_api import Route, expect, sync_playwright

from mergeshield.settings import Settings
from service.main import create_app
from tests.support.browser import ARGS, CHROMIUM, shoot


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app on a loopback port through uvicorn (real HTTP, the way a browser reaches it)."""
    root = tmp_path_factory.mktemp("api-docs")
    app = create_app(Settings(data_dir=root / "data", cache_dir=root / "cache"),
                     reconciler=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def test_the_api_docs_render_with_the_network_off(server: str) -> None:
    off_server: list[str] = []

    def only_loopback(route: Route) -> None:
        if route.request.url.startswith(server):
            route.continue_()
        else:  # what a machine without internet would not reach
            off_server.append(route.request.url)
            route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 820})
            page.route("**/*", only_loopback)
            page.goto(server + "/docs")
            operations = page.locator(".swagger-ui .opblock-summary-path")  # one per operation
            expect(operations.first).to_be_visible(timeout=30_000)
            assert operations.count() > 20
            expect(page.get_by_text("/v1/scans", exact=True).first).to_be_visible()
            assert "MergeShield" in page.title()
            shoot(page, "api-docs")
        finally:
            browser.close()
    assert off_server == []


def test_the_assets_are_the_installed_packages_files(server: str) -> None:
    got = httpx.get(f"{server}/docs-assets/swagger-ui-bundle.js")
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/javascript")
    assert got.content == Path(str(files("fastapi_offline") / "static" / "swagger-ui-bundle.js")
                               ).read_bytes()
    assert httpx.get(f"{server}/docs-assets/../main.py").status_code == 404
    assert httpx.get(f"{server}/redoc").status_code == 404  # it would call cdn.redoc.ly
