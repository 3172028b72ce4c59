"""``mergeshield serve`` stops as a whole: SIGTERM or SIGINT leaves no worker behind, and
neither does a serve killed outright (SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.stack import free_port


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Linux /proc), found while they all still run."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                if kid not in found:
                    found.add(kid)
                    todo.append(kid)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stopped_serve_leaves_no_worker(sig: signal.Signals, tmp_path: Path) -> None:
    # (SIGINT takes SIGTERM's path: uvicorn raises it again as KeyboardInterrupt); SIGKILL
    # cannot be caught: the workers learn of it from the kernel (PR_SET_PDEATHSIG)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env |= {"MERGESHIELD_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1",
            "MERGESHIELD_HEARTBEAT_INTERVAL": "1", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    serve = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                             env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=tmp_path)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while True:  # the API answers and its worker has announced itself
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and serve.poll() is None, \
                (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        children = descendants(serve.pid)
        assert children, "serve started no worker"
        serve.send_signal(sig)
        assert serve.wait(timeout=60) == (0 if sig == signal.SIGTERM else -sig)
        deadline = time.monotonic() + 20
        while (left := {p for p in children if alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"left running after {sig!r}: {left}\n" + \
            (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        for pid in [serve.pid, *descendants(serve.pid), *children]:  # none left by a failure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        serve.wait()
        log.close()
