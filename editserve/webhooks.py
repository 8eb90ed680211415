"""Standard Webhooks v1 signing and verification (HMAC-SHA256, ``whsec_`` secrets).

One implementation shared by the sender (``service/webhooks.py``) and receivers using the SDK, so both
sides agree byte for byte. Spec: the signed content is ``f"{webhook-id}.{webhook-timestamp}.{body}"``
over the *raw* body bytes; ``webhook-signature`` is a space-separated list of ``v1,<base64 hmac>``
(several during key rotation); receivers accept timestamps within ±5 minutes to block replays.
Interoperates with the reference library ``standardwebhooks`` (tested).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from datetime import datetime

from pydantic import ValidationError

from editserve.contract import DatasetWebhookEvent, WebhookEvent

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_SECONDS = 5 * 60
HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"

Secret = str | bytes
"""A ``whsec_``-prefixed base64 secret (or bare base64), or the raw key bytes."""


class WebhookVerificationError(Exception):
    """The request is not a genuine, fresh webhook from us: reject it (HTTP 400/401)."""


def generate_secret(n_bytes: int = 32) -> str:
    """A new signing secret: ``whsec_`` + base64 of random bytes (the spec asks for 24–64 bytes)."""
    if not 24 <= n_bytes <= 64:
        raise ValueError("Standard Webhooks secrets must have between 24 and 64 random bytes")
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(n_bytes)).decode("ascii")


def secret_key(secret: Secret) -> bytes:
    """The HMAC key: the base64-decoded bytes after ``whsec_`` (raw bytes pass through)."""
    if isinstance(secret, bytes):
        key = secret
    else:
        encoded = secret.removeprefix(SECRET_PREFIX)
        try:
            # Tolerate unpadded base64, as the reference library does.
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("webhook secret must be 'whsec_' followed by base64") from exc
    if not key:
        raise ValueError("webhook secret must not be empty")
    return key


def _as_bytes(body: bytes | str) -> bytes:
    return body.encode("utf-8") if isinstance(body, str) else bytes(body)


def _unix_seconds(timestamp: float | datetime) -> int:
    if isinstance(timestamp, datetime):
        return int(timestamp.timestamp())
    return int(timestamp)


def signature(secret: Secret, msg_id: str, timestamp: float | datetime, body: bytes | str) -> str:
    """One ``v1,<base64>`` signature of ``{msg_id}.{timestamp}.{body}``."""
    if not msg_id or "." in msg_id:
        raise ValueError("webhook id must be non-empty and must not contain '.'")
    signed = f"{msg_id}.{_unix_seconds(timestamp)}.".encode("ascii") + _as_bytes(body)
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def sign(
    secret: Secret | Sequence[Secret],
    msg_id: str,
    timestamp: float | datetime | None,
    body: bytes | str,
) -> dict[str, str]:
    """The three Standard Webhooks headers for one delivery attempt.

    ``secret`` may be a list: every key signs, so receivers keep verifying while a key rotates.
    ``timestamp`` is the attempt's send time (``None``: now), not the event's time.
    """
    keys: Sequence[Secret] = [secret] if isinstance(secret, (str, bytes)) else secret
    if not keys:
        raise ValueError("at least one webhook secret is needed to sign")
    ts = _unix_seconds(time.time() if timestamp is None else timestamp)
    return {
        HEADER_ID: msg_id,
        HEADER_TIMESTAMP: str(ts),
        HEADER_SIGNATURE: " ".join(signature(key, msg_id, ts, body) for key in keys),
    }


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # Works with plain dicts (any case) as well as httpx/Starlette case-insensitive headers.
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


def _decoded_signatures(header_value: str) -> list[bytes]:
    found = []
    for entry in header_value.split():
        version, _, encoded = entry.partition(",")
        if version != SIGNATURE_VERSION or not encoded:
            continue  # other schemes (e.g. v1a ed25519) are not ours to check
        try:
            found.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return found


def verify_signature(
    secret: Secret | Sequence[Secret],
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> None:
    """Check headers against the raw body; raise :class:`WebhookVerificationError` if anything is off.

    Never re-serialise the JSON before calling this: the signature covers the exact bytes received.
    """
    msg_id = _header(headers, HEADER_ID)
    msg_timestamp = _header(headers, HEADER_TIMESTAMP)
    msg_signature = _header(headers, HEADER_SIGNATURE)
    if not (msg_id and msg_timestamp and msg_signature):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        timestamp = int(msg_timestamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer Unix time") from None
    current = time.time() if now is None else now
    if timestamp < current - tolerance_seconds:
        raise WebhookVerificationError("webhook timestamp is too old")
    if timestamp > current + tolerance_seconds:
        raise WebhookVerificationError("webhook timestamp is too new")

    keys: Sequence[Secret] = [secret] if isinstance(secret, (str, bytes)) else secret
    received = _decoded_signatures(msg_signature)
    for key in keys:
        try:
            expected = base64.b64decode(signature(key, msg_id, timestamp, body).partition(",")[2])
        except ValueError as exc:  # a '.' in the id: cannot be one of ours
            raise WebhookVerificationError(str(exc)) from None
        # compare_digest on every candidate: constant time with respect to the expected value.
        if any(hmac.compare_digest(expected, candidate) for candidate in received):
            return
    raise WebhookVerificationError("no matching signature")


def verify(
    secret: Secret | Sequence[Secret],
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> WebhookEvent | DatasetWebhookEvent:
    """Verify a received webhook and parse it into a :class:`WebhookEvent` (type, timestamp, data=Edit), or a
    :class:`DatasetWebhookEvent` for ``dataset.*`` events (data=Dataset).

    Use ``headers["webhook-id"]`` as the idempotency key: retries of one event share it.
    """
    verify_signature(secret, headers, body, tolerance_seconds=tolerance_seconds, now=now)
    try:
        raw = _as_bytes(body)
        kind = json.loads(raw).get("type", "") if raw.lstrip().startswith(b"{") else ""
        if isinstance(kind, str) and kind.startswith("dataset."):
            return DatasetWebhookEvent.model_validate_json(raw)
        return WebhookEvent.model_validate_json(raw)
    except (ValidationError, ValueError) as exc:
        raise WebhookVerificationError(f"signed body is not a webhook event: {exc}") from exc


__all__ = [
    "DEFAULT_TOLERANCE_SECONDS",
    "HEADER_ID",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "SECRET_PREFIX",
    "WebhookVerificationError",
    "generate_secret",
    "secret_key",
    "sign",
    "signature",
    "verify",
    "verify_signature",
]
