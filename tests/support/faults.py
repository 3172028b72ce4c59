"""What the fault tests and the soak run break, and how they check that nothing was lost.

- ``TcpProxy``: a loopback TCP forwarder in front of PostgreSQL; ``block()`` drops every
  connection and refuses new ones (the database is down), ``unblock()`` serves again.
- ``RedisServer`` (in ``stack``, where every test process gets one): a redis-server of our
  own on a spare port that keeps nothing on disk, so ``restart()`` loses every queued message.
- ``audit(stack, submitted)``: the check, against the scans table and the result folders: every
  submitted scan is there once and finished (succeeded, or failed with a code), nothing else is
  there, and every succeeded scan's report loads and its cleaned checkpoint is complete (the
  sha256 and size the report records, a safetensors file that loads, no temporary beside it).
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from safetensors.torch import load_file

from mergeshield.report import load_report
from tests.support.stack import Stack, free_port

FINISHED = ("succeeded", "failed", "cancelled")


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``; see the module docstring."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._open = threading.Event()

    def start(self) -> TcpProxy:
        self.unblock()
        return self

    def unblock(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: same port
        listener.settimeout(0.1)
        self._open.set()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def block(self) -> None:
        """Refuse new connections and cut the open ones (clients see the server go away)."""
        self._open.clear()
        time.sleep(0.3)  # the accept loop closes its listener
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            _close(conn)

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while self._open.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    _close(client)
                    continue
                upstream.settimeout(None)
                client.settimeout(None)
                with self._lock:
                    self._conns |= {client, upstream}
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _close(src)
        _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# --- submitting and waiting, through API restarts


def submit(client: httpx.Client, body: dict[str, Any], key: str, timeout: float = 900) -> str:
    """POST a scan, again with the same ``Idempotency-Key`` while the API is away (restarting,
    or 503 while its database is): one scan however many tries."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = client.post("/v1/scans", json=body, headers={"Idempotency-Key": key})
            if r.status_code == 202:
                return str(r.json()["id"])
            assert r.status_code == 503, r.text  # anything else is a bug, not a fault
            last = r.text
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"could not submit after {timeout} s: {last}")


def wait_finished(stack: Stack, ids: Iterable[str], timeout: float = 1200) -> dict[str, Any]:
    """Until every scan in ``ids`` is finished in the database (the API may be down)."""
    wanted = set(ids)
    deadline = time.monotonic() + timeout
    while True:
        rows = stack.rows()
        left = {i for i in wanted if rows.get(i, {}).get("state") not in FINISHED}
        if not left:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(left)} scans unfinished after {timeout} s: "
                                 f"{[rows.get(i, {}).get('state') for i in left]}\n"
                                 f"{stack.logs(3000)}")
        time.sleep(0.5)


# --- the check


@dataclass
class Audit:
    submitted: int
    outcomes: Counter[str] = field(default_factory=Counter)  # "succeeded", "failed: <code>"
    attempts: Counter[int] = field(default_factory=Counter)  # tries per scan -> scans
    lost: list[str] = field(default_factory=list)  # submitted but absent or unfinished
    duplicated: list[str] = field(default_factory=list)  # in the database, never submitted
    broken: list[str] = field(default_factory=list)  # "<id>: what is wrong"

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.broken)

    def __str__(self) -> str:
        return (f"{self.submitted} submitted, {dict(self.outcomes)}; lost {self.lost}, "
                f"duplicated {self.duplicated}, broken {self.broken}")


def audit(stack: Stack, submitted: Collection[str], failures: Collection[str] = ()) -> Audit:
    """Check ``submitted`` (every scan ever sent to ``stack``) against the database and the
    artifacts; a failed scan must carry one of the codes in ``failures``."""
    rows = stack.rows()
    result = Audit(len(submitted))
    result.duplicated = sorted(set(rows) - set(submitted))
    for scan_id in submitted:
        row = rows.get(scan_id)
        if row is None or row["state"] not in ("succeeded", "failed"):
            result.lost.append(f"{scan_id}: {row['state'] if row else 'missing'}")
            continue
        result.attempts[row["attempts"]] += 1
        if row["state"] == "failed":
            result.outcomes[f"failed: {row['error_code']}"] += 1
            if row["error_code"] not in failures:
                result.broken.append(f"{scan_id}: failed with {row['error_code']!r} "
                                     f"({row['error_message']})")
            continue
        result.outcomes["succeeded"] += 1
        result.broken += [f"{scan_id}: {p}" for p in artifact_problems(stack, row)]
    return result


def artifact_problems(stack: Stack, row: dict[str, Any]) -> list[str]:
    """What is wrong with a succeeded scan's result folder (nothing, usually)."""
    folder = stack.root / "data" / row["result_dir"]
    try:
        report = load_report(folder / "report.json")
    except Exception as exc:
        return [f"report.json does not load: {exc}"]
    problems = [f"temporary file {p.name} in the result folder" for p in folder.iterdir()
                if p.name.endswith((".tmp", ".part")) or p.name.startswith(".")]
    if report.scan_id != (row["cached_from"] or row["id"]):
        problems.append(f"report.json is scan {report.scan_id}'s")
    if report.output is None:
        return problems + ["no cleaned checkpoint recorded"]
    for f in report.output.files:
        path = folder / f.path
        if not path.is_file():
            problems.append(f"{f.path} missing")
        elif (path.stat().st_size, _sha256(path)) != (f.size, f.sha256):
            problems.append(f"{f.path} is not the file the report records")
        elif path.suffix == ".safetensors":
            try:
                load_file(path)
            except Exception as exc:
                problems.append(f"{f.path} does not load: {exc}")
    return problems


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
