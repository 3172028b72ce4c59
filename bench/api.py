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

and, once, a bare FastAPI app (one sync route returning constant JSON, no access log) on uvicorn,
one process like the API, while the worker scans: the framework's floor on this machine.

Latencies are client-side and include the load generator's event loop, which shares the CPUs.
"in-app p99" is the bucket bound of the service's own histogram (``/metrics``) over the window.
Writes ``docs/benchmarks/api.md``.
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
AIMS_MS = {GET_SCAN: 25.0, POST_SCAN: 50.0}
ROUTES = {GET_SCAN: ("GET", "/v1/scans/{scan_id}"), POST_SCAN: ("POST", "/v1/scans"),
          HEALTHZ: ("GET", "/healthz")}
TICK = os.sysconf("SC_CLK_TCK")
DB_PROCESSES = ("postgres", "redis-server")
ROLES = ("api", "worker", "load", "db", "other")


def baseline_app() -> FastAPI:
    """The framework floor (``uvicorn --factory bench.api:baseline_app``)."""
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:  # sync, like the service's routes: runs in the threadpool
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
    in_app_p99: str = "-"

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
        return (f"| {self.target} | {self.name} | {self.clients} | {self.rps:.0f} | "
                f"{self.pct(.5):.1f} | {self.pct(.9):.1f} | {self.pct(.99):.1f} | "
                f"{self.pct(1):.1f} | {err} | {self.in_app_p99} | {self.busy} | {cpu} |")


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
def _proc_ticks() -> dict[int, tuple[int, int, str]]:
    """pid -> (session id, user + system ticks, command name) for every process."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, _, tail = stat.read_text().rpartition(")")
            fields = tail.split()
            out[int(stat.parent.name)] = (int(fields[3]), int(fields[11]) + int(fields[12]),
                                          head.partition("(")[2])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
    return out


def _busy_ticks() -> int:
    cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait


def _cores(before: tuple[dict[int, tuple[int, int, str]], int], wall: float, api_pid: int,
           sessions: set[int]) -> dict[str, float]:
    """Cores used per role: the API process, the worker (the rest of the service's sessions),
    this load generator, PostgreSQL + Redis, and everything else."""
    (procs0, busy0), procs1 = before, _proc_ticks()
    used: Counter[str] = Counter()
    for pid, (sid, ticks, comm) in procs1.items():
        role = ("api" if pid == api_pid else "load" if pid == os.getpid()
                else "worker" if sid in sessions else "db" if comm in DB_PROCESSES else None)
        if role:
            used[role] += ticks - procs0.get(pid, (sid, 0, comm))[1]
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
    result = Result(target, phase.name, phase.clients, phase.seconds, lat, errors, cores, busy)
    if metrics:
        key = ROUTES[phase.name]
        result.in_app_p99 = _in_app_p99(hist0.get(key, {}), _histogram(url).get(key, {}))
    print(result.row(), flush=True)
    return result


def bench_backend(stack: Stack, args: argparse.Namespace, manifest: dict[str, Any],
                  with_baseline: bool, notes: list[str]) -> list[Result]:
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
    if with_baseline:
        results += _baseline(Path(stack.root), n, secs, sessions, running)
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
    port = free_port()
    log = open(root / "baseline.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "bench.api:baseline_app", "--host",
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
        return [_measure("bare FastAPI", url, Phase(HEALTHZ, "GET", ["/healthz"], None, 200, n,
                                                    s), proc.pid, sessions, running, False)
                for n, s in ((clients, seconds), (1, ONE_CLIENT_SECONDS))]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


# -- report ----------------------------------------------------------------------------------------
def _find(results: list[Result], target: str, name: str, clients: int) -> Result | None:
    return next((r for r in results if (r.target, r.name, r.clients) == (target, name, clients)),
                None)


def reading(results: list[Result], clients: int) -> str:
    """The paragraph against the aims, from the numbers."""
    out = [f"Aims: p99 of `{GET_SCAN}` under 25 ms and of `{POST_SCAN}` under 50 ms while a "
           f"worker is busy, here with {clients} concurrent clients."]
    floor = _find(results, "bare FastAPI", HEALTHZ, clients)
    for target in dict.fromkeys(r.target for r in results if r.target != "bare FastAPI"):
        verdicts = []
        for name, aim in AIMS_MS.items():
            r, one = _find(results, target, name, clients), _find(results, target, name, 1)
            if r is None or one is None:
                continue
            p99 = r.pct(.99)
            verdicts.append(
                f"`{name}` p99 {p99:.0f} ms "
                + ("(met)" if p99 < aim else f"(missed by {p99 - aim:.0f} ms, {p99 / aim:.1f}×)")
                + f" at {r.rps:.0f} req/s; from one client {one.pct(.99):.1f} ms "
                + ("(met)" if one.pct(.99) < aim else "(missed)"))
        get = _find(results, target, GET_SCAN, clients)
        little = f"; with {clients} closed-loop clients Little's law puts the mean wait at " \
                 f"{clients / get.rps * 1000:.0f} ms for `{GET_SCAN}` (measured mean " \
                 f"{sum(get.latencies) / len(get.latencies) * 1000:.0f} ms), and the API " \
                 f"process used {get.cores.get('api', 0):.2f} cores beside the worker's " \
                 f"{get.cores.get('worker', 0):.2f}, the load generator's " \
                 f"{get.cores.get('load', 0):.2f}, the databases' {get.cores.get('db', 0):.2f} " \
                 f"and other jobs' {get.cores.get('other', 0):.2f} (of {os.cpu_count()})" \
            if get and get.latencies else ""
        out.append(f"**{target}**: " + "; ".join(verdicts) + little + ".")
    if floor is not None:
        need = clients / (min(AIMS_MS.values()) / 1000)
        own = [r for r in results if r.name == HEALTHZ and r.clients == clients and r is not floor]
        out.append(f"The bare FastAPI app, the floor of one uvicorn process on this machine, "
                   f"served {floor.rps:.0f} req/s with p99 {floor.pct(.99):.0f} ms at the same "
                   f"concurrency (the service's own `/healthz`, with its timing middleware and "
                   f"no access log: {', '.join(f'{r.rps:.0f}' for r in own)} req/s); "
                   f"{clients} closed-loop clients at 25 ms need about {need:.0f} req/s, "
                   f"{need / floor.rps:.1f}× that floor.")
    ones = [r for r in results if r.name == GET_SCAN and r.clients == 1]
    if ones and all(r.pct(.5) < AIMS_MS[GET_SCAN] for r in ones):
        out.append("One client at a time the routes are fast, so at this concurrency the latency "
                   "is queueing in one Python process, not the database.")
    out.append("`serve` and `api` run one uvicorn process by default, whose sync routes share "
               "one GIL and a 40-thread pool on cores that the CPU-bound scan and the load "
               "generator also want. `api --processes 2` (rows marked api ×2; its processes are "
               "counted in the worker column) adds throughput only where a core is free: on 2 "
               "cores beside a busy worker it mostly takes time from the scan. The aim at 200 "
               "clients needs more cores for the API (more `api` processes on other machines "
               "behind a balancer: the scale-out shape), not a faster route.")
    return " ".join(out)


def write(results: list[Result], notes: list[str], args: argparse.Namespace,
          command: str) -> str:
    import torch

    header = ("| backend | endpoint | clients | req/s | p50 ms | p90 ms | p99 ms | max ms | errors "
              f"| in-app p99 | scan running start / end | cores {' / '.join(ROLES)} |")
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
        "returning constant JSON on uvicorn, one process, no access log, run while the worker "
        "scans.",
        "",
        header,
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(r.row() for r in results),
        "",
        *notes,
        "",
        reading(results, args.clients),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
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
    results: list[Result] = []
    notes: list[str] = []
    runs = [(b, n) for b in args.backends
            for n in (args.api_processes if b == "postgres-redis" else [1])]
    for i, (backend, processes) in enumerate(runs):
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
                results += bench_backend(stack, args, manifest, i == 0, notes)
            except Exception:
                print(stack.logs(3000), file=sys.stderr)
                raise
            finally:
                stack.close()
    command = "python -m bench.api " + " ".join(sys.argv[1:])
    print(write(results, notes, args, command.strip()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
