"""Reliability figures: hostile inputs, fuzzing and API fuzzing, measured and written to
``docs/reliability.md``.

    python -m bench.reliability [--fuzz-examples 2000] [--api-examples 100] [--soak 500]
                                [--zoo PATH] [--out PATH]

Run it from the repository root (it imports ``tests.support``). Sections, in order:

* hostile inputs through the library: every case of ``tests/support/hostile.py`` unpacked if an
  archive, then ``pipeline.scan`` (resolve, validation, conversion, every tensor read);
* hostile inputs, round 2, through the library and the CLI: every case of
  ``tests/support/hostile2.py`` (links out, special files, allocation bombs, tensor types,
  configs, remote code, outputs) under a deadline with a canary token in the environment;
* hostile inputs through the service: the same cases uploaded to real processes (``serve --auth``
  on SQLite + the filesystem broker) and scanned when accepted, plus the request tricks of
  ``tests/support/hostile_service.py`` (also to API + worker on PostgreSQL + Redis when they are
  running); then whether the API and the worker are alive and a clean scan still succeeds;
* property-based fuzzing of the safetensors header validation (``tests/support/fuzz.py``);
* schemathesis against the same running APIs (``tests/support/api_fuzz.py``);
* fault injection: ``tests/service/test_faults.py`` run by pytest, outcomes from its junit XML;
* soak: ``--soak`` scans through API + 2 workers on PostgreSQL + Redis with random faults,
  then the nothing-lost audit (``bench/faults.py``). Both use the quick zoo at ``--zoo``
  (default ``$MERGESHIELD_TEST_ZOO``), or build one.

A section is a function ``(Context) -> str`` in ``SECTIONS``; add one to add a section.
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
from tests.support.hostile_service import (
    STACK_ENV,
    alive,
    error_code,
    request_cases,
    run_cases,
    send,
)
from tests.support.hub import LoopbackHub
from tests.support.stack import ADMIN_KEY, Stack, ensure_services


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
    stack = Stack(ctx.work / "stack", "sqlite-filesystem",
                  env={**STACK_ENV, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token})
    (ctx.work / "stack").mkdir()
    pg: Stack | None = None
    try:
        stack.serve()
        try:
            ensure_services()
            (ctx.work / "pg").mkdir()
            pg = Stack(ctx.work / "pg", "postgres-redis",
                       env={**STACK_ENV, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token})
            pg.start_api().start_worker().wait_ready()
        except RuntimeError as exc:
            print(f"PostgreSQL/Redis not running, SQLite only: {exc}")
        with stack.client() as client:
            ctx.stack, ctx.client, ctx.pg = stack, client, pg
            yield
    finally:
        ctx.stack = ctx.client = ctx.pg = None
        stack.close()
        if pg is not None:
            pg.close()
        hub.stop()


def _backends(ctx: Context) -> list[tuple[str, Stack]]:
    assert ctx.stack is not None
    return [("SQLite", ctx.stack)] + ([("PostgreSQL", ctx.pg)] if ctx.pg is not None else [])


def service(ctx: Context) -> str:
    assert ctx.client is not None and ctx.stack is not None
    cases = [c for c in hostile.corpus() if not c.gap]
    outcomes = run_cases(ctx.client, cases, ctx.work / "svc")
    rows: list[list[object]] = []
    wrong: list[str] = []
    by_kind: dict[str, list[object]] = defaultdict(lambda: [0, 0, 0, Counter()])
    for o in outcomes:
        row = by_kind[o.case.kind]
        row[0] += 1  # type: ignore[operator]
        ok = (o.stage, o.code) == (o.case.refused_at, o.case.code) and not o.ran
        row[1] += ok  # type: ignore[operator]
        row[2] += o.stage == "upload"  # type: ignore[operator]
        row[3][f"{o.stage}: {o.code}"] += 1  # type: ignore[index]
        if not ok:
            wrong.append(f"- `{o.case.id}`: expected {o.case.refused_at} `{o.case.code}`, got "
                         f"{o.stage} `{o.code}`{' and the payload ran' if o.ran else ''}")
    for kind, (n, ok, at_upload, codes) in by_kind.items():
        rows.append([kind, n, ok, at_upload, n - at_upload, _codes(codes)])  # type: ignore[arg-type]
    requests: dict[tuple[str, str], list[object]] = defaultdict(lambda: [0, 0, Counter()])
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
    problems = list(alive(ctx.client, ctx.work / "svc"))
    procs = all(p.poll() is None for p in ctx.stack.procs.values())
    return "\n\n".join([
        "## Hostile inputs through the service",
        "Real processes: `mergeshield serve --auth` (API + one worker, SQLite + the filesystem "
        f"broker), upload limit {hostile.MAX_UPLOAD_BYTES // 2**20} MiB, unpacked limit "
        f"{hostile.LIMITS.max_bytes // 2**20} MiB, {hostile.LIMITS.max_files} archive members. "
        "Each file case is uploaded (a folder as a zip); when the upload is accepted it is "
        "scanned against a clean base by the worker. Headers and archives are judged in the API "
        "process; anything that needs a tensor or a pickle, only by the worker.",
        _table(["kind", "tried", "refused as expected", "at upload", "at scan", "outcomes"],
               rows),
        "The request tricks go to that API and to one on PostgreSQL + Redis (which, unlike "
        "SQLite, refuses a NUL in text).",
        _table(["request tricks", "database", "tried", "refused as expected", "answers"],
               [[g, b, n, ok, _codes(c)]  # type: ignore[arg-type]
                for (g, b), (n, ok, c) in sorted(requests.items())]),
        f"Pickle payloads that ran: **{sum(o.ran for o in outcomes)}**. API and worker processes "
        f"alive afterwards: **{'yes' if procs else 'no'}**; `/readyz` and a clean scan "
        f"afterwards: **{'ok' if not problems else '; '.join(problems)}**.",
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


# (title for the timings, section, needs the running stack)
SECTIONS: list[tuple[str, Section, bool]] = [
    ("hostile inputs, library", library, False),
    ("hostile inputs round 2, library and CLI", library2, False),
    ("hostile inputs, service", service, True),
    ("schemathesis", api_fuzzing, True),
    ("header fuzzing", fuzzing, False),
    ("fault injection", fault_injection, False),
    ("soak", soak_run, False),
]
ORDER = ["hostile inputs, library", "hostile inputs round 2, library and CLI",
         "hostile inputs, service", "header fuzzing", "schemathesis",
         "fault injection", "soak"]  # how the page reads


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
    ap.add_argument("--out", type=Path, default=Path("docs/reliability.md"))
    args = ap.parse_args()
    ctx = Context(Path(tempfile.mkdtemp(prefix="msrel-")), args.fuzz_examples, args.api_examples,
                  args.soak, args.fault_every, args.zoo)
    parts: dict[str, str] = {}

    def run(title: str, section: Section) -> None:
        t0 = time.perf_counter()
        parts[title] = section(ctx)
        ctx.timings[title] = time.perf_counter() - t0
        print(f"{title}: {ctx.timings[title]:.0f} s", flush=True)

    for title, section, _ in (s for s in SECTIONS if not s[2]):
        run(title, section)
    with _stack(ctx):
        for title, section, _ in (s for s in SECTIONS if s[2]):
            run(title, section)
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = "\n\n".join([
        "# Reliability",
        f"Written by `python -m bench.reliability --fuzz-examples {args.fuzz_examples} "
        f"--api-examples {args.api_examples} --soak {args.soak} --fault-every "
        f"{args.fault_every:g}` at commit `{_commit()}` on {started}, "
        f"{platform.machine()} Linux, Python {platform.python_version()}. Hostile inputs are "
        "generated by `tests/support/hostile.py` (never committed as files); every one must be "
        "refused with the stable error code it carries (`mergeshield/errors.py`).",
        "Time per section: " + ", ".join(f"{t} {s:.0f} s" for t, s in ctx.timings.items()) + ".",
    ])
    known = "\n".join(f"- `{k}`: {v}" for k, v in KNOWN_5XX.items()) or "none"
    text = "\n\n".join([head, *(parts[t] for t in ORDER),
                        "## Known failures, not ours to fix here\n\n" + known]) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    shutil.rmtree(ctx.work, ignore_errors=True)  # the generated inputs and the stacks' data
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
