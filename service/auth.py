"""API keys: ``Authorization: Bearer <key>``, or the dashboard's sign-in cookie holding the same
key (HttpOnly, SameSite=Strict; state-changing requests must come from our own origin). Keys are
stored as sha256 digests; the admin key comes from settings. Each scan and upload belongs to the
key that made it.

A key the database accepted is remembered for ``KEY_TTL`` seconds (``KeyCache``, one per API
process), so a request does not look its key up every time: the lookup (a session and a query)
was half of a status poll's cost. Only accepted keys are remembered, by digest; an unknown or
revoked key is looked up every time. Revoking a key through the API forgets it in that process at
once; another API process, or ``mergeshield keys revoke``, is obeyed within ``KEY_TTL``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request
from sqlalchemy import select

from mergeshield.errors import AuthenticationError, PermissionDeniedError
from service.reads import read
from worker.db import ApiKey, Database

COOKIE = "mergeshield_key"  # the dashboard's sign-in cookie: the API key itself, HttpOnly
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOCAL = "local"  # the owner of everything when authentication is off (local use)
ADMIN = "admin"  # the owner id of the settings' admin key
KEY_TTL = 2.0  # seconds a verified key is trusted unasked: how long a revocation elsewhere lags
MAX_KEYS = 4096  # keys remembered at once per process; the oldest go first


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
    """Who is calling (401 without a valid key, unless auth is off), for code that runs in the
    thread pool (the dashboard's pages); API routes depend on ``verified_caller``."""
    if request.app.state.settings.auth_disabled:
        return Principal(LOCAL, admin=True)
    return authenticate(request, presented_key(request))


async def verified_caller(request: Request) -> Principal:
    """FastAPI dependency: ``principal`` without leaving the event loop for a key verified in
    the last ``KEY_TTL`` seconds; any other is looked up on the read threads."""
    if request.app.state.settings.auth_disabled:
        return Principal(LOCAL, admin=True)
    key = presented_key(request)
    if (admin := _admin(request, key)) is not None:
        return admin
    keys: KeyCache = request.app.state.keys
    return await keys.verified(digest(key), lambda: read(request, authenticate, request, key))


def presented_key(request: Request) -> str:
    """The key a request carries: its bearer token, else the dashboard's cookie (whose
    state-changing requests must come from our own pages); 401 without one."""
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("send an API key as 'Authorization: Bearer <key>'")
        return key.strip()
    if cookie := request.cookies.get(COOKIE):
        check_origin(request)  # a browser sends the cookie along with any site's form post
        return cookie
    raise AuthenticationError("send an API key as 'Authorization: Bearer <key>' "
                              "(or sign in to the dashboard at /ui/signin)")


def authenticate(request: Request, key: str) -> Principal:
    """The principal a key stands for (401 if it is unknown or revoked): the admin key, a key
    in the cache, else the database's answer (which the cache then keeps)."""
    if (admin := _admin(request, key)) is not None:
        return admin
    keys: KeyCache = request.app.state.keys
    hashed = digest(key)
    if (known := keys.get(hashed)) is not None:
        return known
    generation = keys.generation  # before the query: a revocation meanwhile wins
    db: Database = request.app.state.db
    with db.session() as s:
        row = s.scalars(select(ApiKey).where(ApiKey.key_hash == hashed,
                                             ApiKey.revoked_at.is_(None))).first()
    if row is None:
        raise AuthenticationError("the API key is not valid (unknown or revoked)")
    found = Principal(row.id, admin=row.is_admin)
    keys.put(hashed, found, generation)
    return found


def _admin(request: Request, key: str) -> Principal | None:
    admin = request.app.state.settings.admin_key
    if admin is not None and hmac.compare_digest(key.encode(), admin.get_secret_value().encode()):
        return Principal(ADMIN, admin=True)
    return None


@dataclass(frozen=True)
class _Entry:
    principal: Principal
    expires: float  # on the cache's clock (time.monotonic)


class KeyCache:
    """Keys the database accepted, by sha256 digest, for ``ttl`` seconds from the lookup."""

    def __init__(self, ttl: float = KEY_TTL, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.max_keys, self.clock = ttl, max_keys, clock
        self._entries: dict[str, _Entry] = {}  # oldest first
        self._lock = threading.Lock()  # the event loop and the thread pool both write
        self._pending: dict[str, asyncio.Task[Principal]] = {}  # lookups under way, by digest
        self.generation = 0  # bumped by each forget: a lookup begun before it is not stored

    def get(self, hashed: str) -> Principal | None:
        """The principal of a key verified less than ``ttl`` ago, else None."""
        entry = self._entries.get(hashed)
        if entry is None or entry.expires <= self.clock():
            return None
        return entry.principal

    def put(self, hashed: str, principal: Principal, generation: int) -> None:
        """Remember a key the database accepted, unless a key was revoked since the lookup
        began (``generation``: the cache's own, read before the query)."""
        with self._lock:
            if generation != self.generation:
                return
            self._entries.pop(hashed, None)  # put back last: the dict's order is the age
            while len(self._entries) >= self.max_keys:
                del self._entries[next(iter(self._entries))]
            self._entries[hashed] = _Entry(principal, self.clock() + self.ttl)

    def forget(self, principal_id: str) -> None:
        """A key was revoked: its entries go, and no lookup under way is stored."""
        with self._lock:
            self.generation += 1
            for hashed in [h for h, e in self._entries.items() if e.principal.id == principal_id]:
                del self._entries[hashed]

    async def verified(self, hashed: str,
                       lookup: Callable[[], Coroutine[Any, Any, Principal]]) -> Principal:
        """The cached principal, else ``lookup()``'s, shared by every request that misses the
        same key meanwhile: when an entry expires under load the database is asked once, not
        once per waiting request."""
        if (known := self.get(hashed)) is not None:
            return known
        loop = asyncio.get_running_loop()
        task = self._pending.get(hashed)
        if task is None or task.get_loop() is not loop:
            task = loop.create_task(lookup())
            self._pending[hashed] = task
            task.add_done_callback(lambda done: self._settled(hashed, done))
        # shielded: a client that hangs up does not cancel the lookup others wait for
        return await asyncio.shield(task)

    def _settled(self, hashed: str, task: asyncio.Task[Principal]) -> None:
        if self._pending.get(hashed) is task:
            del self._pending[hashed]
        if not task.cancelled():
            task.exception()  # retrieved here: a refused key's 401 is not "never retrieved"


def check_origin(request: Request) -> None:
    """Refuse a state-changing request whose ``Origin`` (or ``Referer``) is another site's:
    browsers send both on POST and DELETE, so a page elsewhere cannot act with our cookie."""
    if request.method in SAFE_METHODS:
        return
    origin = request.headers.get("origin") or request.headers.get("referer") or ""
    if urlsplit(origin).netloc != request.headers.get("host", ""):
        raise PermissionDeniedError("cross-site request refused: it must come from this "
                                    "service's own pages", details={"origin": origin or None})
