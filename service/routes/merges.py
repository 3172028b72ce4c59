"""``/v1/merges``: a mergekit plan scanned, defended and merged (issue 17), as a job like a scan.

A merge is a row of the scans table (``kind`` "merge"; ``worker/merge_jobs.py`` says why), so it is
queued, followed, cancelled, called back and counted by the quotas as a scan is. Here the plan is
validated: first as the library parses it (``MergePlan.parse``: what cannot be merged exactly is
refused), then what a service adds: models are hub ids or the caller's uploads, never paths;
datasets are names; the scans' options have the API's bounds. Every refusal is a 4xx with a stable
code before anything is queued. No tensor is touched here.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import yaml
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import FileResponse
from pydantic import ValidationError
from starlette.datastructures import State

from mergeshield.data import check_dataset_name
from mergeshield.errors import (
    ConfigError,
    ConflictError,
    IdempotencyKeyReusedError,
    NotFoundError,
    SourceNotFoundError,
)
from mergeshield.merge_plan_schema import MergePlan, PlanReport, split_revision
from service import quotas
from service.auth import Principal, verified_caller
from service.idempotency import body_sha256, by_idempotency
from service.paging import Limit, Offset, page
from service.routes.scans import (
    cancel_job,
    finished_job,
    gpu_workers,
    job_dir,
    owned_job,
    persist_once,
    zipped,
)
from service.schemas import DATASET, HUB_ID, MergeCreate, MergeOut, MergePage, ScanOptions
from worker import callbacks
from worker.app import choose_queue
from worker.db import Database, Scan, Upload, new_id, now
from worker.merge_jobs import PLAN_REPORT, UPLOAD_PREFIX

router = APIRouter(prefix="/v1/merges", tags=["merges"])
Caller = Annotated[Principal, Depends(verified_caller)]
UPLOAD_REF = re.compile(rf"^{UPLOAD_PREFIX}([0-9a-f]{{32}})$")
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's when installed
MAX_DEPTH = 64  # brackets nested in a plan; a real one has three or four
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


@router.post("", status_code=202, response_model=MergeOut)
def submit(body: MergeCreate, request: Request, response: Response, caller: Caller,
           idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> MergeOut:
    """Queue a merge plan: every model scanned against the base, the merge of what the policy
    keeps written and measured per task (``mergeshield merge-plan``). A plan that cannot be
    merged exactly, names a path, an unknown dataset or options out of bounds is a 422
    ``invalid_config``; another key's upload a 404. ``Idempotency-Key`` as for scans."""
    return merge_out(queue_merge(request.app.state, caller, body, idempotency_key), response)


def queue_merge(state: State, caller: Principal, body: MergeCreate,
                idempotency_key: str | None = None, watch: str | None = None) -> Scan:
    """Validate, persist and enqueue one merge (this route, the dashboard's form, and a watch's
    re-run: ``watch`` names it in the request, for the watch's last merge)."""
    db: Database = state.db
    settings = state.settings
    fingerprint = body_sha256(body)
    if idempotency_key and (same := by_idempotency(db, caller, idempotency_key,
                                                   fingerprint)) is not None:
        if same.kind != "merge":  # a scan's key (from before keys were bound to bodies)
            raise IdempotencyKeyReusedError(
                "this Idempotency-Key was already used for a scan; use a new key for a merge",
                details={"idempotency_key": idempotency_key, "scan": same.id})
        return same
    quotas.check_scans(db, settings, caller)
    plan = checked_plan(body.plan)
    uploads = _uploads(db, caller, plan)
    endpoint = None if body.callback_url is None else callbacks.endpoint_for(
        db, caller.id, body.callback_url, settings.callback_allow_private)
    sizes = [uploads[m].size if m in uploads else None
             for m in (plan.base_model, *(m.model for m in plan.models))]
    merge = Scan(kind="merge", owner=caller.id,
                 request={"plan": plan.model_dump(mode="json"),
                          "uploads": sorted(u.id for u in uploads.values()),
                          "device": body.device, "body_sha256": fingerprint,
                          **({"watch": watch} if watch else {})},
                 suspect=", ".join(m.model for m in plan.models)[:300],
                 base=plan.base_model[:300],
                 queue=choose_queue(body.device, sizes, settings.gpu_route_min_bytes,
                                    lambda: gpu_workers(db, settings.stale_after)),
                 idempotency_key=idempotency_key, enqueued_at=now(), id=new_id())
    return persist_once(state, merge, endpoint, caller, idempotency_key, fingerprint)[0]


@router.get("", response_model=MergePage)
def list_merges(request: Request, caller: Caller, state: JobState | None = None,
                limit: Limit = 50, offset: Offset = 0) -> MergePage:
    """Newest first; filter by state."""
    return merges_page(request.app.state.db, caller, state, limit, offset)


def merges_page(db: Database, caller: Principal, state: str | None, limit: int, offset: int
                ) -> MergePage:
    where = [Scan.kind == "merge"] + ([] if caller.admin else [Scan.owner == caller.id])
    if state:
        where.append(Scan.state == state)
    total, rows = page(db, Scan, where, Scan.created_at, limit, offset)
    return MergePage(items=[merge_out(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{merge_id}", response_model=MergeOut)
def get_merge(merge_id: str, request: Request, response: Response, caller: Caller) -> MergeOut:
    """State, stage and percent; once it succeeded, its plan report (``report``)."""
    merge = owned(request.app.state.db, caller, merge_id)
    return merge_out(merge, response, plan_report(request.app.state, merge))


@router.post("/{merge_id}/cancel", response_model=MergeOut)
def cancel(merge_id: str, request: Request, response: Response, caller: Caller) -> MergeOut:
    """Cancel a queued or running merge: a running one stops within seconds, as a scan does, and
    its partial output is removed. 409 once it has finished."""
    db = request.app.state.db
    cancel_job(request.app.state, owned(db, caller, merge_id))
    return merge_out(owned(db, caller, merge_id), response)


@router.get("/{merge_id}/report", response_class=FileResponse,
            responses={200: {"content": {"application/json": {}}}})
def report(merge_id: str, request: Request, caller: Caller) -> FileResponse:
    """``plan-report.json``: each model's verdict and how it entered the merge, each task's
    accuracy and each found trigger's ASR alone / undefended / merged / without the flagged
    models, the γ chosen."""
    folder = job_dir(request.app.state, _finished(request.app.state.db, caller, merge_id))
    return FileResponse(folder / PLAN_REPORT, media_type="application/json",
                        filename=f"{merge_id}-{PLAN_REPORT}", content_disposition_type="inline")


@router.get("/{merge_id}/checkpoint", response_class=FileResponse)
def checkpoint(merge_id: str, request: Request, caller: Caller,
               layout: Literal["zip", "file"] = "zip") -> FileResponse:
    """The merged model: a zip of its HF-layout folder (the undefended merge and the scans'
    outputs are not in it), or (``layout=file``) its one ``.safetensors`` file."""
    folder = job_dir(request.app.state, _finished(request.app.state.db, caller, merge_id))
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:  # a merge that succeeded wrote one; an older layout would not
        raise NotFoundError("this merge wrote no model", details={"merge": merge_id})
    if layout == "file":
        if len(weights) != 1:
            raise ConflictError("the merged model is sharded: download layout=zip",
                                details={"files": [w.name for w in weights]})
        return FileResponse(weights[0], media_type="application/octet-stream",
                            filename=f"{merge_id}-{weights[0].name}")
    return FileResponse(zipped(folder, reports=(PLAN_REPORT,)), media_type="application/zip",
                        filename=f"{merge_id}-merged.zip")


# --- the plan's checks


def checked_plan(raw: str | dict[str, Any]) -> MergePlan:
    """The plan, parsed and checked as the library does and as a service must (see above)."""
    plan = MergePlan.parse(_yaml(raw) if isinstance(raw, str) else raw, "plan")
    for where, name in (("base_model", plan.base_model),
                        *((f"models.{i}.model", m.model) for i, m in enumerate(plan.models))):
        if not (UPLOAD_REF.match(name) or re.match(HUB_ID, split_revision(name)[0])):
            raise ConfigError(
                f"plan.{where}: {name[:200]!r} is neither a hub id (org/name, or "
                "org/name@revision) nor an upload (upload:<id> from POST /v1/uploads); this "
                "service reads no paths of its own", details={"field": where})
    models = {m.model for m in plan.models}
    for model, dataset in plan.mergeshield.evaluation.items():
        where = f"mergeshield.evaluation.{model[:200]}"
        if model not in models:
            raise ConfigError(f"plan.{where}: not a model of the plan",
                              details={"field": where})
        if not re.match(DATASET, dataset):
            raise ConfigError(f"plan.{where}: {dataset[:200]!r} is not a dataset name (a "
                              "bundled name or a hub dataset id)", details={"field": where})
        try:
            check_dataset_name(dataset)
        except SourceNotFoundError as exc:
            raise ConfigError(f"plan.{where}: {exc.message}", details={"field": where}) from None
    try:
        ScanOptions.model_validate(plan.mergeshield.scan)
    except ValidationError as exc:
        raise ConfigError.listing("plan.mergeshield.scan", exc) from None
    return plan


def _yaml(text: str) -> Any:
    """Plain YAML data: no tags that construct objects, no aliases (a few bytes of aliases can
    expand to gigabytes of plan), no deep nesting (pure-Python PyYAML takes minutes over 100 kB
    of brackets; libyaml, used when present, refuses it at once)."""
    depth = deepest = 0
    for c in text:
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    if deepest > MAX_DEPTH:
        raise ConfigError(f"plan: nested more than {MAX_DEPTH} deep", details={"field": "plan"})
    try:
        if any(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, SAFE_LOADER)):
            raise ConfigError("plan: YAML aliases (*name) are not accepted; write the values "
                              "out", details={"field": "plan"})
        return yaml.load(text, SAFE_LOADER)  # a safe loader: plain data only
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(f"plan: not YAML ({str(exc)[:300]})",
                          details={"field": "plan"}) from None


def _uploads(db: Database, caller: Principal, plan: MergePlan) -> dict[str, Upload]:
    """The plan's uploads by name (``upload:<id>``): each must be the caller's (404 otherwise)."""
    found = {}
    with db.session() as s:
        for name in (plan.base_model, *(m.model for m in plan.models)):
            if (ref := UPLOAD_REF.match(name)) is not None and name not in found:
                row = s.get(Upload, ref[1])
                if row is None or row.owner != caller.id:
                    raise NotFoundError(f"no upload {ref[1]!r}", details={"upload": ref[1]})
                found[name] = row
    return found


# --- reading merges (also the dashboard's)


def owned(db: Database, caller: Principal, merge_id: str) -> Scan:
    """The merge, if the caller may see it; 404 otherwise (other keys' merges do not exist)."""
    return owned_job(db, caller, merge_id, "merge")


def plan_report(state: State, merge: Scan) -> PlanReport | None:
    """A succeeded merge's plan report; None before, or once retention removed it."""
    if merge.state != "succeeded" or merge.result_dir is None or merge.artifacts_expired_at:
        return None
    path = job_dir(state, merge) / PLAN_REPORT
    try:
        return PlanReport.model_validate_json(path.read_bytes()) if path.is_file() else None
    except ValidationError:  # written by another version: served as a file, not inlined
        return None


def _finished(db: Database, caller: Principal, merge_id: str) -> Scan:
    return finished_job(db, caller, merge_id, "merge", "report and merged model",
                        "submit the plan again to get them")


def merge_out(merge: Scan, response: Response | None = None,
              report: PlanReport | None = None) -> MergeOut:
    if response is not None:
        response.headers["Location"] = f"/v1/merges/{merge.id}"
        if not merge.finished:
            response.headers["Retry-After"] = "2"
    links = {"self": f"/v1/merges/{merge.id}"}
    if merge.state == "succeeded" and merge.artifacts_expired_at is None:
        links |= {"report": f"/v1/merges/{merge.id}/report",
                  "checkpoint": f"/v1/merges/{merge.id}/checkpoint"}
    plan: dict[str, Any] = merge.request.get("plan", {})
    error = {"code": merge.error_code, "message": merge.error_message} \
        if merge.error_code else None
    return MergeOut(
        id=merge.id, state=merge.state, stage=merge.stage,  # type: ignore[arg-type]
        percent=merge.percent, base=plan.get("base_model", merge.base),
        models=[m["model"] for m in plan.get("models", [])],
        method=plan.get("merge_method", ""),
        policy=(plan.get("mergeshield") or {}).get("policy", ""), plan=plan, queue=merge.queue,
        attempts=merge.attempts, created_at=merge.created_at, started_at=merge.started_at,
        finished_at=merge.finished_at, verdict=merge.verdict, error=error,
        summary=merge.summary, artifacts_expired_at=merge.artifacts_expired_at, links=links,
        report=report)
