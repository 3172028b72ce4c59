"""The dashboard's watches page: what each Hub webhook watch does. A scan's watch scans every new
``main`` commit of its repos; a plan's watch (issue 17) re-runs its merge plan, and the page says
so: which repos' commits re-run it, which of the plan's entries follow ``main`` and which stay at
their revision (``service/hub_events.py``), and a link to the newest merge it queued. It reads
the same functions as ``/v1/watches`` (``routes.watches``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response

from mergeshield.merge_plan_schema import split_revision
from service.dashboard.pages import _page, _signin, _viewer
from service.hub_events import follows_main, watched_repos
from service.routes import watches
from worker.db import Scan, Watch

router = APIRouter(prefix="/ui/watches", include_in_schema=False)


@dataclass(frozen=True)
class Entry:
    """One model or the base of a watched plan, and what a push to its repo's main does to it."""

    role: str  # "base" or "model"
    name: str  # as the plan writes it
    follows: bool  # pinned at each new main commit of its repo
    revision: str | None  # where it stays otherwise (a commit sha, a tag, a branch)


@dataclass(frozen=True)
class Row:
    watch: Watch
    repos: list[str]  # a plan's watch: the repos whose new main commit re-runs it
    entries: list[Entry]
    last_merge: Scan | None


@router.get("", response_model=None)
def watch_list(request: Request) -> Response:
    caller = _viewer(request)
    if caller is None:
        return _signin(request)
    db = request.app.state.db
    rows = watches.watches_of(db, caller)
    last = watches.last_merges(db, rows)
    return _page(request, "watches.html", caller,
                 watches=[_row(w, last.get(w.id)) for w in rows])


def _row(watch: Watch, last_merge: Scan | None) -> Row:
    if watch.merge is None:
        return Row(watch, [], [], None)
    plan: dict[str, Any] = watch.merge
    named = [("base", plan["base_model"]), *(("model", m["model"]) for m in plan["models"])]
    return Row(watch, watched_repos(plan),
               [Entry(role, name, follows_main(name), split_revision(name)[1])
                for role, name in named], last_merge)
