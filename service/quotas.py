"""Per-key quotas: scans queued or running at once (429) and bytes of uploads stored (413).

Admin keys are exempt (the settings' admin key, keys made with ``admin: true``, and the local
owner when authentication is off): they operate the service and are not the tenants a quota
protects it from. Usage is counted from the database on each request, so it is right after a
restart, a cleanup or a scan that finished; two requests racing in at the same moment may pass
a limit by one scan (or one upload) between them.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from mergeshield.errors import QuotaExceededError, StorageQuotaError
from mergeshield.settings import Settings
from service.auth import Principal
from worker.db import FINISHED, Database, Scan, Upload


@dataclass(frozen=True)
class Usage:
    active_scans: int  # queued or running
    stored_bytes: int  # the key's uploads
    uploads: int


_ACTIVE = select(func.count()).select_from(Scan).where(Scan.state.not_in(FINISHED))


def usage(db: Database, owner: str) -> Usage:
    with db.session() as s:
        active = s.scalar(_ACTIVE.where(Scan.owner == owner)) or 0
        count, stored = s.execute(select(func.count(), func.coalesce(func.sum(Upload.size), 0))
                                  .where(Upload.owner == owner)).one()
    return Usage(int(active), int(stored), int(count))

def check_scans(db: Database, settings: Settings, caller: Principal) -> None:
    """Refuse one more scan when the key already has its limit queued or running."""
    limit = settings.key_max_active_scans
    if caller.admin or limit <= 0:
        return
    with db.reading() as conn:  # the scans alone: a submission has no use for the uploads' sum
        active = conn.execute(_ACTIVE.where(Scan.owner == caller.id)).scalar_one()
    if active >= limit:
        raise QuotaExceededError(
            f"quota exceeded: concurrent scans — this key has {active} scans queued or running "
            f"and may have {limit}; wait for one to finish or cancel one, then retry",
            details={"quota": "active_scans", "limit": limit, "used": active})


@dataclass(frozen=True)
class StoredBytes:
    """A key's stored-bytes quota as it stood when an upload began."""

    limit: int
    used: int

    def check(self, adding: int) -> None:
        """Refuse an upload of ``adding`` bytes that would take the key past its limit."""
        if self.used + adding > self.limit:
            raise StorageQuotaError(
                f"quota exceeded: stored bytes — this key stores {self.used} bytes of uploads "
                f"and may store {self.limit}; this upload needs {adding} more (at least). "
                "Uploads no scan uses are removed after the retention period; retry then, or "
                "ask for a larger quota",
                details={"quota": "stored_bytes", "limit": self.limit, "used": self.used,
                         "adding": adding})


def stored_bytes(db: Database, settings: Settings, caller: Principal) -> StoredBytes | None:
    """The caller's stored-bytes quota; None when it has none (admin, or no limit set)."""
    limit = settings.key_max_stored_bytes
    if caller.admin or limit <= 0:
        return None
    return StoredBytes(limit, usage(db, caller.id).stored_bytes)
