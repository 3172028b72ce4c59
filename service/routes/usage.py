"""``/v1/usage``: what the calling key uses of its quotas (see ``service.quotas``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from service import quotas
from service.auth import Principal, verified_caller
from service.schemas import UsageOut

router = APIRouter(prefix="/v1/usage", tags=["keys"])
Caller = Annotated[Principal, Depends(verified_caller)]


@router.get("", response_model=UsageOut)
def get_usage(request: Request, caller: Caller) -> UsageOut:
    """The calling key's scans queued or running and bytes of uploads stored, with its limits
    (null: no limit; admin keys have none)."""
    settings = request.app.state.settings
    used = quotas.usage(request.app.state.db, caller.id)

    def limit(value: int) -> int | None:
        return None if caller.admin or value <= 0 else value

    return UsageOut(key=caller.id, admin=caller.admin, active_scans=used.active_scans,
                    max_active_scans=limit(settings.key_max_active_scans),
                    stored_bytes=used.stored_bytes, uploads=used.uploads,
                    max_stored_bytes=limit(settings.key_max_stored_bytes))
