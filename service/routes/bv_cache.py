"""``/v1/bv-cache``: the injection-BV cache, for the admin: what is cached per base model (recipe,
when built, its own ASR) and what is being built now. Read-only; no tensor is opened."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from mergeshield import bv_cache
from service.auth import Principal, verified_caller
from service.schemas import BvCacheOut
from worker.db import BvCacheEntry, Database

router = APIRouter(prefix="/v1/bv-cache", tags=["bv-cache"])
Caller = Annotated[Principal, Depends(verified_caller)]


@router.get("", response_model=list[BvCacheOut])
async def list_entries(request: Request, caller: Caller) -> list[BvCacheOut]:
    """Cached BV_inj entries, newest first, then those being built (admin only: the cache is
    shared by every key's scans)."""
    caller.require_admin()
    return await run_in_threadpool(entries, request)


def entries(request: Request) -> list[BvCacheOut]:
    db: Database = request.app.state.db
    with db.session() as s:
        rows = {r.key: r for r in s.scalars(select(BvCacheEntry)).all()}
    out = []
    for entry in bv_cache.entries(request.app.state.settings.cache_dir):
        row = rows.pop(entry.key, None)
        out.append(BvCacheOut(**entry.model_dump(), state="ready",
                              scan=row.scan_id if row else None))
    for row in rows.values():  # in the database but not (yet) on disk
        state: Literal["building", "missing"] = "building" if row.state == "building" \
            else "missing"
        out.append(BvCacheOut(key=row.key, state=state, scan=row.scan_id,
                              built_at=row.created_at.isoformat(timespec="seconds")))
    return out
