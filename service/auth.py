"""API keys bound to tenants, and each tenant's webhook signing secret.

Why hashes only: a Redis dump must not leak usable keys. A key is shown once at creation; Redis keeps
its SHA-256 (keys are 256-bit random, so an unsalted fast hash is enough). Each tenant gets its own
Standard Webhooks secret (``whsec_`` + base64 of 32 random bytes) so one customer cannot forge another's
events; the default tenant of an auth-less local setup uses ``settings.webhooks.secret``.

Redis layout::

    editserve:apikey:{sha256}    hash: key_id, tenant, label, created_at
    editserve:apikeys            hash: key_id → sha256 (listing and revocation by id)
    editserve:tenant:{tenant}    hash: webhook_secret, created_at (+ limit overrides, see service.limits)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from datetime import UTC, datetime

import redis
from pydantic import BaseModel, Field

from service.config import Settings
from service.keys import APIKEY_INDEX_KEY as _APIKEY_INDEX
from service.keys import apikey_key, tenant_key

KEY_PREFIX = "esk_"
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CreateKeyRequest(BaseModel):
    tenant: str = Field(pattern=TENANT_RE.pattern, description="letters, digits, _ . - (at most 64)")
    label: str | None = Field(None, max_length=100)


class ApiKeyInfo(BaseModel):
    key_id: str
    tenant: str
    label: str | None = None
    created_at: datetime


class CreatedApiKey(ApiKeyInfo):
    key: str = Field(description="shown once; only its hash is stored")
    webhook_secret: str = Field(description="the tenant's Standard Webhooks signing secret (whsec_...)")


class ApiKeyList(BaseModel):
    object: str = "list"
    data: list[ApiKeyInfo]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def webhook_secret(connection: redis.Redis, tenant: str, settings: Settings) -> str:
    """The secret webhooks for ``tenant`` are signed with (the webhook sender calls this)."""
    stored = _text(connection.hget(tenant_key(tenant), "webhook_secret"))
    return stored or settings.webhooks.secret


class KeyStore:
    def __init__(self, connection: redis.Redis, settings: Settings):
        self.redis = connection
        self.settings = settings

    def ensure_tenant(self, tenant: str) -> str:
        """Create the tenant's webhook secret on first use; return it."""
        if not TENANT_RE.match(tenant):
            raise ValueError(f"invalid tenant name {tenant!r}")
        key = tenant_key(tenant)
        self.redis.hsetnx(key, "webhook_secret", new_webhook_secret())
        self.redis.hsetnx(key, "created_at", repr(time.time()))
        return _text(self.redis.hget(key, "webhook_secret"))  # type: ignore[return-value]

    def create_key(self, tenant: str, label: str | None = None) -> CreatedApiKey:
        secret = self.ensure_tenant(tenant)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(6)
        digest = hash_key(key)
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(apikey_key(digest), mapping={"key_id": key_id, "tenant": tenant, "label": label or "",
                                                   "created_at": repr(now)})
        pipe.hset(_APIKEY_INDEX, key_id, digest)
        pipe.execute()
        return CreatedApiKey(key_id=key_id, tenant=tenant, label=label, key=key, webhook_secret=secret,
                             created_at=datetime.fromtimestamp(now, tz=UTC))

    def list_keys(self, tenant: str | None = None) -> list[ApiKeyInfo]:
        out = []
        for key_id, digest in sorted(self.redis.hgetall(_APIKEY_INDEX).items()):
            row = {_text(k): _text(v) for k, v in self.redis.hgetall(apikey_key(_text(digest))).items()}
            if not row or (tenant and row["tenant"] != tenant):
                continue
            out.append(ApiKeyInfo(key_id=_text(key_id), tenant=row["tenant"], label=row.get("label") or None,
                                  created_at=datetime.fromtimestamp(float(row["created_at"]), tz=UTC)))
        return sorted(out, key=lambda k: k.created_at)

    def revoke_key(self, key_id: str) -> bool:
        digest = _text(self.redis.hget(_APIKEY_INDEX, key_id))
        if digest is None:
            return False
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(apikey_key(digest))
        pipe.hdel(_APIKEY_INDEX, key_id)
        pipe.execute()
        return True

    def tenant_for_key(self, key: str) -> str | None:
        record = _key_record(key)
        return None if record is None else _text(self.redis.hget(record, "tenant"))

    async def tenant_for_key_async(self, connection, key: str) -> str | None:
        """:meth:`tenant_for_key` through an asyncio client (the submit path never leaves the event loop)."""
        record = _key_record(key)
        return None if record is None else _text(await connection.hget(record, "tenant"))


def _key_record(key: str) -> str | None:
    """The Redis hash of an API key (we store only its SHA-256), or None if it cannot be one of ours."""
    return apikey_key(hash_key(key)) if key.startswith(KEY_PREFIX) else None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; '' for any other scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return token.strip()
