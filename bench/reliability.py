"""Reliability figures: hostile inputs, fuzzing and API fuzzing, measured and written to
``docs/reliability.md``.

    python -m bench.reliability [--fuzz-examples 2000] [--api-examples 100] [--soak 500]
                                [--zoo PATH] [--out PATH] [--only TITLE ...]

Run it from the repository root (it imports ``tests.support``). Sections, in order:

* hostile inputs through the library: every case of ``tests/support/hostile.py`` unpacked if an
  archive, then ``pipeline.scan`` (resolve, validation, conversion, every tensor read);
* hostile inputs, round 2, through the library and the CLI: every case of
  ``tests/support/hostile2.py`` (links out, special files, allocation bombs, tensor types,
  configs, remote code, outputs) under a deadline with a canary token in the environment;
* hostile inputs through the service: both corpora's cases uploaded to real processes
  (``serve --auth`` on SQLite + the filesystem broker; API + worker on PostgreSQL + Redis when
  they are running) and scanned when accepted, with a canary token in their environment
  (``tests/support/hostile_service.py``); then leaks, tracebacks, stray files, and whether the
  API and the worker are alive and a clean scan still succeeds;
* request tricks (``tests/support/hostile_requests.py``) sent as they are to both APIs;
* property-based fuzzing of the safetensors header validation (``tests/support/fuzz.py``);
* schemathesis against the same running APIs (``tests/support/api_fuzz.py``);
* fault injection: ``tests/service/test_faults.py`` run by pytest, outcomes from its junit XML;
* soak: ``--soak`` scans through API + 2 workers on PostgreSQL + Redis with random faults,
  then the nothing-lost audit (``bench/faults.py``). Both use the quick zoo at ``--zoo``
  (default ``$MERGESHIELD_TEST_ZOO``), or build one.

A section is a function ``(Context) -> str`` in ``SECTIONS``; add one to add a section.
``--only`` runs some sections and keeps the others' text from the page, and the page says so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import faults
from tests.support import hostile, hostile2
from tests.support.api_fuzz import KNOWN_5XX, fuzz
from tests.support.fuzz import PROPERTIES
from tests.support.hostile_requests import error_code, request_cases, send
from tests.support.hostile_service import (
    CANARY_ENV,
    NOT_SENT,
    alive,
    hostile_stack,
    leaks,
    round1,
    round2,
    run_cases,
    strays,
    tracebacks,
)
from tests.support.hub import LoopbackHub
from tests.support.stack import ADMIN_KEY, Stack, ensure_services

REDIS_DB = 8  # apart from the tests' (9-15) and bench/api.py's 14: it may run beside them


@dataclass
class Context:
    work: Path
    fuzz_examples: int
    api_examples: int
    soak: int = 500
    fault_every: float = 20.0
    zoo: Path | None = None
    stack: Stack | None = None
    client: httpx.Client | None = None
    pg: Stack | None = None  # API + worker on PostgreSQL + Redis, when they are running
    hub: LoopbackHub | None = None  # the stacks' (empty) hub
    timings: dict[str, float] = field(default_factory=dict)


Section = Callable[[Context], str]


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _codes(counter: Counter[str]) -> str:
    return ", ".join(f"`{c}` {n}" for c, n in counter.most_common())


def library(ctx: Context) -> str:
    cases = hostile.corpus()
    base = hostile.save_base(ctx.work / "lib-base")
    tried: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    codes: dict[str, Counter[str]] = defaultdict(Counter)
    wrong: list[str] = []
    gaps: list[str] = []
    ran = 0
    for i, case in enumerate(cases):
        code, canary = hostile.run_library(case, ctx.work / f"lib{i}", base)
        ran += canary
        if case.gap:
            gaps.append(f"- `{case.id}`: {'refused with `' + code + '`' if code else 'accepted'}"
                        f" ({case.gap})")
            continue
        tried[case.kind] += 1
        if code == case.code and not canary:
            refused[case.kind] += 1
            codes[case.kind][code] += 1
        else:
            wrong.append(f"- `{case.id}`: expected `{case.code}`, got `{code}`")
    rows: list[list[object]] = [[k, tried[k], refused[k], _codes(codes[k])] for k in tried]
    rows.append(["**all**", sum(tried.values()), sum(refused.values()), ""])
    return "\n\n".join([
        "## Hostile inputs through the library",
        "Each case unpacked if an archive, then `pipeline.scan` against a clean tiny ViT "
        "(resolve, header validation, `.bin` conversion with `weights_only`, every tensor read).",
        _table(["kind", "tried", "refused with the expected code", "codes"], rows),
        f"Pickle payloads that ran (canary file written): **{ran}**.",
        "Wrong outcomes:\n" + ("\n".join(wrong) if wrong else "none."),
        "Known gaps (not counted above; the tests expect them to fail until closed):\n"
        + ("\n".join(gaps) if gaps else "none."),
    ])


def library2(ctx: Context) -> str:
    fx = hostile2.build_fixtures(ctx.work / "h2-fixtures")
    rows: dict[str, list[object]] = defaultdict(lambda: [0, 0, 0, Counter()])
    wrong: list[str] = []
    bad = Counter[str]()
    for i, case in enumerate(hostile2.corpus()):
        runs = [("library", hostile2.run_library)]
        if case.kind != "archive":  # the CLI takes folders and files; archives are uploads
            runs.append(("CLI", hostile2.run_cli))
        for how, run in runs:
            o = run(case, ctx.work / f"h2-{how}-{i}", fx)
            exit_ok = o.exit in (None, 2)  # 2 also for an accepted case: no evaluation data
            ok = (o.code == case.code and exit_ok and not o.ran and not o.stray
                  and not o.leaked and not o.traceback)
            bad.update({"ran": o.ran, "stray": bool(o.stray), "leaked": bool(o.leaked),
                        "traceback": o.traceback})
            row = rows[f"{case.kind} ({how})"]
            row[0] += 1  # type: ignore[operator]
            row[1] += ok  # type: ignore[operator]
            row[2] += case.code is None  # type: ignore[operator]
            row[3][str(o.code)] += 1  # type: ignore[index]
            if not ok:
                wrong.append(f"- `{case.id}` ({how}): expected `{case.code}`, got `{o.code}` "
                             f"(exit {o.exit}, ran {o.ran}, stray {o.stray}, leaked {o.leaked})")
    table = [[k, n, ok, neutral, _codes(c)]  # type: ignore[arg-type]
             for k, (n, ok, neutral, c) in rows.items()]
    table.append(["**all**", sum(r[0] for r in rows.values()),  # type: ignore[misc]
                  sum(r[1] for r in rows.values()), "", ""])  # type: ignore[misc]
    return "\n\n".join([
        "## Hostile inputs, round 2, through the library and the CLI",
        f"{len(hostile2.corpus())} cases of `tests/support/hostile2.py`, each the suspect, the "
        "base or the given BV of a scan that asks for a cleaned checkpoint (so a followed link "
        "would land in the output), run by `pipeline.scan` and by `mergeshield.cli.main`, each "
        f"under a {hostile2.CASE_TIMEOUT_S} s deadline with `HF_TOKEN` set to a canary. "
        "*neutralised*: cases accepted with their hostile part ignored (an attention "
        "implementation or dtype named by the config).",
        _table(["kind", "runs", "as expected", "neutralised", "codes"], table),
        f"Payloads that ran: **{bad['ran']}**; runs that wrote outside their folders: "
        f"**{bad['stray']}**; outputs holding a secret or a local path: **{bad['leaked']}**; "
        f"tracebacks: **{bad['traceback']}**.",
        "Wrong outcomes:\n" + ("\n".join(wrong) if wrong else "none."),
    ])


@contextmanager
def _stack(ctx: Context) -> Iterator[None]:
    hub = LoopbackHub().start()
    stack = hostile_stack(ctx.work / "stack", "sqlite-filesystem", hub.url)
    pg: Stack | None = None
    try:
        stack.serve()
        try:
            ensure_services()
            pg = hostile_stack(ctx.work / "pg", "postgres-redis", hub.url, REDIS_DB)
            pg.start_api().wait_up().start_worker().wait_ready()  # the worker after migrations
        except RuntimeError as exc:
            print(f"PostgreSQL/Redis not running, SQLite only: {exc}")
        with stack.client() as client:
            ctx.stack, ctx.client, ctx.pg, ctx.hub = stack, client, pg, hub
            yield
    finally:
        ctx.stack = ctx.client = ctx.pg = ctx.hub = None
        stack.close()
        if pg is not None:
            pg.close()
        hub.stop()


def _backends(ctx: Context) -> list[tuple[str, Stack]]:
    assert ctx.stack is not None
    return [("SQLite", ctx.stack)] + ([("PostgreSQL", ctx.pg)] if ctx.pg is not None else [])


@dataclass
class _Tally:
    """One corpus kind through the service: how many, as expected on each backend, where."""

    tried: int = 0
    ok: Counter[str] = field(default_factory=Counter)  # backend -> as expected
    at_upload: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # "stage: code", first backend


def service(ctx: Context) -> str:
    """Both corpora's file cases through every backend, judged as the service tests judge."""
    assert ctx.hub is not None
    first = [round1(c) for c in hostile.corpus() if not c.gap]
    second = [c for c in map(round2, hostile2.corpus()) if c is not None]
    rounds = ["1"] * len(first) + ["2"] * len(second)
    tally: dict[tuple[str, str], _Tally] = defaultdict(_Tally)
    checks: list[list[object]] = []
    wrong: list[str] = []
    backends = [name for name, _ in _backends(ctx)]
    for name, stack in _backends(ctx):
        work = ctx.work / f"svc-{name}"
        t0 = time.perf_counter()
        with stack.client() as client:
            outcomes = run_cases(client, first + second, work)
            problems = list(alive(client, work))
        seconds = time.perf_counter() - t0
        for rnd, o in zip(rounds, outcomes, strict=True):
            t = tally[(rnd, o.case.kind)]
            ok = ((o.stage, o.code) == (o.case.refused_at, o.case.code) and not o.ran
                  and o.seconds < hostile2.CASE_TIMEOUT_S)
            t.ok[name] += ok
            if name == backends[0]:
                t.tried += 1
                t.at_upload += o.stage == "upload"
                t.outcomes[f"{o.stage}: {o.code or 'succeeded'}"] += 1
            if not ok:
                wrong.append(f"- `{o.case.id}` ({name}): expected {o.case.refused_at} "
                             f"`{o.case.code}`, got {o.stage} `{o.code}` in {o.seconds:.0f} s"
                             f"{' and the payload ran' if o.ran else ''}")
        bad = {"leaks": list(leaks(stack, outcomes)),
               "tracebacks": list(tracebacks(stack, outcomes)),
               "strays": list(strays(stack, work))}
        wrong += [f"- {name}, {what}: {p}" for what, ps in bad.items() for p in ps]
        wrong += [f"- {name}: {p}" for p in problems]
        procs = all(p.poll() is None for p in stack.procs.values())
        checks.append([name, sum(o.ran for o in outcomes), len(bad["leaks"]),
                       len(bad["tracebacks"]), len(bad["strays"]),
                       f"{max(o.seconds for o in outcomes):.1f}", f"{seconds:.0f}",
                       "yes" if procs and not problems else "no"])
    rows = [[rnd, kind, t.tried, *(t.ok[b] for b in backends), t.at_upload,
             t.tried - t.at_upload, _codes(t.outcomes)] for (rnd, kind), t in tally.items()]
    unsent = [c for c in hostile2.corpus() if round2(c) is None]
    return "\n\n".join([
        "## Hostile inputs through the service",
        "Both corpora's file cases (round 1: `tests/support/hostile.py`, round 2: "
        "`tests/support/hostile2.py`) sent to real processes: `mergeshield serve --auth` (API + "
        "one worker, SQLite + the filesystem broker) and API + a worker process on PostgreSQL + "
        f"Redis; upload limit {hostile.MAX_UPLOAD_BYTES // 2**20} MiB, unpacked limit "
        f"{hostile.LIMITS.max_bytes // 2**20} MiB, {hostile.LIMITS.max_files} archive members; "
        f"a canary token in the processes' environment (`{', '.join(CANARY_ENV)}`), their "
        "temporary files in their own folder, an empty loopback hub. Each case is uploaded as a "
        "user sends it (a folder as a zip; a link, FIFO or socket as an archive member of that "
        "type, as tar and `zip -y` keep them) and, when the upload is accepted, scanned by the "
        "worker against the clean base (a base case: against the clean suspect), all scans "
        "queued at once. Headers and archives are judged in the API process, anything that "
        "needs a tensor, a pickle or a config only by the worker (where each round-2 case ends "
        "is said in `tests/support/hostile_service.py`). *as expected*: the stage and stable "
        f"code expected, no payload run, the scan under {hostile2.CASE_TIMEOUT_S} s.",
        _table(["round", "kind", "tried", *(f"as expected ({b})" for b in backends),
                "at upload", "at scan", "outcomes"], rows),
        f"Not sent: the {len(unsent)} round-2 cases that play the given BV: {NOT_SENT['bv']}.",
        "Then, per backend: payloads that ran; secrets (the canary, the machine's "
        "`/etc/passwd`, a secret beside the inputs) or server paths in any API answer, report, "
        "database row, stored file or log; tracebacks (answers, logs) and `internal_error`; "
        "files written outside the stack's folders or beside the inputs; the longest scan; the "
        "whole run; API and worker alive, `/readyz` and a clean scan afterwards.",
        _table(["backend", "ran", "leaks", "tracebacks", "stray files", "longest scan (s)",
                "wall (s)", "alive"], checks),
        f"Requests that reached the hub: **{len(ctx.hub.requests)}**.",
        "Wrong outcomes:\n" + ("\n".join(wrong) if wrong else "none."),
    ])


def service_requests(ctx: Context) -> str:
    """The request tricks, sent as they are to every backend's API."""
    assert ctx.client is not None and ctx.stack is not None
    requests: dict[tuple[str, str], list[object]] = defaultdict(lambda: [0, 0, Counter()])
    wrong: list[str] = []
    for (backend, stack), rc in ((b, rc) for b in _backends(ctx) for rc in request_cases()):
        with stack.client() as client:
            r = send(client, rc)
        got = (r.status_code, error_code(r))
        row = requests[(rc.group, backend)]
        row[0] += 1  # type: ignore[operator]
        row[1] += got == (rc.status, rc.code)  # type: ignore[operator]
        row[2][f"{got[0]} {got[1]}"] += 1  # type: ignore[index]
        if got != (rc.status, rc.code):
            wrong.append(f"- `{rc.id}` ({backend}): expected {rc.status} `{rc.code}`, got "
                         f"{got[0]} `{got[1]}`")
    problems = list(alive(ctx.client, ctx.work / "svc-requests"))
    procs = all(p.poll() is None for p in ctx.stack.procs.values())
    return "\n\n".join([
        "## Request tricks through the service",
        "Path and unicode tricks in ids, bad model references, wrong content types, odd upload "
        "names and sizes (`tests/support/hostile_requests.py`), sent as they are to both APIs "
        "(PostgreSQL, unlike SQLite, refuses a NUL in text).",
        _table(["request tricks", "database", "tried", "refused as expected", "answers"],
               [[g, b, n, ok, _codes(c)]  # type: ignore[arg-type]
                for (g, b), (n, ok, c) in sorted(requests.items())]),
        f"SQLite API and worker processes alive afterwards: **{'yes' if procs else 'no'}**; "
        f"`/readyz` and a clean scan afterwards: "
        f"**{'ok' if not problems else '; '.join(problems)}**.",
        "Wrong outcomes:\n" + ("\n".join(wrong) if wrong else "none."),
    ])


def fuzzing(ctx: Context) -> str:
    rows: list[list[object]] = []
    for prop in PROPERTIES:
        t0 = time.perf_counter()
        try:
            examples, accepted = prop.run(ctx.fuzz_examples)
            failure = "0"
        except Exception as exc:  # a property failed: hypothesis shrank it and raised
            examples, accepted, failure = ctx.fuzz_examples, 0, f"1: {str(exc)[:300]!r}"
        rows.append([prop.name, prop.describe, examples, accepted, failure,
                     f"{time.perf_counter() - t0:.0f}"])
    return "\n\n".join([
        "## Fuzzing the safetensors header validation",
        "hypothesis, derandomised. The property: a parse either succeeds with a consistent result "
        "(tensors tile the data region, bytes match dtype × shape, the safetensors library reads "
        "the same tensors) or raises `CorruptCheckpointError`; never another exception, and never "
        "8 MiB of allocation whatever size the input claims. atheris was tried (seeded, 1.3 M "
        "executions): it reached no line of the validation these properties miss.",
        _table(["property", "inputs", "examples", "parsed", "failures", "s"], rows),
    ])


def api_fuzzing(ctx: Context) -> str:
    assert ctx.client is not None
    reports = {name: fuzz(stack.url, {"Authorization": f"Bearer {ADMIN_KEY}"}, ctx.api_examples)
               for name, stack in _backends(ctx)}
    names = list(reports)
    first = reports[names[0]]
    rows: list[list[object]] = []
    for i, op in enumerate(first.operations):
        row: list[object] = [f"`{op.label}`"]
        for name in names:
            o = reports[name].operations[i]
            row += [o.examples, ", ".join(f"{s}: {n}" for s, n in sorted(o.statuses.items())),
                    len(o.server_errors)]
        rows.append(row)
    details = [f"- `{o.label}` ({name}){' (known: ' + o.known + ')' if o.known else ''}: "
               f"{len(o.server_errors)} × 5xx, e.g. `{o.server_errors[0][:400]}`"
               for name, rep in reports.items() for o in rep.failures(include_known=True)]
    problems = list(alive(ctx.client, ctx.work / "after-api"))
    summary = "; ".join(
        f"{name}: {len(r.operations)} operations, {r.examples} requests, "
        f"{sum(len(o.server_errors) for o in r.operations)} answered 5xx, {r.seconds:.0f} s"
        for name, r in reports.items())
    header = ["operation"] + [f"{h} ({n})" for n in names for h in ("requests", "statuses",
                                                                     "5xx")]
    return "\n\n".join([
        "## schemathesis against the OpenAPI",
        f"Every operation of `/openapi.json`, up to {ctx.api_examples} positive and "
        f"{ctx.api_examples} negative cases each (derandomised), sent with the admin key to the "
        "same running services (SQLite + filesystem broker; PostgreSQL + Redis, API and worker). A "
        "negative case cannot exist for an operation whose only input is a free-form path id. "
        f"{summary}.",
        _table(header, rows),
        "5xx found:\n" + ("\n".join(details) if details else "none."),
        f"`/readyz` and a clean scan afterwards (SQLite stack): "
        f"**{'ok' if not problems else problems}**.",
    ])


def fault_injection(ctx: Context) -> str:
    return faults.fault_section(ctx.work / "faults", ctx.zoo)


def soak_run(ctx: Context) -> str:
    zoo = faults.load_zoo(ctx.zoo, ctx.work / "zoo")
    return faults.soak_section(ctx.work / "soak", zoo, ctx.soak, ctx.fault_every)


# (title for the timings and --only, the page's heading, section, needs the running stack)
SECTIONS: list[tuple[str, str, Section, bool]] = [
    ("hostile inputs, library", "Hostile inputs through the library", library, False),
    ("hostile inputs round 2, library and CLI",
     "Hostile inputs, round 2, through the library and the CLI", library2, False),
    ("hostile inputs, service", "Hostile inputs through the service", service, True),
    ("request tricks, service", "Request tricks through the service", service_requests, True),
    ("schemathesis", "schemathesis against the OpenAPI", api_fuzzing, True),
    ("header fuzzing", "Fuzzing the safetensors header validation", fuzzing, False),
    ("fault injection", "Fault injection", fault_injection, False),
    ("soak", "Soak run", soak_run, False),
]
ORDER = ["hostile inputs, library", "hostile inputs round 2, library and CLI",
         "hostile inputs, service", "request tricks, service", "header fuzzing", "schemathesis",
         "fault injection", "soak"]  # how the page reads


def _previous(page: Path) -> tuple[str, dict[str, str]]:
    """The page as it is: its "Written by" sentence and its sections by heading."""
    chunks = (page.read_text() if page.is_file() else "").split("\n## ")
    written = next((p for p in chunks[0].split("\n\n") if p.startswith("Written by")), "")
    return written, {c.split("\n", 1)[0]: "## " + c.strip() for c in chunks[1:]}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fuzz-examples", type=int, default=2000, help="per fuzzing property")
    ap.add_argument("--api-examples", type=int, default=100,
                    help="per operation and mode (positive, negative)")
    ap.add_argument("--soak", type=int, default=500, help="scans in the soak run (0: none)")
    ap.add_argument("--fault-every", type=float, default=20.0,
                    help="mean seconds between the soak's faults")
    ap.add_argument("--zoo", type=Path, default=os.environ.get("MERGESHIELD_TEST_ZOO"),
                    help="a quick zoo (default $MERGESHIELD_TEST_ZOO; built when absent)")
    ap.add_argument("--only", nargs="+", choices=[s[0] for s in SECTIONS], metavar="TITLE",
                    help="run only these sections (titles as in SECTIONS); the others keep "
                         "their text from the page at --out, which says so")
    ap.add_argument("--out", type=Path, default=Path("docs/reliability.md"))
    args = ap.parse_args()
    ctx = Context(Path(tempfile.mkdtemp(prefix="msrel-")), args.fuzz_examples, args.api_examples,
                  args.soak, args.fault_every, args.zoo)
    chosen = [s for s in SECTIONS if args.only is None or s[0] in args.only]
    written, before = _previous(args.out)
    parts = {title: before[heading] for title, heading, _, _ in SECTIONS
             if args.only is not None and title not in args.only}
    t_all = time.perf_counter()

    def run(title: str, section: Section) -> None:
        t0 = time.perf_counter()
        parts[title] = section(ctx)
        ctx.timings[title] = time.perf_counter() - t0
        print(f"{title}: {ctx.timings[title]:.0f} s", flush=True)

    for title, _, section, _ in (s for s in chosen if not s[3]):
        run(title, section)
    if any(s[3] for s in chosen):
        with _stack(ctx):
            for title, _, section, _ in (s for s in chosen if s[3]):
                run(title, section)
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    only = f" --only {' '.join(repr(t) for t in args.only)}" if args.only else ""
    kept = [t for t in ORDER if t not in ctx.timings]
    head = [
        "# Reliability",
        f"Written by `python -m bench.reliability{only} --fuzz-examples {args.fuzz_examples} "
        f"--api-examples {args.api_examples} --soak {args.soak} --fault-every "
        f"{args.fault_every:g}` at commit `{_commit()}` on {started}, "
        f"{platform.machine()} Linux, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, in {time.perf_counter() - t_all:.0f} s. Hostile inputs are "
        "generated by `tests/support/hostile.py` and `tests/support/hostile2.py` (never "
        "committed as files); every one must be refused with the stable error code it carries "
        "(`mergeshield/errors.py`), or be accepted with its hostile part neutralised where the "
        "corpus says so.",
        "Time per section: " + ", ".join(f"{t} {s:.0f} s" for t, s in ctx.timings.items()) + ".",
    ]
    if kept:
        head.append(f"Not rerun by this command, kept as the previous page had them: "
                    f"{', '.join(kept)}. Their settings and figures are those of the run the "
                    f"previous page named: \"{written}\"")
    known = "\n".join(f"- `{k}`: {v}" for k, v in KNOWN_5XX.items()) or "none"
    text = "\n\n".join([*head, *(parts[t] for t in ORDER),
                        "## Known failures, not ours to fix here\n\n" + known]) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    shutil.rmtree(ctx.work, ignore_errors=True)  # the generated inputs and the stacks' data
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
