"""``/v1/watches``: which Hub repos the webhook scans, against which base, with which options;
or which merge plan it re-runs when one of the plan's repos gets a new commit (``merge``).

Each key manages its own watches (the admin sees all). A watch's secret is stored as a sha256
digest and never shown again; its callback URL is checked like a scan's. A watched plan is
checked as ``POST /v1/merges`` checks one, and names hub ids only: a Hub commit triggers it, and
an upload is no hub repo. It is stored as checked (``Watch.merge``), the repos whose new commits
re-run it listed in ``repo``; a plan whose every entry names a revision other than ``main`` would
never run and is refused. ``service/hub_events.py`` says how a commit re-runs it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select

from mergeshield.errors import ConfigError, NotFoundError
from service.auth import Principal, verified_caller
from service.hub_events import secret_hash, watched_repos
from service.routes.merges import UPLOAD_REF, checked_plan
from service.schemas import HUB_ID, WatchCreate, WatchOut
from worker import callbacks
from worker.db import Database, Scan, Watch

router = APIRouter(prefix="/v1/watches", tags=["webhooks"])
Caller = Annotated[Principal, Depends(verified_caller)]
PREFIX = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}(/[A-Za-z0-9_.\-]{0,96})?$"


@router.post("", status_code=201, response_model=WatchOut)
def create(body: WatchCreate, request: Request, caller: Caller) -> WatchOut:
    """A scan's watch (``repo`` and ``scan``) or a plan's (``merge`` alone): 422
    ``invalid_config`` for a bad repo id, a bad plan or one naming an upload."""
    plan = None if body.merge is None else _watched_plan(body)
    if plan is None:
        if body.repo is None or body.scan is None:
            raise ConfigError("a watch needs repo and scan, or a merge plan (merge) instead",
                              details={"field": "scan" if body.repo else "repo"})
        if not re.match(PREFIX if body.prefix else HUB_ID, body.repo):
            raise ConfigError(f"{body.repo!r} is not a hub repo id" +
                              (" prefix" if body.prefix else " (owner/name)"),
                              details={"repo": body.repo})
    if body.callback_url is not None:
        callbacks.check_url(body.callback_url, request.app.state.settings.callback_allow_private)
    row = Watch(owner=caller.id, prefix=body.prefix, merge=plan,
                repo=body.repo if plan is None else ", ".join(watched_repos(plan))[:200],
                scan=None if body.scan is None else body.scan.model_dump(mode="json"),
                callback_url=body.callback_url, open_discussion=body.open_discussion,
                secret_hash=secret_hash(body.secret) if body.secret else None,
                rate_limit=body.rate_limit, rate_window=body.rate_window)
    db: Database = request.app.state.db
    with db.session() as s:
        s.add(row)
    return _out(row)


@router.get("", response_model=list[WatchOut])
def list_watches(request: Request, caller: Caller) -> list[WatchOut]:
    """Oldest first; a plan's watch names the newest merge it queued (``last_merge``)."""
    db: Database = request.app.state.db
    rows = watches_of(db, caller)
    last = last_merges(db, rows)
    return [_out(r, last.get(r.id)) for r in rows]


@router.get("/{watch_id}", response_model=WatchOut)
def get_watch(watch_id: str, request: Request, caller: Caller) -> WatchOut:
    row = _owned(request, caller, watch_id)
    return _out(row, last_merges(request.app.state.db, [row]).get(row.id))


# --- reading watches (also the dashboard's)


def watches_of(db: Database, caller: Principal) -> list[Watch]:
    """The caller's watches (the admin's: all), oldest first."""
    where = [] if caller.admin else [Watch.owner == caller.id]
    with db.session() as s:
        return list(s.scalars(select(Watch).where(*where).order_by(Watch.created_at)).all())


def last_merges(db: Database, rows: list[Watch]) -> dict[str, Scan]:
    """The newest merge each plan's watch queued, by watch id (``queue_merge`` writes the watch
    into the merge's request); a watch that has queued none is absent. Two watches of one key
    with the same plan and callback share each push's one merge, which names the first."""
    found = {}
    with db.session() as s:
        for w in rows:
            merge = None if w.merge is None else s.scalars(
                select(Scan).where(Scan.kind == "merge", Scan.owner == w.owner,
                                   Scan.request["watch"].as_string() == w.id)
                .order_by(Scan.created_at.desc()).limit(1)).first()
            if merge is not None:
                found[w.id] = merge
    return found


@router.delete("/{watch_id}", status_code=204)
def delete(watch_id: str, request: Request, caller: Caller) -> None:
    row = _owned(request, caller, watch_id)
    db: Database = request.app.state.db
    with db.session() as s:
        current = s.get(Watch, row.id)
        if current is not None:
            s.delete(current)


def _watched_plan(body: WatchCreate) -> dict[str, Any]:
    """The plan as ``POST /v1/merges`` checks it, hub ids only; nothing else of a scan's watch."""
    given = [f for f in ("repo", "scan", "open_discussion") if getattr(body, f)]
    if given or body.prefix:
        raise ConfigError(f"a plan's watch matches the plan's repos and scans as the plan says: "
                          f"leave out {', '.join(given) or 'prefix'}",
                          details={"field": (given or ["prefix"])[0]})
    assert body.merge is not None
    plan = checked_plan(body.merge)
    for name in (plan.base_model, *(m.model for m in plan.models)):
        if UPLOAD_REF.match(name):
            raise ConfigError(f"merge: {name!r} is an upload; a watched plan names hub ids only "
                              "(a Hub commit re-runs it)", details={"field": "merge"})
    checked = plan.model_dump(mode="json")
    if not watched_repos(checked):
        raise ConfigError("merge: every model and the base name a revision other than main, so "
                          "no Hub commit would re-run the plan; name one without a revision (or "
                          "at @main) to follow its new commits", details={"field": "merge"})
    return checked


def _owned(request: Request, caller: Principal, watch_id: str) -> Watch:
    db: Database = request.app.state.db
    with db.session() as s:  # a NUL never names a row, and PostgreSQL refuses it in a query
        row = None if "\x00" in watch_id else s.get(Watch, watch_id)
    if row is None or not (caller.admin or row.owner == caller.id):
        raise NotFoundError(f"no watch {watch_id!r}", details={"watch": watch_id})
    return row


def _out(row: Watch, last_merge: Scan | None = None) -> WatchOut:
    return WatchOut(id=row.id, repo=row.repo, prefix=row.prefix, scan=row.scan, merge=row.merge,
                    last_merge=None if last_merge is None else last_merge.id,
                    callback_url=row.callback_url, open_discussion=row.open_discussion,
                    has_secret=row.secret_hash is not None,
                    rate_limit=row.rate_limit, rate_window=row.rate_window,
                    created_at=row.created_at)
