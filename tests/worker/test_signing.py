"""worker/signing.py: Standard Webhooks signatures, checked against the spec's published vector."""

from __future__ import annotations

import base64

import pytest

from worker.signing import SignatureError, headers, new_secret, sign, verify

# the Standard Webhooks specification's test vector (the reference libraries test against it)
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
STAMP = 1614265330
BODY = b'{"test": 2432232314}'
SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_sign_reproduces_the_spec_vector() -> None:
    assert sign(SECRET, MSG_ID, STAMP, BODY) == SIGNATURE


def test_verify_accepts_the_spec_vector_at_its_time() -> None:
    verify(SECRET, {"webhook-id": MSG_ID, "webhook-timestamp": str(STAMP),
                    "webhook-signature": SIGNATURE}, BODY, now=STAMP + 10)


def test_two_secrets_sign_twice_and_either_verifies() -> None:
    old, new = SECRET, new_secret()
    signed = headers([new, old], MSG_ID, STAMP, BODY)
    assert signed["webhook-id"] == MSG_ID and signed["webhook-timestamp"] == str(STAMP)
    assert signed["webhook-signature"].split(" ")[1] == SIGNATURE
    for secret in (old, new):
        verify(secret, signed, BODY, now=STAMP)
    with pytest.raises(SignatureError, match="no signature matches"):
        verify(new_secret(), signed, BODY, now=STAMP)


@pytest.mark.parametrize(("change", "message"), [
    ({"body": b'{"test": 2432232315}'}, "no signature matches"),
    ({"webhook-id": "msg_other"}, "no signature matches"),
    ({"webhook-timestamp": str(STAMP + 1)}, "no signature matches"),
    ({"webhook-signature": "v2," + SIGNATURE[3:]}, "no signature matches"),
    ({"now": STAMP + 301}, "tolerance"),
    ({"now": STAMP - 301}, "tolerance"),
    ({"webhook-timestamp": "yesterday"}, "not an integer"),
])
def test_verify_refuses_tampering_and_replays(change: dict[str, object], message: str) -> None:
    sent = {"webhook-id": MSG_ID, "webhook-timestamp": str(STAMP),
            "webhook-signature": SIGNATURE}
    sent |= {k: str(v) for k, v in change.items() if k.startswith("webhook-")}
    body = change.get("body", BODY)
    now = change.get("now", STAMP)
    assert isinstance(body, bytes) and isinstance(now, int)
    with pytest.raises(SignatureError, match=message):
        verify(SECRET, sent, body, now=now)


def test_missing_header_is_named() -> None:
    with pytest.raises(SignatureError, match="webhook-signature"):
        verify(SECRET, {"webhook-id": MSG_ID, "webhook-timestamp": str(STAMP)}, BODY, now=STAMP)


def test_new_secrets_are_whsec_with_32_random_bytes() -> None:
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith("whsec_")
    assert len(base64.b64decode(a.removeprefix("whsec_"))) == 32


def test_a_secret_without_the_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="whsec_"):
        sign("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", MSG_ID, STAMP, BODY)
