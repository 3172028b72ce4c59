"""The hostile-input corpus through real processes (``serve --auth`` on SQLite + the filesystem
broker): each file case is uploaded and, when the upload is accepted, scanned by the worker; each
request trick is sent as is, to that API and to one on PostgreSQL. Every one is refused with its
stable code, no payload runs, and the API and the worker are still there and still scan."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import hostile
from tests.support.hostile_requests import RequestCase, error_code, request_cases, send
from tests.support.hostile_service import STACK_ENV, Outcome, alive, round1, run_cases
from tests.support.stack import Stack, ensure_services

CASES = hostile.corpus()
REQUESTS = request_cases()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("hostile-stack"), "sqlite-filesystem", env=STACK_ENV)
    try:
        yield s.serve()
    finally:
        s.close()


@pytest.fixture(scope="module")
def pg_admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """The API alone on PostgreSQL + Redis: it stores what SQLite would not refuse (a NUL)."""
    ensure_services()
    s = Stack(tmp_path_factory.mktemp("hostile-pg"), "postgres-redis", env=STACK_ENV)
    try:
        s.start_api().wait_up()
        with s.client() as c:
            yield c
    finally:
        s.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-work")


@pytest.fixture(scope="module")
def outcomes(admin: httpx.Client, work: Path) -> dict[str, Outcome]:
    """Every case uploaded, the accepted ones scanned, all at once (the scans queue up)."""
    return {o.case.id: o for o in run_cases(admin, [round1(c) for c in CASES], work)}


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.gap)] if c.gap else [])
    for c in CASES])
def test_file_case_is_refused_where_expected(case: hostile.Case,
                                             outcomes: dict[str, Outcome]) -> None:
    o = outcomes[case.id]
    assert not o.ran, "a pickle payload ran"
    assert (o.stage, o.code) == (case.refused_at, case.code)
    if o.stage == "upload":
        assert 400 <= o.status < 500


@pytest.mark.parametrize("backend", ["admin", "pg_admin"], ids=["sqlite", "postgres"])
@pytest.mark.parametrize("case", REQUESTS, ids=[c.id for c in REQUESTS])
def test_request_trick_is_refused(case: RequestCase, backend: str,
                                  request: pytest.FixtureRequest) -> None:
    r = send(request.getfixturevalue(backend), case)
    assert (r.status_code, error_code(r)) == (case.status, case.code), r.text[:300]


def test_the_api_and_the_worker_survive_and_still_scan(stack: Stack, admin: httpx.Client,
                                                       outcomes: dict[str, Outcome],
                                                       work: Path) -> None:
    assert len(outcomes) == len(CASES)
    assert all(p.poll() is None for p in stack.procs.values())
    assert list(alive(admin, work)) == []
    assert not any(o.ran for o in outcomes.values())
