"""Standard Webhooks signatures (https://www.standardwebhooks.com, spec v1), both ways.

A secret is ``whsec_`` + base64 of 24-64 random bytes; the signature of a message is
``v1,`` + base64(HMAC-SHA256(key, f"{webhook-id}.{webhook-timestamp}.{body}")). The
``webhook-signature`` header holds one or more signatures, space-separated: while a secret is
rotated the sender signs with the old and the new one, and a receiver accepts either.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

PREFIX = "whsec_"
TOLERANCE = 5 * 60  # seconds: a receiver refuses timestamps further off (replays)


class SignatureError(ValueError):
    """The headers do not prove the body came from a holder of the secret, now."""


def new_secret() -> str:
    """A fresh ``whsec_`` secret (32 random bytes)."""
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    if not secret.startswith(PREFIX):
        raise ValueError("a Standard Webhooks secret starts with 'whsec_'")
    return base64.b64decode(secret[len(PREFIX):], validate=True)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One signature, ``v1,<base64>``, of ``body`` sent as message ``msg_id`` at ``timestamp``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()) \
        .decode()


def headers(secrets_: list[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three headers of a delivery, signed with every secret in ``secrets_``."""
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": " ".join(sign(s, msg_id, timestamp, body) for s in secrets_)}


def verify(secret: str, headers_: dict[str, str], body: bytes, *, now: float | None = None,
           tolerance: int = TOLERANCE) -> None:
    """Raise ``SignatureError`` unless one ``v1`` signature matches and the timestamp is within
    ``tolerance`` seconds of ``now``. ``headers_`` keys are lower case."""
    try:
        msg_id, stamp = headers_["webhook-id"], headers_["webhook-timestamp"]
        given = headers_["webhook-signature"].split(" ")
    except KeyError as exc:
        raise SignatureError(f"missing header {exc.args[0]}") from exc
    try:
        timestamp = int(stamp)
    except ValueError as exc:
        raise SignatureError("webhook-timestamp is not an integer") from exc
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        raise SignatureError("webhook-timestamp is outside the tolerance window")
    expected = sign(secret, msg_id, timestamp, body).encode()
    if not any(hmac.compare_digest(expected, sig.encode()) for sig in given
               if sig.startswith("v1,")):
        raise SignatureError("no signature matches")
