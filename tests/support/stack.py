"""The service as real processes: API and workers started with the real command line, on the
embedded default (SQLite + filesystem broker) or on the local Redis and PostgreSQL.

Each stack gets its own data folder, its own PostgreSQL database and its own Redis db number,
so stacks never see each other's scans. Process output goes to files under the data folder and
is printed when a wait fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

ADMIN_KEY = "msk_test_admin_key_0123456789abcdef"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
BACKENDS = ("sqlite-filesystem", "postgres-redis")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    def __init__(self, root: Path, backend: str, *, redis_db: int = 9,
                 env: dict[str, str] | None = None) -> None:
        self.root, self.backend = root, backend
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {
            **os.environ,
            "MERGESHIELD_DATA_DIR": str(root / "data"),
            "MERGESHIELD_CACHE_DIR": str(root / "cache"),
            "MERGESHIELD_ADMIN_KEY": ADMIN_KEY,
            "MERGESHIELD_HEARTBEAT_INTERVAL": "1",
            "MERGESHIELD_STALE_AFTER": "6",
            "MERGESHIELD_RECONCILE_INTERVAL": "2",
            "MERGESHIELD_MAX_UPLOAD_BYTES": str(8 * 1024 * 1024),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.env.pop("REDIS_URL", None)
        self.env.pop("DATABASE_URL", None)
        self.dbname: str | None = None
        self.redis_url: str | None = None
        if backend == "postgres-redis":
            self.dbname = f"ms_{uuid.uuid4().hex[:12]}"
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.dbname}"')
            self.redis_url = f"redis://127.0.0.1:6379/{redis_db}"
            redis.Redis.from_url(self.redis_url).flushdb()
            self.env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:5432/{self.dbname}"
            self.env["REDIS_URL"] = self.redis_url

    # --- processes

    def _start(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args], env={**self.env, **(env or {})},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)

    def serve(self) -> Stack:
        """The README's one command: API + one worker, API keys required."""
        self._start("serve", "serve", "--auth", "--port", str(self.port))
        return self.wait_ready()

    def start_api(self, processes: int = 1) -> Stack:
        self._start("api", "api", "--port", str(self.port), "--processes", str(processes))
        return self

    def start_worker(self, name: str = "worker", env: dict[str, str] | None = None) -> Stack:
        self._start(name, "worker", "--queues", "gpu,cpu", "--hostname", f"{name}@%h", env=env)
        return self

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the process and its children (a worker's pool) at once, like a crash."""
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        for name in list(self.procs):  # no warm shutdown: it would wait for a running scan
            self.kill(name, signal.SIGKILL)
        if self.dbname is not None:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')

    def logs(self, tail: int | None = None) -> str:
        """Every process's output (the last ``tail`` characters of each)."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-(tail or 0):]}"
                         for p in sorted(self.root.glob("*.log")))

    # --- HTTP

    def client(self, key: str | None = ADMIN_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def wait_ready(self, timeout: float = 90) -> Stack:
        """Until /readyz says database, broker and a worker are all there."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = httpx.get(f"{self.url}/readyz", timeout=5)
                if last.status_code == 200:
                    return self
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.3)
        raise AssertionError(f"not ready after {timeout} s: {last}\n{self.logs(4000)}")

    def wait_up(self, timeout: float = 60) -> Stack:
        """Until /healthz answers (no worker needed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"API not up after {timeout} s\n{self.logs(4000)}")

    def wait_for(self, client: httpx.Client, scan_id: str,
                 states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
                 timeout: float = 240, stage: str | None = None) -> dict[str, Any]:
        """Poll the scan until it is in one of ``states`` (or has reached ``stage``)."""
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = client.get(f"/v1/scans/{scan_id}").json()
            if body.get("state") in states or (stage is not None and body.get("stage") == stage):
                return body
            time.sleep(0.25)
        raise AssertionError(f"scan {scan_id} still {body} after {timeout} s\n{self.logs(4000)}")


def ensure_services() -> None:
    """Fail with a clear message when the local Redis or PostgreSQL is not running."""
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2).ping()
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            pass
    except Exception as exc:  # pragma: no cover - the test command starts both
        raise RuntimeError(f"Redis/PostgreSQL not reachable ({exc}); run ./scripts/test, which "
                           "starts them") from exc
