"""Standard Webhooks verification at its edges: secret sizes and encodings, the tolerance window's bounds, the
injected clock, malformed signature entries, and the exact messages receivers log (found by mutation testing)."""

from __future__ import annotations

import base64
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

KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
T0 = 1_700_000_000  # a fixed "now": every check below passes ``now`` instead of reading the clock
BODY = b'{"hello": "world"}'


def event_body() -> bytes:
    edit = Edit(id="ed_1", kind="p2p", model="tiny-sd", status=EditStatus.succeeded,
                created_at=datetime(2026, 1, 1, tzinfo=timezone.utc), params={})
    return WebhookEvent(type="edit.completed", timestamp=datetime(2026, 1, 1, tzinfo=timezone.utc),
                        data=edit).model_dump_json().encode()


def refused(message: str, *args, **kwargs) -> None:
    with pytest.raises(WebhookVerificationError) as err:
        verify_signature(*args, **kwargs)
    assert str(err.value) == message


# --- secrets ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_bytes", [24, 40, 64])
def test_generated_secrets_have_the_asked_size(n_bytes):
    secret = generate_secret(n_bytes)
    assert secret.startswith("whsec_") and len(secret_key(secret)) == n_bytes


@pytest.mark.parametrize("n_bytes", [23, 65, 0])
def test_generated_secret_sizes_outside_24_to_64_are_refused(n_bytes):
    with pytest.raises(ValueError) as err:
        generate_secret(n_bytes)
    assert str(err.value) == "Standard Webhooks secrets must have between 24 and 64 random bytes"


def test_secret_forms():
    assert secret_key(KEY) == KEY  # raw bytes pass through
    assert secret_key(SECRET) == KEY
    assert secret_key(SECRET.removeprefix("whsec_")) == KEY  # bare base64
    assert secret_key(SECRET.rstrip("=")) == KEY  # unpadded, as the reference library tolerates
    assert len(SECRET.removeprefix("whsec_").rstrip("=")) % 4 == 3  # (one '=' missing: a wrong padding count would not decode)


@pytest.mark.parametrize("bad", ["whsec_ab!cd" + SECRET[11:], "whsec_" + "A" * 5, "whsec_===="])
def test_secrets_that_are_not_base64_are_refused(bad):
    with pytest.raises(ValueError) as err:
        secret_key(bad)
    assert str(err.value) == "webhook secret must be 'whsec_' followed by base64"


@pytest.mark.parametrize("empty", [b"", "whsec_", ""])
def test_empty_secrets_are_refused(empty):
    with pytest.raises(ValueError) as err:
        secret_key(empty)
    assert str(err.value) == "webhook secret must not be empty"


def test_signing_needs_a_key_and_a_dot_free_id():
    with pytest.raises(ValueError) as err:
        sign([], "msg_1", T0, BODY)
    assert str(err.value) == "at least one webhook secret is needed to sign"
    for msg_id in ("", "msg.1"):
        with pytest.raises(ValueError) as err:
            signature(SECRET, msg_id, T0, BODY)
        assert str(err.value) == "webhook id must be non-empty and must not contain '.'"


def test_text_and_bytes_bodies_sign_alike():
    text = '{"caf\u00e9": 1}'
    assert signature(SECRET, "m", T0, text) == signature(SECRET, "m", T0, text.encode("utf-8"))


# --- the tolerance window and the injected clock ---------------------------------------------------------

def test_the_window_bounds_are_inclusive():
    headers = sign(SECRET, "msg_1", T0, BODY)
    verify_signature(SECRET, headers, BODY, now=T0 + 300)  # exactly 5 min old
    verify_signature(SECRET, headers, BODY, now=T0 - 300)  # exactly 5 min ahead
    refused("webhook timestamp is too old", SECRET, headers, BODY, now=T0 + 301)
    refused("webhook timestamp is too new", SECRET, headers, BODY, now=T0 - 301)


def test_verify_passes_its_clock_and_tolerance_on():
    body = event_body()
    headers = sign(SECRET, "msg_1", T0, body)  # 2023: far outside the real clock's window
    assert verify(SECRET, headers, body, now=T0 + 10).type == "edit.completed"
    assert verify(SECRET, headers, body, now=T0 + 3000, tolerance_seconds=3600).data.id == "ed_1"
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(SECRET, headers, body, now=T0 + 3000)


def test_header_problems_have_their_own_messages():
    headers = sign(SECRET, "msg_1", T0, BODY)
    missing = {k: v for k, v in headers.items() if k != "webhook-signature"}
    refused("missing webhook-id, webhook-timestamp or webhook-signature header", SECRET, missing, BODY, now=T0)
    refused("webhook-timestamp is not an integer Unix time", SECRET, {**headers, "webhook-timestamp": "soon"},
            BODY, now=T0)
    refused("webhook id must be non-empty and must not contain '.'", SECRET, {**headers, "webhook-id": "a.b"},
            BODY, now=T0)
    refused("no matching signature", SECRET, headers, BODY + b" ", now=T0)


# --- malformed signature entries -------------------------------------------------------------------------

def test_a_malformed_entry_before_a_good_one_does_not_hide_it():
    headers = sign(SECRET, "msg_1", T0, BODY)
    good = headers["webhook-signature"]
    for junk in ("v1,!!!!", "v1,", "v1a,abcd", "nonsense"):
        verify_signature(SECRET, {**headers, "webhook-signature": f"{junk} {good}"}, BODY, now=T0)


def test_a_signature_with_characters_outside_base64_is_not_accepted():
    headers = sign(SECRET, "msg_1", T0, BODY)
    version, encoded = headers["webhook-signature"].split(",")
    tampered = f"{version},{encoded[:10]}!{encoded[10:]}"  # lenient decoding would drop the '!' and match
    refused("no matching signature", SECRET, {**headers, "webhook-signature": tampered}, BODY, now=T0)
