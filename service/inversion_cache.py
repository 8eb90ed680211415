"""Reuse of finished inversions: (model, image sha256, caption, method, steps, guidance, scheduler, size) ->
the tenant's inversion id, so an edit that gives a photo and its caption again starts from the stored x_T
and embeddings instead of inverting the photo again.

Why a digest of every key field: an inversion is valid only for exactly these (the embeddings are optimised
for one guidance, the trajectory is one model's at one size and step count); a digest keeps the Redis key
short whatever the caption's length. Entries expire with the inversion's retention, so a hit never names
objects the bucket's lifecycle already deleted.
"""

from __future__ import annotations

import hashlib
import json

import redis

from service.editview import load_record
from service.keys import inversion_cache_key


def inversion_digest(*, model: str, image_sha256: str, caption: str, method: str, steps: int,
                     guidance_scale: float, scheduler: str, size: int) -> str:
    fields = {"model": model, "image_sha256": image_sha256, "caption": caption, "method": method, "steps": steps,
              "guidance_scale": float(guidance_scale), "scheduler": scheduler, "size": size}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def remember_inversion(connection: redis.Redis, tenant: str, digest: str, inversion_id: str,
                       ttl_seconds: int) -> None:
    """Called once the inversion succeeded (its objects are stored): later, equal requests reuse it."""
    connection.set(inversion_cache_key(tenant, digest), inversion_id, ex=max(1, int(ttl_seconds)))


def find_inversion(connection: redis.Redis, tenant: str, digest: str) -> str | None:
    value = connection.get(inversion_cache_key(tenant, digest))
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def forget_inversion(connection: redis.Redis, tenant: str, digest: str) -> None:
    """A hit whose record is gone or failed: drop it so the next request inverts afresh."""
    connection.delete(inversion_cache_key(tenant, digest))


def usable_inversion(connection: redis.Redis, tenant: str, digest: str) -> str | None:
    """The id of the tenant's succeeded record holding a stored inversion with this key (an inversion, or a P2P
    edit that inverted its photo itself), else None (a stale entry is dropped)."""
    found = find_inversion(connection, tenant, digest)
    if found is None:
        return None
    record = load_record(connection, found)
    if record and record.get("tenant") == tenant and record.get("status") == "succeeded" and record.get("inversion"):
        return found
    forget_inversion(connection, tenant, digest)
    return None
