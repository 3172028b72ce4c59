"""Cooperative cancellation: long loops call ``check()`` between two steps (a fine-tune step, an
evaluation batch, an inversion step); whoever may stop a scan (the worker, when the scan is
cancelled) installs its check with ``checked_by(fn)`` for the scan's length, and ``fn`` raises
to stop it there. With no check installed, ``check()`` is one context-variable lookup."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_check: ContextVar[Callable[[], None] | None] = ContextVar("mergeshield_cancel_check",
                                                           default=None)


def check() -> None:
    """Between two steps: the installed check may raise to stop the work here."""
    fn = _check.get()
    if fn is not None:
        fn()


@contextmanager
def checked_by(fn: Callable[[], None]) -> Iterator[None]:
    """Run the body with ``fn`` as the check every ``check()`` calls (nested: innermost)."""
    token = _check.set(fn)
    try:
        yield
    finally:
        _check.reset(token)
