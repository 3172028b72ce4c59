"""The dashboard tests' browser: Debian's Chromium driven by Playwright, never downloaded.

``signed_in(browser, stack, viewport)`` opens a context on a stack's URL and signs in with a key
(a context manager: the context is closed after); ``shoot`` writes a small screenshot to
docs/screenshots/. tests/service/dashboard/conftest.py gives every dashboard module its
``browser`` and a desktop ``page`` signed in on the module's own ``stack``."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.support.stack import ADMIN_KEY, Stack

CHROMIUM = "/usr/bin/chromium"  # Debian's package (scripts/setup installs it); never downloaded
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
DESKTOP = {"width": 1100, "height": 820}
PHONE = {"width": 390, "height": 844}


def shoot(page: Page, name: str, full_page: bool = False) -> None:
    """A small PNG (a 64-colour palette keeps text sharp at a fraction of the size)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(page.screenshot(full_page=full_page))).convert("RGB")
    image.quantize(colors=64).save(SHOTS / f"{name}.png", optimize=True)


@contextmanager
def chromium() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "install Debian's chromium: apt-get install -y chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def context(browser: Browser, stack: Stack, viewport: dict[str, int]) -> BrowserContext:
    ctx = browser.new_context(base_url=stack.url, viewport=viewport,  # type: ignore[arg-type]
                              accept_downloads=True)
    ctx.set_default_timeout(20_000)
    return ctx


def sign_in(page: Page, key: str = ADMIN_KEY) -> None:
    page.goto("/ui/")
    expect(page).to_have_url(f"{page.url.split('/ui/')[0]}/ui/signin?next=%2Fui%2F")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Scans")).to_be_visible()


@contextmanager
def signed_in(browser: Browser, stack: Stack, viewport: dict[str, int],
              key: str = ADMIN_KEY) -> Iterator[Page]:
    """A page of a fresh context at ``viewport``, signed in with ``key``."""
    ctx = context(browser, stack, viewport)
    try:
        page = ctx.new_page()
        sign_in(page, key)
        yield page
    finally:
        ctx.close()
