"""A merge plan's run, as a worker lives it (issue 17): the plan through the library.

Design: a merge is a job of the scans table (``Scan.kind`` "merge", its plan stored as the
request), not a table of its own, because everything around a job is the same for both: the one
Celery task claims it, beats for it and dispatches on its kind; the reconciler re-sends and
re-queues it; DELETE/cancel, the quotas, the result callbacks and the retention cleanup read the
same rows. What a merge adds is this module (how it runs and what it records) and its routes
(``service/routes/merges.py``); the library does the work (``mergeshield.merge_plan``).

An upload named in a plan (``upload:<id>``) is renamed to its label (file name, id, sha256) before
the plan runs, so the plan report, the scans' reports and the merge's ``__metadata__`` name it as
a scan's outputs do, never by where the server keeps it (``PlanContext.sources`` maps the label to
the file).
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import torch
from sqlalchemy import select

from mergeshield.errors import SourceNotFoundError
from mergeshield.merge_plan import run_plan
from mergeshield.merge_plan_schema import MergePlan, PlanReport
from mergeshield.plan_context import PlanContext, resolve
from mergeshield.settings import Settings
from worker import jobs
from worker.bv_guard import BvGuard
from worker.db import Database, Scan, Upload
from worker.limits import guard_device

log = logging.getLogger("mergeshield.worker")
PLAN_REPORT = "plan-report.json"  # the CLI's name for it, beside the merged model
UPLOAD_PREFIX = "upload:"


def run(job: jobs.Job, settings: Settings, bv_guard: BvGuard | None = None) -> None:
    """Scan every model of the plan, merge and measure, then record the outcome."""
    merge = job.scan
    out = jobs.result_dir(settings.scans_dir, merge.id)
    with jobs.recorded(job, settings, out):
        with jobs.working(job, settings):
            job.report("resolve", 0.0)
            plan, sources = library_plan(job.db, merge, settings)
            requested = merge.request.get("device", "auto")
            ctx = PlanContext(
                out_dir=out, cache_dir=settings.cache_dir, device="cpu" if requested == "cpu"
                else settings.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                hub={"token": settings.token(), "endpoint": settings.hf_endpoint},
                progress=lambda stage, pct: job.report(stage, pct, urgent=False),
                sources=sources, allowed_roots=(settings.uploads_dir,),
                min_free_bytes=settings.min_free_bytes, bv_guard=bv_guard)
            if ctx.device and ctx.device.startswith("cuda"):
                # the GPU guard of a scan, for the plan's largest scan: a fine-tune and the
                # base (a plan's fine-tunes have the base's shapes; others are refused)
                base = resolve(plan.base_model, ctx)
                ctx.device = guard_device(ctx.device, requested, 2 * sum(
                    p.stat().st_size for p in base.tensor_files), settings.gpu_memory_factor)
                if not ctx.device.startswith("cuda"):
                    log.warning("too little free GPU memory: the merge runs on the CPU")
            if out.exists():  # a retry overwrites its own output, nothing else
                shutil.rmtree(out)
            report = run_plan(plan, ctx)
            (out / PLAN_REPORT).write_text(report.model_dump_json(indent=2))
        job.finish("succeeded", verdict=verdict(report), result_dir=str(
            out.relative_to(settings.data_dir)), summary=summary(report), percent=100.0)
        log.info("merge succeeded", extra={"verdict": verdict(report)})


def library_plan(db: Database, merge: Scan, settings: Settings
                 ) -> tuple[MergePlan, dict[str, str]]:
    """The stored plan with each upload named by its label, and where each label's file is."""
    ids = list(merge.request.get("uploads", []))
    with db.session() as s:
        found = {u.id: u for u in s.scalars(select(Upload).where(Upload.id.in_(ids)))}
    names: dict[str, str] = {}
    sources: dict[str, str] = {}
    for upload_id in ids:
        upload = found.get(upload_id)
        if upload is None:
            raise SourceNotFoundError(f"the plan's upload {upload_id} no longer exists; upload "
                                      "it again", details={"upload": upload_id})
        label = jobs.upload_label(upload)
        names[UPLOAD_PREFIX + upload_id] = label
        sources[label] = str(settings.data_dir / upload.path)
    return MergePlan.parse(renamed(merge.request["plan"], names)), sources


def renamed(plan: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """A plan (as stored: plain data) with its model names replaced by ``names``."""
    options = dict(plan.get("mergeshield") or {})
    options["evaluation"] = {names.get(k, k): v for k, v in
                             (options.get("evaluation") or {}).items()}
    return {**plan, "base_model": names.get(plan["base_model"], plan["base_model"]),
            "models": [{**m, "model": names.get(m["model"], m["model"])}
                       for m in plan["models"]],
            "mergeshield": options}


def verdict(report: PlanReport) -> str:
    """The merge's verdict for lists: the worst of its models' scans."""
    found = {m.verdict for m in report.models}
    return next((v for v in ("backdoor_suspected", "inconclusive") if v in found),
                "no_backdoor_found")


def summary(report: PlanReport) -> dict[str, Any]:
    """What lists and callbacks show of a finished merge."""
    return {"models": len(report.models),
            "merged": sum(m.merged_as != "excluded" for m in report.models),
            "flagged": [m.model for m in report.models if m.verdict == "backdoor_suspected"],
            "policy": report.policy, "method": report.merge.get("method"),
            "scale": report.defence.scale if report.defence else None}
