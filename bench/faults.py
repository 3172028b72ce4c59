"""The fault-injection and soak sections of ``docs/reliability.md`` (see ``bench/reliability.py``).

* Fault injection: ``tests/service/test_faults.py`` run by pytest, its junit XML read back: each
  scenario, its outcome, the scans it sent (every test ends with the nothing-lost audit).
* Soak: ``n`` scans of the quick zoo's MNIST ViTs (FAST options, ``force``: each one runs)
  through API + 2 workers on PostgreSQL + Redis, sent from a thread while the main thread
  injects a random fault every ``fault_every`` seconds (a worker SIGKILLed and restarted, the
  API killed and restarted, Redis flushed), until every scan is finished; then the audit of
  ``tests/support/faults.py`` over the database and the result folders.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis

from mergeshield.zoo import ZooConfig, build_zoo
from tests.service.conftest import FAST, zipped
from tests.support.faults import Audit, audit, submit, wait_finished
from tests.support.hub import LoopbackHub
from tests.support.stack import Stack, ensure_services
from tests.support.zoo import Zoo

SUSPECTS = ("vit-mnist-badnets", "vit-mnist-clean", "vit-mnist-blended")
FAULTS = ("worker SIGKILL", "API restart", "Redis flush")
SOAK_FAILURES = ("worker_lost",)  # a scan whose worker was killed max_attempts times


# --- fault injection: the test module's outcomes


@dataclass
class Scenario:
    name: str
    outcome: str  # passed | failed | error | skipped
    seconds: float
    scans: str  # as the test recorded it, "" when it did not
    message: str = ""


def fault_tests(junit: Path, zoo: Path | None) -> list[Scenario]:
    """Run the fault tests (in a child pytest, with its junit XML) and read the outcomes."""
    env = {**os.environ, **({"MERGESHIELD_TEST_ZOO": str(zoo)} if zoo else {})}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "tests/service/test_faults.py", f"--junitxml={junit}",
                    "-o", "junit_family=xunit1"], env=env, check=False)
    out: list[Scenario] = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        out.append(Scenario(case.get("name", "?"), "passed" if bad is None else bad.tag,
                            float(case.get("time", 0)), props.get("scans") or "",
                            "" if bad is None else (bad.get("message") or "")[:300]))
    return out


# --- soak


@dataclass
class Soak:
    scans: int
    seconds: float
    audit: Audit
    faults: Counter[str] = field(default_factory=Counter)


def soak(zoo: Zoo, work: Path, n: int, *, workers: int = 2, fault_every: float = 20.0,
         seed: int = 0) -> Soak:
    ensure_services()
    hub = LoopbackHub().start()
    for name in (*SUSPECTS, "vit-base"):
        hub.add_repo(f"zoo/{name}", zoo.path(name))
    hub.add_repo("zoo/mnist", zoo.dataset(SUSPECTS[0]), repo_type="dataset")
    work.mkdir(parents=True)
    stack = Stack(work, "postgres-redis", redis_db=12, env={"HF_ENDPOINT": hub.url})
    names = [f"w{i + 1}" for i in range(workers)]
    try:
        stack.start_api()
        for name in names:
            stack.start_worker(name)
        stack.wait_ready()
        with stack.client() as c:
            ids = {m: c.post("/v1/uploads", files={"file": (f"{m}.zip", zipped(zoo.path(m)))})
                   .json()["id"] for m in (*SUSPECTS, "vit-base")}
        bodies = [{"suspect": {"upload": ids[SUSPECTS[i % len(SUSPECTS)]]},
                   "base": {"upload": ids["vit-base"]}, "evaluation": "zoo/mnist",
                   "options": FAST, "force": True, "device": "cpu"} for i in range(n)]
        submitted: list[str] = []

        def feed() -> None:
            with stack.client() as c:
                for body in bodies:
                    submitted.append(submit(c, body, uuid.uuid4().hex))

        rng = random.Random(seed)
        faults: Counter[str] = Counter()
        t0 = time.monotonic()
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        while feeder.is_alive() or _unfinished(stack, submitted):
            time.sleep(fault_every * rng.uniform(0.5, 1.5))
            if not (feeder.is_alive() or _unfinished(stack, submitted)):
                break
            fault = rng.choice(FAULTS)
            faults[fault] += 1
            if fault == "worker SIGKILL":
                name = rng.choice(names)
                stack.kill(name)
                stack.start_worker(name)
            elif fault == "API restart":
                stack.kill("api")
                stack.start_api().wait_up()
            else:
                redis.Redis.from_url(stack.redis_url or "").flushdb()
        wait_finished(stack, submitted)
        return Soak(n, time.monotonic() - t0, audit(stack, submitted, SOAK_FAILURES), faults)
    finally:
        stack.close()
        hub.stop()


def _unfinished(stack: Stack, ids: list[str]) -> bool:
    rows = stack.rows()
    return any(rows.get(i, {}).get("state") not in ("succeeded", "failed", "cancelled")
               for i in ids)


# --- the two sections of docs/reliability.md

LABELS = {  # test name -> what it does, for the table
    "test_killed_worker_scan_finishes_after_a_restart": "worker SIGKILL mid-stage, restarted",
    "test_api_restart_keeps_history": "API restart: history, reports kept",
    "test_scan_over_its_time_limit_fails_with_the_reason": "scan past its time limit",
    "test_flushed_redis_scan_is_reenqueued": "Redis FLUSHDB with a scan queued",
    "test_api_restart_under_load": "API killed and restarted while scans queue and run",
    "test_redis_restart_loses_nothing": "Redis (no persistence) killed and restarted while "
                                        "scans queue and run",
    "test_database_outage_is_ridden_out": "PostgreSQL unreachable for 8 s (proxy cut) while "
                                          "scans run",
    "test_disk_full_during_checkpoint_write": "disk full while writing the cleaned checkpoint "
                                              "(RLIMIT_FSIZE), then a scan with room",
    "test_hub_down_fails_in_bounded_time": "hub down (connection refused)",
    "test_hub_5xx_then_back_within_the_retries": "hub answering 503, back within the retries",
    "test_hung_hub_times_out": "hub answering slower than the client's timeout",
}


def fault_section(work: Path, zoo: Path | None) -> str:
    work.mkdir(parents=True, exist_ok=True)
    rows = fault_tests(work / "junit.xml", zoo)
    passed = sum(s.outcome == "passed" for s in rows)
    table = "\n".join(
        f"| {LABELS.get(s.name.split('[')[0], s.name)} | `{s.name}` | {s.outcome} | "
        f"{s.scans or '-'} | {s.seconds:.0f} |" for s in rows)
    problems = "\n".join(f"- `{s.name}`: {s.message}" for s in rows if s.outcome != "passed")
    return "\n\n".join([
        "## Fault injection",
        "`tests/service/test_faults.py`, real processes (`python -m pytest "
        "tests/service/test_faults.py`, read back from its junit XML). The faults of issue 6 "
        "share one stack: API + 2 workers on PostgreSQL, reached through a loopback TCP proxy "
        "the test cuts, and a redis-server of the test's own (no persistence) that it kills and "
        "starts again. Every one of them ends with the audit of `tests/support/faults.py` over "
        "all the scans that stack was sent: each is in the database once and finished "
        "(succeeded, or failed with the expected stable code: `disk_full`, `hub_unavailable`), "
        "no other scan is there, and each succeeded scan's report loads and its cleaned "
        "checkpoint has the size and sha256 the report records, loads, and has no temporary "
        "file beside it. Scenarios parametrised by backend run on both SQLite + the filesystem "
        "broker and PostgreSQL + Redis.",
        "| fault | test | outcome | scans | s |\n|---|---|---|---|---|\n" + table,
        f"**{passed} of {len(rows)} passed.**"
        + ("" if not problems else "\n\nNot passed:\n" + problems),
    ])


def load_zoo(given: Path | None, work: Path) -> Zoo:
    """The quick zoo at ``given`` (``mergeshield zoo build PATH --quick``), or built here."""
    if given is not None and (given / "manifest.json").is_file():
        return Zoo(given, json.loads((given / "manifest.json").read_text()))
    return Zoo(work, build_zoo(work, ZooConfig.for_speed(quick=True)))


def soak_section(work: Path, zoo: Zoo, n: int, fault_every: float) -> str:
    if n <= 0:
        return "## Soak run\n\nNot run (`--soak 0`)."
    result = soak(zoo, work, n, fault_every=fault_every)
    a = result.audit
    outcomes = ", ".join(f"{k} {v}" for k, v in a.outcomes.most_common())
    tries = ", ".join(f"{k}: {v}" for k, v in sorted(a.attempts.items()))
    faults = ", ".join(f"{k} × {v}" for k, v in result.faults.most_common()) or "none"
    return "\n\n".join([
        "## Soak run",
        f"{n} scans (the quick zoo's {', '.join(SUSPECTS)} against vit-base, uploaded once; "
        f"FAST options {FAST}, `force`, so every scan runs) sent one after the other to API + "
        "2 workers on PostgreSQL + Redis, while a random fault was injected every "
        f"{fault_every * 0.5:.0f}-{fault_every * 1.5:.0f} s (seed 0) until all had finished: "
        "a worker SIGKILLed (with its pool) and started again, the API killed and started "
        "again (the sender retries with the same Idempotency-Key), or Redis flushed. Then the "
        "audit of `tests/support/faults.py` (see above).",
        "| | |\n|---|---|\n"
        f"| scans sent | {a.submitted} |\n"
        f"| outcomes | {outcomes} |\n"
        f"| lost (missing or unfinished) | **{len(a.lost)}** |\n"
        f"| duplicated (in the database, never sent) | **{len(a.duplicated)}** |\n"
        f"| broken artifacts or unexpected failures | **{len(a.broken)}** |\n"
        f"| tries per scan (tries: scans) | {tries} |\n"
        f"| faults injected | {faults} |\n"
        f"| wall time | {result.seconds:.0f} s ({result.seconds / n:.1f} s per scan) |",
        "Problems:\n" + ("\n".join(f"- {p}" for p in a.lost + a.duplicated + a.broken)
                         if not a.ok else "none."),
    ])
