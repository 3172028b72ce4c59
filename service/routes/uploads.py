"""``/v1/uploads``: model files and archives, streamed to disk; their ids go into scans."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from mergeshield.errors import NotFoundError
from service import quotas, uploads
from service.auth import Principal, verified_caller
from service.schemas import UploadOut
from worker.db import Database, Upload

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])
Caller = Annotated[Principal, Depends(verified_caller)]


@router.post("", status_code=201, response_model=UploadOut, openapi_extra={
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary"}}}}}}})
async def upload(request: Request, caller: Caller) -> UploadOut:
    """Upload a ``.safetensors`` or ``.bin`` file, or a zip/tar of a HF-layout folder (multipart
    field ``file``). The same bytes uploaded twice give the same upload. Refused over the size
    limit or the key's stored-bytes quota (413), when the disk would get too full (507), or
    when the body stalls (408)."""
    settings = request.app.state.settings
    quota = await run_in_threadpool(quotas.stored_bytes, request.app.state.db, settings, caller)
    got = await uploads.receive(request, settings, quota)
    row = await run_in_threadpool(uploads.store, request.app.state.db, settings, caller.id, got)
    return _out(row)


@router.get("", response_model=list[UploadOut])
def list_uploads(request: Request, caller: Caller) -> list[UploadOut]:
    db: Database = request.app.state.db
    with db.session() as s:
        rows = s.scalars(select(Upload).where(Upload.owner == caller.id)
                         .order_by(Upload.created_at.desc()).limit(500)).all()
    return [_out(r) for r in rows]


@router.get("/{upload_id}", response_model=UploadOut)
def get_upload(upload_id: str, request: Request, caller: Caller) -> UploadOut:
    db: Database = request.app.state.db
    with db.session() as s:
        row = None if "\x00" in upload_id else s.get(Upload, upload_id)  # PostgreSQL: no NUL
    if row is None or row.owner != caller.id:
        raise NotFoundError(f"no upload {upload_id!r}", details={"upload": upload_id})
    return _out(row)


def _out(row: Upload) -> UploadOut:
    return UploadOut(id=row.id, filename=row.filename, kind=row.kind, size=row.size,
                     sha256=row.sha256, created_at=row.created_at)
