"""The second hostile corpus (``tests/support/hostile2.py``, issue 13) through real processes on
both backends: ``serve --auth`` on SQLite + the filesystem broker, and API + a worker process on
PostgreSQL + Redis. Each case is uploaded as a user would send it and, when the upload is
accepted, scanned by the worker against the clean base (or, for a base case, the clean suspect),
all scans queued at once. The stacks run with a canary token in their environment
(``MERGESHIELD_CANARY``, ``HF_TOKEN``), their temporary files inside their own folder, and an
empty loopback hub.

Where the service ends a case is said once, in ``tests/support/hostile_service.py``
(``round2``): a link or a FIFO/socket can only reach the service as an archive member of that
type (tar and ``zip -y`` keep them so; a client that followed one would send its own files), so
those cases are refused at upload with ``unsafe_archive``, where the library, given the folder
on its own disk, says ``unsafe_file``; archives and bare ``.safetensors`` files (their header is
read in the API) end at upload; everything else ends in the worker with the library's code.
A 65 MiB config zipped unpacks past the stack's limit (``unsafe_archive`` at upload), and cases
that play the given BV are not sent: the API has no such input (``NOT_SENT``). Accepted cases
(an attention implementation or dtype named by the config) must succeed, with no request to
the hub.

Then, per backend: no payload ran, every scan took under the corpus' deadline, no secret or
server path in any API answer, report, database row, stored file or log, no traceback and no
``internal_error``, nothing written outside the stack's folders or next to the inputs, and the
API and the worker still answer and scan.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import hostile2
from tests.support.hostile_service import (
    NOT_SENT,
    OTHER_CODE,
    Outcome,
    ServiceCase,
    alive,
    hostile_stack,
    leaks,
    round2,
    run_cases,
    strays,
    tracebacks,
)
from tests.support.hub import LoopbackHub
from tests.support.stack import BACKENDS, Stack, ensure_services

CORPUS = hostile2.corpus()
CASES = [c for c in map(round2, CORPUS) if c is not None]
pytestmark = pytest.mark.filterwarnings("ignore:.*sparse.*:UserWarning",
                                        "ignore:.*quantized tensor creation.*:UserWarning",
                                        "ignore:TypedStorage is deprecated:UserWarning")


@dataclass
class Run:
    stack: Stack
    hub: LoopbackHub
    work: Path
    outcomes: dict[str, Outcome]


@pytest.fixture(scope="module", params=BACKENDS)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Run]:
    """One stack per backend for the module, every case sent to it at once."""
    backend: str = request.param
    root = tmp_path_factory.mktemp(f"hostile2-{backend}")
    hub = LoopbackHub().start()
    stack = hostile_stack(root / "stack", backend, hub.url)
    try:
        if backend == "sqlite-filesystem":
            stack.serve()
        else:
            ensure_services()  # the worker after the API migrated the database
            stack.start_api().wait_up().start_worker().wait_ready()
        with stack.client() as client:
            outcomes = run_cases(client, CASES, root / "work")
        yield Run(stack, hub, root / "work", {o.case.id: o for o in outcomes})
    finally:
        stack.close()
        hub.stop()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_ends_with_its_code_and_runs_nothing(case: ServiceCase, run: Run) -> None:
    o = run.outcomes[case.id]
    assert not o.ran, "a pickle payload ran"
    assert (o.stage, o.code) == (case.refused_at, case.code), o.answers[-1][:500]
    if o.stage == "upload":
        assert 400 <= o.status < 500
    else:
        assert o.state == ("succeeded" if case.code is None else "failed")
        assert o.seconds < hostile2.CASE_TIMEOUT_S, "the scan hung"


def test_no_secret_no_traceback_no_stray_file_no_hub(run: Run) -> None:
    outcomes = list(run.outcomes.values())
    # the control: the canary is in the environment a followed link would have leaked
    for proc in run.stack.procs.values():
        assert hostile2.CANARY.encode() in Path(f"/proc/{proc.pid}/environ").read_bytes()
    assert list(leaks(run.stack, outcomes)) == []
    assert list(tracebacks(run.stack, outcomes)) == []
    assert list(strays(run.stack, run.work)) == []
    assert run.hub.requests == []


def test_the_api_and_the_worker_survive_and_still_scan(run: Run) -> None:
    assert all(p.poll() is None for p in run.stack.procs.values())
    with run.stack.client() as client:
        assert list(alive(client, run.work)) == []


def test_every_case_is_sent_or_said_why() -> None:
    ids = {c.id for c in CORPUS}
    assert set(OTHER_CODE) <= ids
    unsent = [c for c in CORPUS if round2(c) is None]
    assert {c.role for c in unsent} == set(NOT_SENT)
    assert len(CASES) + len(unsent) == len(CORPUS)
    assert {c.kind for c in CASES} == {c.kind for c in CORPUS} - {"output"}
