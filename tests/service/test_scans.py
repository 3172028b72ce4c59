"""service/routes/scans.py: the status poll (``GET /v1/scans/{id}``) reads the columns it shows
in one statement and answers exactly what the ORM row answered."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from mergeshield.errors import NotFoundError
from service.auth import Principal
from service.routes.scans import _out, job_status, owned_job
from worker.db import Database, Scan, now

NO_SUCH = {"suspect": {"hub": "org/suspect"}, "base": {"hub": "org/base"}}


def _user(admin: TestClient) -> tuple[str, dict[str, str]]:
    made = admin.post("/v1/keys", json={"name": "user"}).json()
    return made["id"], {"Authorization": f"Bearer {made['key']}"}


def test_the_status_poll_answers_what_the_row_says(in_process: TestClient) -> None:
    owner, user = _user(in_process)
    scan_id = in_process.post("/v1/scans", json=NO_SUCH, headers=user).json()["id"]
    db: Database = in_process.app.state.db
    t0 = now()
    with db.session() as s:  # a finished scan: every field that _out shows has a value
        s.execute(update(Scan).where(Scan.id == scan_id).values(
            state="succeeded", stage="done", percent=100.0, attempts=1, started_at=t0,
            finished_at=t0 + timedelta(seconds=3), verdict="backdoored", severity="HIGH",
            error_code=None, summary={"asr": [9, 10], "note": "é"}, result_dir="scans/x"))
    got = in_process.get(f"/v1/scans/{scan_id}", headers=user)
    assert got.status_code == 200
    orm = _out(owned_job(db, Principal(owner, admin=False), scan_id, "scan"))
    assert got.json() == orm.model_dump(mode="json")
    assert got.json()["links"]["report"] == f"/v1/scans/{scan_id}/report"
    assert got.headers["location"] == f"/v1/scans/{scan_id}"
    assert "retry-after" not in got.headers  # finished
    queued = in_process.post("/v1/scans", json=NO_SUCH, headers=user)
    polled = in_process.get(queued.headers["location"], headers=user)
    assert polled.headers["retry-after"] == "2" and polled.json()["state"] == "queued"


def test_a_failed_scan_shows_its_error(in_process: TestClient) -> None:
    _owner, user = _user(in_process)
    scan_id = in_process.post("/v1/scans", json=NO_SUCH, headers=user).json()["id"]
    db: Database = in_process.app.state.db
    with db.session() as s:
        s.execute(update(Scan).where(Scan.id == scan_id).values(
            state="failed", error_code="source_not_found", error_message="no repo org/suspect"))
    body: dict[str, Any] = in_process.get(f"/v1/scans/{scan_id}", headers=user).json()
    assert body["error"] == {"code": "source_not_found", "message": "no repo org/suspect"}
    assert "report" not in body["links"]


def test_other_keys_scans_merges_and_bad_ids_are_not_found(in_process: TestClient) -> None:
    _owner, user = _user(in_process)
    _other, other = _user(in_process)
    scan_id = in_process.post("/v1/scans", json=NO_SUCH, headers=user).json()["id"]
    assert in_process.get(f"/v1/scans/{scan_id}", headers=other).status_code == 404
    assert in_process.get(f"/v1/scans/{scan_id}").status_code == 200  # the admin sees all
    for bad in ("0" * 32, "x%00y", "a" * 300):
        r = in_process.get(f"/v1/scans/{bad}", headers=user)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    db: Database = in_process.app.state.db
    with db.session() as s:
        s.execute(update(Scan).where(Scan.id == scan_id).values(kind="merge"))
    assert in_process.get(f"/v1/scans/{scan_id}", headers=user).status_code == 404


def test_job_status_refuses_like_owned_job(in_process: TestClient) -> None:
    db: Database = in_process.app.state.db
    nobody = Principal("nobody", admin=False)
    for job_id in ("0" * 32, "a\x00b"):
        for read in (job_status, owned_job):
            with pytest.raises(NotFoundError):
                read(db, nobody, job_id, "scan")
