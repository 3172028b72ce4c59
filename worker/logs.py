"""Structured logs: one JSON object per line, with the scan id, and never a secret.

The scan id travels in a context variable, so every line a scan's code logs carries it. A filter
masks anything that looks like a hub token, an API key or a bearer credential before it is
written, whoever logged it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

scan_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("scan_id", default=None)

_SECRET = re.compile(r"(hf_[A-Za-z0-9]{8,}|msk_[A-Za-z0-9_\-]{8,}|(?i:bearer)\s+[^\s\"',]+)")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def redact(text: str) -> str:
    return _SECRET.sub("***", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name,
               "message": redact(record.getMessage())}
        scan_id = getattr(record, "scan_id", None) or scan_id_var.get()
        if scan_id:
            out["scan_id"] = scan_id
        for key, value in vars(record).items():  # fields passed with extra={...}
            if key not in _STANDARD and key not in out:
                out[key] = redact(str(value)) if isinstance(value, str) else value
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        scan_id = getattr(record, "scan_id", None) or scan_id_var.get()
        prefix = f"[{scan_id}] " if scan_id else ""
        return redact(f"{record.levelname} {record.name}: {prefix}{super().format(record)}")


def configure(json_logs: bool, level: int = logging.INFO) -> None:
    """Route the root logger (and uvicorn's and celery's) through one formatted handler."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_logs else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        logging.getLogger(name).handlers[:] = []
        if name != "uvicorn.access":  # uvicorn turns that one off unless --access-log
            logging.getLogger(name).propagate = True
    # httpx logs every request's URL at INFO; alembic its plugins and dialect at every start
    # (worker/migrate.py logs a migration that ran, once)
    for noisy in ("httpx", "httpx2", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def scan_context(scan_id: str) -> Iterator[None]:
    token = scan_id_var.set(scan_id)
    try:
        yield
    finally:
        scan_id_var.reset(token)
