"""``Idempotency-Key``: a retried POST returns the scan (or merge) the key first made; the key is
bound to the body it came with, so the same key with another body is refused (422), as Stripe and
the IETF Idempotency-Key draft do."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel
from sqlalchemy import select

from mergeshield.errors import IdempotencyKeyReusedError
from service.auth import Principal
from worker.db import Database, Scan


def by_idempotency(db: Database, caller: Principal, key: str,
                   fingerprint: str | None = None) -> Scan | None:
    """The caller's scan made with ``key``; one made from another body (``fingerprint``: its
    ``body_sha256``) is refused, as Stripe and the IETF Idempotency-Key draft do."""
    with db.session() as s:
        scan = s.scalars(select(Scan).where(Scan.owner == caller.id,
                                            Scan.idempotency_key == key)).first()
    stored = scan.request.get("body_sha256") if scan is not None else None
    if fingerprint is not None and stored is not None and stored != fingerprint:
        raise IdempotencyKeyReusedError(
            "this Idempotency-Key was already used with a different request body; use a new "
            "key for a new scan, or resend the first body unchanged",
            details={"idempotency_key": key, "scan": scan.id if scan else None})
    return scan


def body_sha256(body: BaseModel) -> str:
    """The request body, canonical, hashed: what an Idempotency-Key is bound to."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
