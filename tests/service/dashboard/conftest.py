"""Every dashboard module's browser, and a desktop page signed in with the admin key on the
module's own ``stack`` fixture (tests/support/browser.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page

from tests.support.browser import DESKTOP, chromium, signed_in
from tests.support.stack import Stack


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    with signed_in(browser, stack, DESKTOP) as pg:
        yield pg
