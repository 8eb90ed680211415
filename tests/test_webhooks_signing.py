"""Standard Webhooks signing (editserve/webhooks.py), checked against the reference library too."""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime, timezone

import pytest

from editserve.contract import Edit, EditStatus, WebhookEvent
from editserve.webhooks import (
    WebhookVerificationError,
    generate_secret,
    secret_key,
    sign,
    signature,
    verify,
    verify_signature,
)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the spec's example secret


def _event_body() -> bytes:
    edit = Edit(id="ed_1", kind="p2p", model="tiny-sd", status=EditStatus.succeeded,
                created_at=datetime(2026, 1, 1, tzinfo=timezone.utc), params={"seed": 1})
    return WebhookEvent(type="edit.completed", timestamp=datetime.now(timezone.utc), data=edit).model_dump_json().encode()


def test_known_vector_from_the_spec():
    # Vector published with the reference implementations (id, timestamp, body, expected signature).
    sig = signature(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_round_trip_returns_the_parsed_event():
    body = _event_body()
    headers = sign(SECRET, "msg_ed_1_completed", None, body)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    event = verify(SECRET, headers, body)
    assert event.type == "edit.completed" and event.data.id == "ed_1" and event.data.status is EditStatus.succeeded


def test_header_names_are_case_insensitive():
    body = _event_body()
    headers = {k.title(): v for k, v in sign(SECRET, "msg_1", None, body).items()}
    verify(SECRET, headers, body)


@pytest.mark.parametrize("tamper", ["body", "id", "timestamp", "secret", "signature"])
def test_tampering_is_rejected(tamper):
    body = _event_body()
    headers = sign(SECRET, "msg_1", None, body)
    secret = SECRET
    if tamper == "body":
        body = body.replace(b"succeeded", b"failed")
    elif tamper == "id":
        headers["webhook-id"] = "msg_2"
    elif tamper == "timestamp":
        headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) - 1)
    elif tamper == "secret":
        secret = generate_secret()
    else:
        raw = bytearray(base64.b64decode(headers["webhook-signature"].split(",")[1]))
        raw[0] ^= 1
        headers["webhook-signature"] = "v1," + base64.b64encode(bytes(raw)).decode()
    with pytest.raises(WebhookVerificationError):
        verify(secret, headers, body)


def test_reserialised_json_does_not_verify():
    body = b'{"a": 1, "b": 2}'
    headers = sign(SECRET, "msg_1", None, body)
    with pytest.raises(WebhookVerificationError):
        verify_signature(SECRET, headers, json.dumps(json.loads(body), separators=(",", ":")))


def test_timestamp_tolerance_is_five_minutes_both_ways():
    body = b"{}"
    now = time.time()
    for offset, ok in [(-299, True), (299, True), (-301, False), (301, False)]:
        headers = sign(SECRET, "msg_1", int(now + offset), body)
        if ok:
            verify_signature(SECRET, headers, body, now=now)
        else:
            with pytest.raises(WebhookVerificationError, match="too (old|new)"):
                verify_signature(SECRET, headers, body, now=now)
    headers = sign(SECRET, "msg_1", int(now - 3600), body)
    verify_signature(SECRET, headers, body, now=now, tolerance_seconds=7200)


def test_missing_or_malformed_headers_are_rejected():
    body = b"{}"
    good = sign(SECRET, "msg_1", None, body)
    for name in good:
        with pytest.raises(WebhookVerificationError, match="missing"):
            verify_signature(SECRET, {k: v for k, v in good.items() if k != name}, body)
    with pytest.raises(WebhookVerificationError, match="integer"):
        verify_signature(SECRET, {**good, "webhook-timestamp": "yesterday"}, body)
    for junk in ["v1", "v1,", "v1,!!!notbase64", "v2," + good["webhook-signature"][3:], "garbage"]:
        with pytest.raises(WebhookVerificationError, match="no matching"):
            verify_signature(SECRET, {**good, "webhook-signature": junk}, body)


def test_multiple_signatures_support_key_rotation():
    old, new = generate_secret(), generate_secret()
    body = b'{"x": 1}'
    headers = sign([old, new], "msg_1", None, body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    verify_signature(old, headers, body)  # receivers still on the old key
    verify_signature(new, headers, body)  # receivers already on the new key
    # A receiver holding both keys accepts a message signed by either alone.
    verify_signature([old, new], sign(new, "msg_2", None, body), body)
    # An unknown scheme or a wrong signature next to the right one does not matter.
    mixed = {**headers, "webhook-signature": "v1a,AAAA v1,Zm9v " + sign(new, "msg_1", headers["webhook-timestamp"],
                                                                         body)["webhook-signature"]}
    verify_signature(new, mixed, body)


def test_secrets():
    secret = generate_secret()
    assert secret.startswith("whsec_") and len(secret_key(secret)) == 32
    assert secret_key(secret) == secret_key(secret.removeprefix("whsec_"))
    assert secret_key(SECRET.rstrip("=")) == secret_key(SECRET)
    for bad in ["whsec_", "whsec_***"]:
        with pytest.raises(ValueError):
            secret_key(bad)
    with pytest.raises(ValueError):
        generate_secret(8)
    with pytest.raises(ValueError, match="'.'"):
        sign(SECRET, "msg.1", None, b"{}")


def test_non_event_body_is_rejected_by_verify_but_not_by_verify_signature():
    body = b'{"hello": "world"}'
    headers = sign(SECRET, "msg_1", None, body)
    verify_signature(SECRET, headers, body)
    with pytest.raises(WebhookVerificationError, match="not a webhook event"):
        verify(SECRET, headers, body)


def test_interop_with_the_reference_library():
    import standardwebhooks  # a dev dependency (pyproject's `dev` extra): never skipped

    secret = generate_secret()
    reference = standardwebhooks.Webhook(secret)
    body = _event_body()

    # ours → reference
    headers = sign(secret, "msg_ours", None, body)
    assert reference.verify(body, headers)["type"] == "edit.completed"

    # reference → ours
    now = datetime.now(timezone.utc)
    their_headers = {
        "webhook-id": "msg_theirs",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": reference.sign("msg_theirs", now, body.decode()),
    }
    assert verify(secret, their_headers, body).data.id == "ed_1"
    assert their_headers["webhook-signature"] == sign(secret, "msg_theirs", now, body)["webhook-signature"]

    # both reject the other's tampered message
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        reference.verify(body + b" ", headers)
    with pytest.raises(WebhookVerificationError):
        verify(secret, their_headers, body + b" ")
