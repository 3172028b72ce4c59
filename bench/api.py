"""The API under load while a worker scans: status polls, submissions and /healthz.

    python -m bench.api [--backend sqlite-filesystem|postgres-redis|both] [--clients 200]
                        [--seconds 15] [--zoo ./zoo]

Run it from the repository root (it imports ``tests.support``). For each backend it starts the
real service as processes (``tests.support.stack.Stack``, API keys on, the service's default
heartbeat, staleness and reconcile intervals): ``serve --auth`` on SQLite + the filesystem broker,
``api`` + one ``worker`` on PostgreSQL + Redis. It uploads the quick zoo's ``vit-mnist-badnets``
and its base as zips and submits three forced scans (inversion on, evaluated on ``mnist5k``), so the
worker is scanning the whole time, then runs N closed-loop clients (asyncio + httpx, one keep-alive
connection each, a non-admin key) for a fixed time against:

* ``GET /healthz``: uvicorn, FastAPI and the service's middleware, no database;
* ``GET /v1/scans/{id}``: status polls of existing scans (key lookup + one row read);
* ``POST /v1/scans``: submissions of hub ids that do not exist (they queue behind the real scans);
* the same GET and POST from one client: the service time without queueing;

and, after each backend's phases while its worker still scans, a bare FastAPI app (one sync route
returning constant JSON, no access log; and the same route as ``async def``) on uvicorn, one
process like the API: the framework's floor on this machine, measured beside each backend so that
the ratio of every 200-client row to it compares numbers taken minutes apart on the same load.

Latencies are client-side and include the load generator's event loop, which shares the CPUs.
"in-app p99" is the bucket bound of the service's own histogram (``/metrics``) over the window.
Writes ``docs/benchmarks/api.md`` and ``docs/benchmarks/api.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from mergeshield.settings import Settings
from mergeshield.zoo import ZooConfig, build_zoo
from tests.service.conftest import zipped
from tests.support.stack import BACKENDS, Stack, ensure_services, free_port

SUSPECT = "vit-mnist-badnets"
REAL_SCANS = 3  # forced, so each runs in full: more than the measuring takes
POLLED_EXTRA = 20  # queued hub-id scans polled beside the real ones
WARMUP = 1.0  # seconds per phase not recorded (connections open)
ONE_CLIENT_SECONDS = 3.0
REDIS_DB = 14  # apart from the tests' 9 and 10
NO_SUCH = {"suspect": {"hub": "bench/none"}, "base": {"hub": "bench/none2"}}
GET_SCAN, POST_SCAN, HEALTHZ = "GET /v1/scans/{id}", "POST /v1/scans", "GET /healthz"
# issue 16's bar: at 200 clients, req/s at least this share of the bare (sync) app's on GET and
# /healthz; from one client, p99 under these
MIN_RATIO = 0.8
ONE_CLIENT_P99_MS = {GET_SCAN: 10.0, POST_SCAN: 25.0}
BARE, BARE_ASYNC = "bare FastAPI", "bare FastAPI (async route)"
# the bench's key queues thousands of scans; the quota's count still runs on every submission
QUOTA = 1_000_000
ROUTES = {GET_SCAN: ("GET", "/v1/scans/{scan_id}"), POST_SCAN: ("POST", "/v1/scans"),
          HEALTHZ: ("GET", "/healthz")}
TICK = os.sysconf("SC_CLK_TCK")
DB_PROCESSES = ("postgres", "redis-server")
ROLES = ("api", "worker", "load", "db", "other")


def baseline_app() -> FastAPI:
    """The framework floor (``uvicorn --factory bench.api:baseline_app``)."""
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:  # sync: runs in the thread pool (the reference of issue 16)
        return {"status": "ok"}

    return app


def baseline_async_app() -> FastAPI:
    """The same route in the event loop (``--factory bench.api:baseline_async_app``)."""
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


@dataclass
class Result:
    target: str
    name: str
    clients: int
    seconds: float
    latencies: list[float]
    errors: Counter[str]
    cores: dict[str, float]
    busy: str  # a real scan running at the phase's start / end
    load: float  # the 1-minute load average at the phase's end
    in_app_p99: str = "-"
    ratio: float | None = None  # req/s over the bare (sync) app's, same backend, same clients
    beside: str | None = None  # a bare app's row: the backend whose worker was scanning

    def pct(self, p: float) -> float:
        s = sorted(self.latencies)
        return s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))] * 1000 if s else math.nan

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    def row(self) -> str:
        errs = sum(self.errors.values())
        err = f"{errs} ({', '.join(f'{k}×{v}' for k, v in self.errors.most_common())})" \
            if errs else "0"
        cpu = " / ".join(f"{self.cores.get(k, 0):.2f}" for k in ROLES)
        ratio = "-" if self.ratio is None else f"{self.ratio:.2f}×"
        return (f"| {self.target} | {self.name} | {self.clients} | {self.rps:.0f} | {ratio} | "
                f"{self.pct(.5):.1f} | {self.pct(.9):.1f} | {self.pct(.99):.1f} | "
                f"{self.pct(1):.1f} | {err} | {self.in_app_p99} | {self.busy} | {cpu} | "
                f"{self.load:.1f} |")

    def record(self) -> dict[str, Any]:
        """The row for api.json."""
        return {"backend": self.target, "beside": self.beside, "endpoint": self.name,
                "clients": self.clients,
                "rps": round(self.rps, 1), "ratio_to_bare": self.ratio,
                **{f"p{q}_ms": round(self.pct(q / 100), 2) for q in (50, 90, 99)},
                "max_ms": round(self.pct(1), 2), "requests": len(self.latencies),
                "errors": dict(self.errors), "in_app_p99": self.in_app_p99,
                "scan_running": self.busy, "cores": {k: round(v, 3) for k, v in
                                                     self.cores.items()},
                "load_1min": self.load}


# -- load ------------------------------------------------------------------------------------------
async def _client(url: str, headers: dict[str, str], method: str, paths: list[str],
                  body: Any, expect: int, start: float, end: float, tls: ssl.SSLContext,
                  out: list[float], errors: Counter[str]) -> None:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, verify=tls,
                                 limits=httpx.Limits(max_connections=1)) as c:
        i = 0
        while (t0 := time.perf_counter()) < end:
            try:
                r = await c.request(method, paths[i % len(paths)], json=body)
                code = "" if r.status_code == expect else str(r.status_code)
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            i += 1
            if t0 >= start:
                out.append(time.perf_counter() - t0)
                if code:
                    errors[code] += 1


async def _load(url: str, headers: dict[str, str], method: str, paths: list[str], body: Any,
                expect: int, clients: int, seconds: float) -> tuple[list[float], Counter[str]]:
    tls = ssl.create_default_context()  # one context for all clients (each would load CAs)
    start = time.perf_counter() + WARMUP
    out: list[float] = []
    errors: Counter[str] = Counter()
    await asyncio.gather(*(
        _client(url, headers, method, paths[k % len(paths):] + paths[:k % len(paths)], body,
                expect, start, start + seconds, tls, out, errors) for k in range(clients)))
    return out, errors


# -- what the machine did meanwhile ----------------------------------------------------------------
def _proc_ticks() -> dict[int, tuple[int, int, str, int]]:
    """pid -> (session id, user + system ticks, command name, parent pid) for every process."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, _, tail = stat.read_text().rpartition(")")
            fields = tail.split()
            out[int(stat.parent.name)] = (int(fields[3]), int(fields[11]) + int(fields[12]),
                                          head.partition("(")[2], int(fields[1]))
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
    return out


def _busy_ticks() -> int:
    cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait


def _cores(before: tuple[dict[int, tuple[int, int, str, int]], int], wall: float,
           api_pid: int, sessions: set[int]) -> dict[str, float]:
    """Cores used per role: the API process, the worker (the rest of the service's sessions,
    and the sessions of its children: `serve` starts its workers in sessions of their own),
    this load generator, PostgreSQL + Redis, and everything else."""
    (procs0, busy0), procs1 = before, _proc_ticks()
    service = sessions | {sid for sid, _t, _c, ppid in procs1.values() if ppid in sessions}
    used: Counter[str] = Counter()
    for pid, (sid, ticks, comm, ppid) in procs1.items():
        role = ("api" if pid == api_pid else "load" if pid == os.getpid()
                else "worker" if sid in service else "db" if comm in DB_PROCESSES else None)
        if role:
            used[role] += ticks - procs0.get(pid, (sid, 0, comm, ppid))[1]
    used["other"] = max(0, _busy_ticks() - busy0 - sum(used.values()))
    return {k: v / TICK / wall for k, v in used.items()}


def _histogram(url: str) -> dict[tuple[str, str], dict[float, float]]:
    """The service's latency histogram: (method, route) -> bucket bound -> count."""
    out: dict[tuple[str, str], dict[float, float]] = {}
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "mergeshield_http_request_seconds_bucket":
                le = out.setdefault((s.labels["method"], s.labels["route"]), {})
                le[float(s.labels["le"])] = le.get(float(s.labels["le"]), 0) + s.value
    return out


def _in_app_p99(before: dict[float, float], after: dict[float, float]) -> str:
    delta = {le: n - before.get(le, 0) for le, n in after.items()}
    total = delta.get(math.inf, 0)
    for le in sorted(delta):
        if total and delta[le] >= 0.99 * total:
            return f"≤ {le * 1000:.0f} ms" if le != math.inf else "> 5 s"
    return "-"


# -- one backend -----------------------------------------------------------------------------------
@dataclass
class Phase:
    name: str
    method: str
    paths: list[str]
    body: Any
    expect: int
    clients: int
    seconds: float
    headers: dict[str, str] = field(default_factory=dict)


def _measure(target: str, url: str, phase: Phase, api_pid: int, sessions: set[int],
             running: Callable[[], bool], metrics: bool) -> Result:
    hist0 = _histogram(url) if metrics else {}
    at_start = running()
    before = (_proc_ticks(), _busy_ticks())
    t0 = time.perf_counter()
    lat, errors = asyncio.run(_load(url, phase.headers, phase.method, phase.paths, phase.body,
                                    phase.expect, phase.clients, phase.seconds))
    cores = _cores(before, time.perf_counter() - t0, api_pid, sessions)
    busy = f"{'yes' if at_start else 'NO'} / {'yes' if running() else 'NO'}"
    result = Result(target, phase.name, phase.clients, phase.seconds, lat, errors, cores, busy,
                    os.getloadavg()[0])
    if metrics:
        key = ROUTES[phase.name]
        result.in_app_p99 = _in_app_p99(hist0.get(key, {}), _histogram(url).get(key, {}))
    print(result.row(), flush=True)
    return result


def bench_backend(stack: Stack, args: argparse.Namespace, manifest: dict[str, Any],
                  notes: list[str]) -> list[Result]:
    base = next(m["base"] for m in manifest["models"] if m["name"] == SUSPECT)
    with stack.client() as admin:
        key = admin.post("/v1/keys", json={"name": "bench"}).json()["key"]
    user = stack.client(key)
    ids = {}
    for name in (SUSPECT, base):
        r = user.post("/v1/uploads", files={"file": (f"{name}.zip",
                                                     zipped(args.zoo / "models" / name))})
        r.raise_for_status()
        ids[name] = r.json()["id"]
    real_body = {"suspect": {"upload": ids[SUSPECT]}, "base": {"upload": ids[base]},
                 "evaluation": "mnist5k", "options": {"inversion": True}, "force": True}
    real = [user.post("/v1/scans", json=real_body).json()["id"] for _ in range(REAL_SCANS)]
    first = stack.wait_for(user, real[0], ("running", "succeeded", "failed", "cancelled"), 180)
    if first["state"] != "running":
        raise RuntimeError(f"the real scan did not run: {first}\n{stack.logs(4000)}")
    print(f"{stack.backend}: a real scan is running", flush=True)
    polled = real + [user.post("/v1/scans", json=NO_SUCH).json()["id"]
                     for _ in range(POLLED_EXTRA)]

    def running() -> bool:
        return any(user.get(f"/v1/scans/{i}").json()["state"] == "running" for i in real)

    auth = {"Authorization": f"Bearer {key}"}
    n, secs = args.clients, args.seconds
    phases = [Phase(HEALTHZ, "GET", ["/healthz"], None, 200, n, secs),
              Phase(GET_SCAN, "GET", [f"/v1/scans/{i}" for i in polled], None, 200, n, secs),
              Phase(POST_SCAN, "POST", ["/v1/scans"], NO_SUCH, 202, n, secs),
              Phase(GET_SCAN, "GET", [f"/v1/scans/{real[0]}"], None, 200, 1, ONE_CLIENT_SECONDS),
              Phase(POST_SCAN, "POST", ["/v1/scans"], NO_SUCH, 202, 1, ONE_CLIENT_SECONDS)]
    api_name = "serve" if "serve" in stack.procs else "api"
    sessions = {p.pid for p in stack.procs.values()}
    results = []
    for phase in phases:
        phase.headers = auth
        results.append(_measure(stack.backend, stack.url, phase, stack.procs[api_name].pid,
                                sessions, running, metrics=True))
    bare = _baseline(Path(stack.root), n, secs, sessions, running)
    for r in bare:
        r.beside = stack.backend
    floor = _find(bare, BARE, HEALTHZ, n)
    for r in results:
        if r.clients == n and floor is not None and floor.rps:
            r.ratio = r.rps / floor.rps
    results += bare
    states = [user.get(f"/v1/scans/{i}").json() for i in real]
    totals = {fam.name: {s.labels["state"]: int(s.value) for s in fam.samples
                         if s.labels.get("kind") == "scan"}
              for fam in text_string_to_metric_families(httpx.get(f"{stack.url}/metrics").text)
              if fam.name == "mergeshield_scans"}.get("mergeshield_scans", {})
    notes.append(f"**{stack.backend}**: real scans at the end: "
                 + ", ".join(f"{s['state']}" + (f" ({s['stage']}, {s['percent']:.0f} %)"
                                                 if s["state"] == "running" else "")
                             for s in states)
                 + "; all scans by state: " + ", ".join(f"{k} {v}" for k, v in totals.items()
                                                         if v) + ".")
    user.close()
    return results


def _baseline(root: Path, clients: int, seconds: float, sessions: set[int],
              running: Callable[[], bool]) -> list[Result]:
    """The bare app (sync route) at ``clients`` and from one client, then the async one."""
    results = []
    for target, factory, runs in (
            (BARE, "baseline_app", ((clients, seconds), (1, ONE_CLIENT_SECONDS))),
            (BARE_ASYNC, "baseline_async_app", ((clients, seconds),))):
        port = free_port()
        log = open(root / "baseline.log", "ab")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", f"bench.api:{factory}", "--host",
             "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"],
            cwd=Path(__file__).resolve().parents[1], stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            results += [_measure(target, url, Phase(HEALTHZ, "GET", ["/healthz"], None, 200, n,
                                                    s), proc.pid, sessions, running, False)
                        for n, s in runs]
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.close()
    return results


# -- report ----------------------------------------------------------------------------------------
def _find(results: list[Result], target: str, name: str, clients: int) -> Result | None:
    return next((r for r in results if (r.target, r.name, r.clients) == (target, name, clients)),
                None)


def reading(results: list[Result], clients: int) -> str:
    """The paragraph against issue 16's bar, from the numbers."""
    out = [f"Bar (issue 16): at {clients} clients while a worker scans, at least "
           f"{MIN_RATIO:g}× the bare FastAPI app's req/s on `{GET_SCAN}` and `{HEALTHZ}`; from "
           f"one client, p99 ≤ {ONE_CLIENT_P99_MS[GET_SCAN]:g} ms for `{GET_SCAN}` and ≤ "
           f"{ONE_CLIENT_P99_MS[POST_SCAN]:g} ms for `{POST_SCAN}`. Each backend's ratios are to "
           "the bare app measured right after its own phases (same worker scanning, minutes "
           "apart), so they are the numbers to compare; absolute req/s move with the machine's "
           "load (last column)."]
    targets = dict.fromkeys(r.target for r in results if r.ratio is not None)
    for target in targets:
        parts = []
        for name in (HEALTHZ, GET_SCAN, POST_SCAN):
            r = _find(results, target, name, clients)
            if r is None or r.ratio is None:
                continue
            bar = "" if name == POST_SCAN else \
                (" (met)" if r.ratio >= MIN_RATIO else f" (missed by {MIN_RATIO - r.ratio:.2f})")
            parts.append(f"`{name}` {r.rps:.0f} req/s, {r.ratio:.2f}× bare{bar}")
        for name, aim in ONE_CLIENT_P99_MS.items():
            one = _find(results, target, name, 1)
            if one is not None and one.latencies:
                p99 = one.pct(.99)
                parts.append(f"one client `{name}` p99 {p99:.1f} ms "
                             + ("(met)" if p99 <= aim else f"(missed by {p99 - aim:.1f} ms)"))
        get = _find(results, target, GET_SCAN, clients)
        if get is not None and get.latencies:
            parts.append(f"{clients} closed-loop clients at {get.rps:.0f} req/s wait "
                         f"{clients / get.rps * 1000:.0f} ms each by Little's law (measured mean "
                         f"{sum(get.latencies) / len(get.latencies) * 1000:.0f} ms): queueing, "
                         f"with the API process on {get.cores.get('api', 0):.2f} cores beside "
                         f"the worker's {get.cores.get('worker', 0):.2f}, the load generator's "
                         f"{get.cores.get('load', 0):.2f}, the databases' "
                         f"{get.cores.get('db', 0):.2f} and other jobs' "
                         f"{get.cores.get('other', 0):.2f} (of {os.cpu_count()})")
        floor = next((r for r in results if r.target == BARE and r.beside == target
                      and r.clients == clients), None)
        alone = next((r for r in results if r.target == BARE and r.beside == target
                      and r.clients == 1), None)
        if floor is not None and alone is not None:
            parts.append(f"the bare app served {floor.rps:.0f} req/s (p99 {floor.pct(.99):.0f} "
                         f"ms) and, from one client, p99 {alone.pct(.99):.1f} ms: the floor "
                         "under the one-client bar at this load")
        out.append(f"**{target}**: " + "; ".join(parts) + ".")
    return " ".join(out)


def write(results: list[Result], notes: list[str], args: argparse.Namespace,
          command: str) -> str:
    import torch

    header = ("| backend | endpoint | clients | req/s | × bare | p50 ms | p90 ms | p99 ms | max ms "
              f"| errors | in-app p99 | scan running start / end | cores {' / '.join(ROLES)} "
              "| load |")
    lines = [
        "# The API under load while a worker scans",
        "",
        f"Written by `bench/api.py` on {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}: "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), Python "
        f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads). Command: `{command}`. Backends: {', '.join(args.backends)}; "
        f"{args.clients} clients for {args.seconds:g} s per phase (+{WARMUP:g} s warm-up not "
        f"recorded), one client for {ONE_CLIENT_SECONDS:g} s.",
        "",
        "Each backend is the real service as processes, API keys on: `serve --auth` (SQLite, "
        "filesystem broker, one embedded worker) and `api` + one `worker` (PostgreSQL, Redis). "
        f"The worker runs {REAL_SCANS} forced scans of the quick zoo's `{SUSPECT}` against its "
        "base (uploaded zips, inversion on, `mnist5k`) throughout. Clients are asyncio + httpx in "
        "this process, one keep-alive connection each, with a non-admin key (so every request "
        "looks the key up). Status polls cycle over the real scans and "
        f"{POLLED_EXTRA} queued ones; submissions name hub ids that do not exist and queue behind "
        "the real scans. Errors are responses other than 200 / 202, or transport errors. "
        "*in-app p99* is the bucket bound of the service's own latency histogram over the window "
        "(from the middleware's start to the response; buckets 2, 5, 10, 25, 50, 100, 250 ms, "
        "1 s, 5 s). *cores* are CPU seconds per wall second: the API process, the worker "
        "(everything else the service started), this load generator, the PostgreSQL and Redis "
        "servers, and the rest of the machine (other people's jobs: a large *other* means the "
        "machine was shared and the timings are disturbed). *bare FastAPI* is one sync route "
        "returning constant JSON on uvicorn, one process, no access log, run after each "
        "backend's phases while its worker still scans (*async route*: the same as `async def`); "
        f"*× bare* is a {args.clients}-client row's req/s over that backend's bare (sync) row. "
        "*load* is the 1-minute load average at the phase's end (2 cores: above 2, processes "
        f"queue for a CPU). The bench's key may queue {QUOTA} scans (the quota is still "
        "counted on every submission).",
        "",
        header,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(r.row() for r in results),
        "",
        *notes,
        "",
        reading(results, args.clients),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "written": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
         "cpus": os.cpu_count(), "clients": args.clients, "seconds": args.seconds,
         "rows": [r.record() for r in results]}, indent=1) + "\n")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--backend", choices=[*BACKENDS, "both"], default="both")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--zoo", type=Path, default=Path("zoo"))
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/api.md"))
    ap.add_argument("--api-processes", type=int, default=[1], nargs="+",
                    help="postgres-redis: measure with each of these API process counts")
    args = ap.parse_args()
    args.backends = list(BACKENDS) if args.backend == "both" else [args.backend]
    if not (args.zoo / "manifest.json").is_file():
        build_zoo(args.zoo, ZooConfig.for_speed(quick=True))
    manifest = json.loads((args.zoo / "manifest.json").read_text())
    if "postgres-redis" in args.backends:
        ensure_services()
    defaults = Settings.model_fields  # the service's own intervals, not the tests' fast ones
    env = {f"MERGESHIELD_{k.upper()}": str(defaults[k].default)
           for k in ("heartbeat_interval", "stale_after", "reconcile_interval")}
    env["HF_HUB_OFFLINE"] = "1"  # the bench's hub ids fail at once, without a network
    env["MERGESHIELD_KEY_MAX_ACTIVE_SCANS"] = str(QUOTA)
    results: list[Result] = []
    notes: list[str] = []
    runs = [(b, n) for b in args.backends
            for n in (args.api_processes if b == "postgres-redis" else [1])]
    for backend, processes in runs:
        with tempfile.TemporaryDirectory(prefix=f"msbench-api-{backend}-") as tmp:
            stack = Stack(Path(tmp), backend, redis_db=REDIS_DB, env=env)
            try:
                t0 = time.perf_counter()
                if backend == "sqlite-filesystem":
                    stack.serve()
                else:
                    stack.start_api(processes).start_worker().wait_ready()
                if processes > 1:  # a label for the table: `api --processes N`
                    stack.backend = f"{backend} (api ×{processes})"
                print(f"{backend}: ready in {time.perf_counter() - t0:.0f} s", flush=True)
                results += bench_backend(stack, args, manifest, notes)
            except Exception:
                print(stack.logs(3000), file=sys.stderr)
                raise
            finally:
                stack.close()
    command = "python -m bench.api " + " ".join(sys.argv[1:])
    print(write(results, notes, args, command.strip()))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
