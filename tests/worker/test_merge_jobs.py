"""A merge is a job of the scans table (worker/merge_jobs.py): its plan's uploads are named by
their labels before it runs, kept by the retention cleanup while it is queued, and its callback
is a ``merge.*`` event. The whole run is tests/service/test_merges.py's."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from mergeshield.merge_plan_schema import MergePlan
from mergeshield.settings import Settings
from worker.callbacks import scan_event
from worker.cleanup import cleanup
from worker.db import Database, Scan, Upload, now
from worker.merge_jobs import library_plan

UPLOAD = "a" * 32
PLAN = MergePlan.parse({
    "merge_method": "task_arithmetic", "base_model": "zoo/base@main",
    "models": [{"model": f"upload:{UPLOAD}"}, {"model": "zoo/other"}],
    "mergeshield": {"evaluation": {f"upload:{UPLOAD}": "mnist5k"}}}).model_dump(mode="json")


def _merge(make_scan: Callable[..., Scan], db: Database, **values: object) -> Scan:
    return make_scan(db, kind="merge", request={"plan": PLAN, "uploads": [UPLOAD]}, **values)


def test_a_plans_upload_is_named_by_its_label_and_read_from_its_file(
        db: Database, make_scan: Callable[..., Scan], tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    with db.session() as s:
        s.add(Upload(id=UPLOAD, owner="alice", filename="bad.zip", kind="archive", size=1,
                     sha256="b" * 64, path="uploads/x/model"))
    plan, sources = library_plan(db, _merge(make_scan, db), settings)
    label = f"upload:bad.zip ({UPLOAD}, sha256 {'b' * 64})"
    assert [m.model for m in plan.models] == [label, "zoo/other"]
    assert plan.mergeshield.evaluation == {label: "mnist5k"} and plan.base_model == "zoo/base@main"
    assert sources == {label: str(tmp_path / "uploads/x/model")}  # the path: only here


def test_a_queued_merges_upload_outlives_its_retention(
        db: Database, make_scan: Callable[..., Scan], tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, upload_retention=60)
    with db.session() as s:
        s.add(Upload(id=UPLOAD, owner="alice", filename="bad.zip", kind="archive", size=1,
                     sha256="b" * 64, path="uploads/x/model",
                     created_at=now() - timedelta(hours=1)))
    _merge(make_scan, db)
    assert cleanup(db, settings).removed_uploads == []


def test_a_merges_callback_is_a_merge_event(db: Database,
                                            make_scan: Callable[..., Scan]) -> None:
    merge = _merge(make_scan, db, state="succeeded", summary={"merged": 2})
    event = scan_event(merge)
    assert event["type"] == "merge.succeeded"
    assert event["data"]["models"] == [f"upload:{UPLOAD}", "zoo/other"]
    assert event["data"]["links"]["checkpoint"] == f"/v1/merges/{merge.id}/checkpoint"
