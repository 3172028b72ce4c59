"""service/auth.py: API keys, and the cache that spares a request its key's lookup.

A revoked key must stop working: at once when it is revoked through the API, within ``KEY_TTL``
when another process revoked it (another API process, ``mergeshield keys revoke``)."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from mergeshield.errors import AuthenticationError
from service.auth import KEY_TTL, KeyCache, Principal, digest
from worker.db import ApiKey, Database, now

ALICE, BOB = Principal("alice", admin=False), Principal("bob", admin=False)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the cache alone

def test_a_verified_key_is_remembered_for_ttl_seconds_only() -> None:
    clock = Clock()
    keys = KeyCache(ttl=2.0, clock=clock)
    keys.put("d1", ALICE, keys.generation)
    assert keys.get("d1") == ALICE
    clock.now += 1.99
    assert keys.get("d1") == ALICE
    clock.now += 0.01
    assert keys.get("d1") is None
    assert keys.get("d2") is None


def test_forget_drops_every_entry_of_the_principal_and_no_other() -> None:
    keys = KeyCache()
    keys.put("a1", ALICE, keys.generation)
    keys.put("a2", ALICE, keys.generation)
    keys.put("b1", BOB, keys.generation)
    keys.forget("alice")
    assert (keys.get("a1"), keys.get("a2"), keys.get("b1")) == (None, None, BOB)


def test_a_lookup_that_began_before_a_revocation_is_not_stored() -> None:
    keys = KeyCache()
    began = keys.generation  # a lookup reads the key as valid...
    keys.forget("alice")  # ...the key is revoked meanwhile...
    keys.put("a1", ALICE, began)  # ...and its answer comes back stale
    assert keys.get("a1") is None
    keys.put("a1", ALICE, keys.generation)  # a lookup begun after it is stored
    assert keys.get("a1") == ALICE


def test_the_oldest_keys_go_first_beyond_max_keys() -> None:
    keys = KeyCache(max_keys=2)
    for name in ("k1", "k2", "k3"):
        keys.put(name, Principal(name, admin=False), keys.generation)
    assert keys.get("k1") is None and keys.get("k2") and keys.get("k3")


class SlowLookup:
    """A database lookup of key ``d`` that takes 10 ms and counts its calls; ``accept``: it
    finds ALICE and caches her (as the service's lookup does), else the key is refused."""

    def __init__(self, keys: KeyCache, accept: bool) -> None:
        self.keys, self.accept, self.calls = keys, accept, 0

    async def __call__(self) -> Principal:
        self.calls += 1
        await asyncio.sleep(0.01)
        if not self.accept:
            raise AuthenticationError("the API key is not valid (unknown or revoked)")
        self.keys.put("d", ALICE, self.keys.generation)
        return ALICE

    def many(self, n: int) -> list[Principal | BaseException]:
        async def gather() -> list[Principal | BaseException]:
            return await asyncio.gather(*(self.keys.verified("d", self) for _ in range(n)),
                                        return_exceptions=True)
        return asyncio.run(gather())


def test_requests_that_miss_together_share_one_lookup() -> None:
    keys = KeyCache()
    lookup = SlowLookup(keys, accept=True)
    assert lookup.many(50) == [ALICE] * 50
    assert lookup.calls == 1
    assert asyncio.run(keys.verified("d", lookup)) == ALICE and lookup.calls == 1  # cached now


def test_a_refused_key_is_refused_to_every_waiter_and_not_remembered() -> None:
    keys = KeyCache()
    lookup = SlowLookup(keys, accept=False)
    assert all(isinstance(r, AuthenticationError) for r in lookup.many(5))
    assert lookup.calls == 1
    with pytest.raises(AuthenticationError):
        asyncio.run(keys.verified("d", lookup))
    assert lookup.calls == 2 and keys.get("d") is None


# --- in the app

def _new_key(admin: TestClient) -> dict[str, str]:
    made = admin.post("/v1/keys", json={"name": "user"})
    assert made.status_code == 201
    return dict(made.json())


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_key_revoked_through_the_api_stops_working_at_once(in_process: TestClient) -> None:
    key = _new_key(in_process)
    assert in_process.get("/v1/scans", headers=_as(key["key"])).status_code == 200
    keys: KeyCache = in_process.app.state.keys
    assert keys.get(digest(key["key"])) is not None  # remembered: the next request asks nobody
    assert in_process.delete(f"/v1/keys/{key['id']}").status_code == 200
    refused = in_process.get("/v1/scans", headers=_as(key["key"]))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"


def test_a_key_revoked_by_another_process_stops_working_within_the_ttl(
        in_process: TestClient) -> None:
    clock = Clock()
    in_process.app.state.keys = KeyCache(clock=clock)
    key = _new_key(in_process)
    headers = _as(key["key"])
    assert in_process.get("/v1/scans", headers=headers).status_code == 200
    # what `mergeshield keys revoke` or another API process does: its own engine, its own
    # write; this app is not told
    other = Database(in_process.app.state.settings.database())
    with other.session() as s:
        s.execute(update(ApiKey).where(ApiKey.id == key["id"]).values(revoked_at=now()))
    other.dispose()
    clock.now += KEY_TTL - 0.1
    assert in_process.get("/v1/scans", headers=headers).status_code == 200  # the documented lag
    clock.now += 0.1
    assert in_process.get("/v1/scans", headers=headers).status_code == 401


def test_unknown_keys_are_not_remembered(in_process: TestClient) -> None:
    refused = in_process.get("/v1/scans", headers=_as("msk_not_a_key"))
    assert refused.status_code == 401
    keys: KeyCache = in_process.app.state.keys
    assert keys.get(digest("msk_not_a_key")) is None
    assert not keys._entries


def test_the_cache_holds_digests_never_the_keys(in_process: TestClient) -> None:
    key = _new_key(in_process)
    assert in_process.get("/v1/scans", headers=_as(key["key"])).status_code == 200
    keys: KeyCache = in_process.app.state.keys
    assert list(keys._entries) == [digest(key["key"])]
    assert key["key"] not in repr(keys._entries)


def test_the_admin_key_is_compared_not_cached(in_process: TestClient) -> None:
    assert in_process.get("/v1/keys").status_code == 200  # the client sends the admin key
    keys: KeyCache = in_process.app.state.keys
    assert not keys._entries


def test_a_cookie_still_needs_our_origin_to_change_anything(in_process: TestClient) -> None:
    key = _new_key(in_process)
    in_process.cookies.set("mergeshield_key", key["key"])
    plain = {"Authorization": ""}
    assert in_process.get("/v1/scans", headers=plain).status_code == 200
    posted = in_process.post("/v1/scans", headers={**plain, "Origin": "https://elsewhere.test"},
                             json={"suspect": {"hub": "a/b"}, "base": {"hub": "a/c"}})
    assert posted.status_code == 403
