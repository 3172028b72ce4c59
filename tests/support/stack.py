"""The service as real processes: API and workers started with the real command line, on the
embedded default (SQLite + filesystem broker) or on Redis and the local PostgreSQL.

Each stack gets its own data folder, its own PostgreSQL database and its own db number in the
test process's own Redis (``worker_redis_url``; or another Redis: ``redis_url``), so stacks
never see each other's scans. ``pg_port`` points the processes at another port than
PostgreSQL's (a proxy a test can cut). Process output
goes to files under the data folder and is printed when a wait fails. ``rows()`` reads the
scans table directly: the database is the truth the fault tests check against.
"""

from __future__ import annotations

import atexit
import functools
import os
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from psycopg.rows import dict_row

ADMIN_KEY = "msk_test_admin_key_0123456789abcdef"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
BACKENDS = ("sqlite-filesystem", "postgres-redis")


def worker_redis_url(n: int) -> str:
    """Database ``n`` (each test module that flushes one has its own, 9–15) of this test
    process's own Redis: every pytest-xdist worker starts a redis-server of its own (on first
    use; stopped when the worker exits), so any number of workers flush their databases without
    touching each other's queues or the machine's Redis."""
    return f"redis://127.0.0.1:{_own_redis().port}/{n}"


@functools.cache
def _own_redis() -> RedisServer:
    server = RedisServer(Path(tempfile.mkdtemp(prefix="mergeshield-test-redis-"))).start()
    atexit.register(server.stop)
    return server


class RedisServer:
    """A redis-server on a spare port that keeps nothing on disk: ``restart()`` (SIGKILL, then
    start) loses every queued and unacked message, as the fault tests need."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        redis_server = shutil.which("redis-server") or "redis-server"
        self.proc = subprocess.Popen(
            [redis_server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=open(self.folder / "redis.log", "ab"),  # noqa: SIM115 - lives with the process
            stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_timeout=2)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        """A crash and a restart: everything Redis held is gone."""
        self.stop()
        self.start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    def __init__(self, root: Path, backend: str, *, redis_db: int = 9,
                 env: dict[str, str] | None = None, redis_url: str | None = None,
                 pg_port: int = 5432) -> None:
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
            self.redis_url = redis_url or worker_redis_url(redis_db)
            redis.Redis.from_url(self.redis_url).flushdb()
            self.env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{pg_port}/{self.dbname}"
            self.env["REDIS_URL"] = self.redis_url

    # --- processes

    def _start(self, name: str, *args: str, env: dict[str, str] | None = None,
               max_file_bytes: int | None = None) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process

        def limits() -> None:  # in the child: writes past the limit fail with EFBIG
            if max_file_bytes is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args], env={**self.env, **(env or {})},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root,
            preexec_fn=limits)

    def serve(self) -> Stack:
        """The README's one command: API + one worker, API keys required."""
        self._start("serve", "serve", "--auth", "--port", str(self.port))
        return self.wait_ready()

    def up(self) -> Stack:
        """The backend as it runs: ``serve`` on the embedded default, else an API and a worker."""
        if self.backend == "sqlite-filesystem":
            return self.serve()
        return self.start_api().start_worker().wait_ready()

    def start_api(self, processes: int = 1) -> Stack:
        self._start("api", "api", "--port", str(self.port), "--processes", str(processes))
        return self

    def start_worker(self, name: str = "worker", env: dict[str, str] | None = None,
                     queues: str = "gpu,cpu", max_file_bytes: int | None = None) -> Stack:
        """A worker; ``max_file_bytes`` caps every file it writes (RLIMIT_FSIZE), like a
        nearly full disk (the log is opened before the limit applies, so keep it short)."""
        self._start(name, "worker", "--queues", queues, "--hostname", f"{name}@%h", env=env,
                    max_file_bytes=max_file_bytes)
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

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if "serve" in self.procs:  # its workers run in sessions of their own: serve stops them
            self.kill("serve", signal.SIGTERM)  # (SIGTERM, then SIGKILL after its stop timeout)
        for name in list(self.procs):  # no warm shutdown: it would wait for a running scan
            self.kill(name, signal.SIGKILL)
        if self.dbname is not None:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')

    def rows(self) -> dict[str, dict[str, Any]]:
        """Every scan in the database, straight from the table: id -> columns."""
        sql = "SELECT * FROM scans"
        if self.dbname is None:
            with closing(sqlite3.connect(self.root / "data" / "mergeshield.db")) as conn:
                conn.row_factory = sqlite3.Row
                return {r["id"]: dict(r) for r in conn.execute(sql)}
        with psycopg.connect(f"{PG_ADMIN.rsplit('/', 1)[0]}/{self.dbname}",
                             row_factory=dict_row) as conn:
            return {r["id"]: r for r in conn.execute(sql)}

    def logs(self, tail: int | None = None) -> str:
        """Every process's output (the last ``tail`` characters of each)."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-(tail or 0):]}"
                         for p in sorted(self.root.glob("*.log")))

    # --- HTTP

    def client(self, key: str | None = ADMIN_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def wait_ready(self, timeout: float = 300) -> Stack:
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

    def wait_up(self, timeout: float = 180) -> Stack:
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
    """Fail with a clear message when the local PostgreSQL is not running or redis-server is not
    installed (each test process starts a Redis of its own, ``worker_redis_url``)."""
    try:
        if shutil.which("redis-server") is None:
            raise FileNotFoundError("redis-server is not installed")
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            pass
    except Exception as exc:  # pragma: no cover - the test command installs and starts both
        raise RuntimeError(f"PostgreSQL/Redis not available ({exc}); run ./scripts/test, which "
                           "sets them up") from exc
