"""``/v1/keys``: API keys, for the admin. A key's secret is shown once, when it is made."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select, update

from mergeshield.errors import NotFoundError
from service.auth import KeyCache, Principal, create_key, verified_caller
from service.schemas import KeyCreate, KeyOut
from worker.db import ApiKey, Database, now

router = APIRouter(prefix="/v1/keys", tags=["keys"])
Caller = Annotated[Principal, Depends(verified_caller)]


@router.post("", status_code=201, response_model=KeyOut)
def create(body: KeyCreate, request: Request, caller: Caller) -> KeyOut:
    caller.require_admin()
    row, key = create_key(request.app.state.db, body.name, body.admin)
    return _out(row, key)


@router.get("", response_model=list[KeyOut])
def list_keys(request: Request, caller: Caller) -> list[KeyOut]:
    caller.require_admin()
    db: Database = request.app.state.db
    with db.session() as s:
        return [_out(r) for r in s.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()]


@router.delete("/{key_id}", response_model=KeyOut)
def revoke(key_id: str, request: Request, caller: Caller) -> KeyOut:
    caller.require_admin()
    db: Database = request.app.state.db
    with db.session() as s:
        s.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                  .values(revoked_at=now()))
        row = s.get(ApiKey, key_id)
    keys: KeyCache = request.app.state.keys
    keys.forget(key_id)  # committed: the next request with it is looked up, and refused
    if row is None:
        raise NotFoundError(f"no key {key_id!r}", details={"key": key_id})
    return _out(row)


def _out(row: ApiKey, key: str | None = None) -> KeyOut:
    return KeyOut(id=row.id, name=row.name, prefix=row.prefix, admin=row.is_admin,
                  created_at=row.created_at, revoked_at=row.revoked_at, key=key)
