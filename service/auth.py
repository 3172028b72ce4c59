"""API keys: ``Authorization: Bearer <key>``, or the dashboard's sign-in cookie holding the same
key (HttpOnly, SameSite=Strict; state-changing requests must come from our own origin). Keys are
stored as sha256 digests; the admin key comes from settings. Each scan and upload belongs to the
key that made it."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request
from sqlalchemy import select

from mergeshield.errors import AuthenticationError, PermissionDeniedError
from worker.db import ApiKey, Database

COOKIE = "mergeshield_key"  # the dashboard's sign-in cookie: the API key itself, HttpOnly
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOCAL = "local"  # the owner of everything when authentication is off (local use)
ADMIN = "admin"  # the owner id of the settings' admin key


@dataclass(frozen=True)
class Principal:
    id: str
    admin: bool

    def require_admin(self) -> None:
        if not self.admin:
            raise PermissionDeniedError("this needs the admin key")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "msk_" + secrets.token_urlsafe(32)


def create_key(db: Database, name: str, admin: bool = False) -> tuple[ApiKey, str]:
    """A new key: the row (holding its digest) and the secret, which is never stored."""
    key = new_key()
    row = ApiKey(name=name, key_hash=digest(key), prefix=key[:12], is_admin=admin)
    with db.session() as s:
        s.add(row)
    return row, key


def principal(request: Request) -> Principal:
    """FastAPI dependency: who is calling (401 without a valid key, unless auth is off)."""
    settings = request.app.state.settings
    if settings.auth_disabled:
        return Principal(LOCAL, admin=True)
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("send an API key as 'Authorization: Bearer <key>'")
        return authenticate(request, key.strip())
    if cookie := request.cookies.get(COOKIE):
        check_origin(request)  # a browser sends the cookie along with any site's form post
        return authenticate(request, cookie)
    raise AuthenticationError("send an API key as 'Authorization: Bearer <key>' "
                              "(or sign in to the dashboard at /ui/signin)")


def authenticate(request: Request, key: str) -> Principal:
    """The principal a key stands for (401 if it is unknown or revoked)."""
    admin = request.app.state.settings.admin_key
    if admin is not None and hmac.compare_digest(key.encode(), admin.get_secret_value().encode()):
        return Principal(ADMIN, admin=True)
    db: Database = request.app.state.db
    with db.session() as s:
        row = s.scalars(select(ApiKey).where(ApiKey.key_hash == digest(key),
                                             ApiKey.revoked_at.is_(None))).first()
    if row is None:
        raise AuthenticationError("the API key is not valid (unknown or revoked)")
    return Principal(row.id, admin=row.is_admin)


def check_origin(request: Request) -> None:
    """Refuse a state-changing request whose ``Origin`` (or ``Referer``) is another site's:
    browsers send both on POST and DELETE, so a page elsewhere cannot act with our cookie."""
    if request.method in SAFE_METHODS:
        return
    origin = request.headers.get("origin") or request.headers.get("referer") or ""
    if urlsplit(origin).netloc != request.headers.get("host", ""):
        raise PermissionDeniedError("cross-site request refused: it must come from this "
                                    "service's own pages", details={"origin": origin or None})
