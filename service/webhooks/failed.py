"""The failed list: deliveries given up on, kept (bounded) so an operator can list and replay them.

Used by the delivery attempt (adding an entry), the admin API and the CLI (listing, replaying).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

import redis as redis_lib
from pydantic import BaseModel, Field

from service.config import Settings, get_settings
from service.webhooks.events import (
    FAILED_KEY,
    AttemptResult,
    Delivery,
    enqueue_delivery,
    rq_connection,
    state_key,
    text,
)

log = logging.getLogger(__name__)

FAILED_MAX_ENTRIES = 1000


@dataclass(frozen=True)
class FailedDelivery:
    """One entry of ``editserve:webhooks:failed``: a delivery given up on, replayable."""

    id: str  # the stream entry id
    failed_at: str  # ISO-8601 UTC
    outcome: str  # failed | refused
    status_code: int | None
    error: str | None
    delivery: Delivery  # as last attempted (``attempt`` = attempts made)

    @property
    def msg_id(self) -> str:
        return self.delivery.msg_id

    def summary(self) -> dict[str, Any]:
        """Everything but the body (it holds presigned URLs)."""
        d = self.delivery
        return {"id": self.id, "webhook_id": d.msg_id, "edit_id": d.edit_id, "tenant": d.tenant, "event": d.event,
                "url": d.url, "attempts": d.attempt, "outcome": self.outcome, "status_code": self.status_code,
                "error": self.error, "failed_at": self.failed_at}


class FailedWebhook(BaseModel):
    """A delivery given up on, as operators see it (``GET /v1/admin/webhooks/failed``); never the body, which
    holds presigned URLs."""

    id: str = Field(description="the list entry's id")
    webhook_id: str = Field(description="the Standard Webhooks `webhook-id` (`msg_...`); a replay keeps it")
    edit_id: str
    tenant: str
    event: str
    url: str
    attempts: int
    outcome: str = Field(description="`failed` (attempts exhausted) or `refused` (destination not allowed)")
    status_code: int | None = None
    error: str | None = None
    failed_at: str = Field(description="ISO-8601 UTC")


class FailedWebhookList(BaseModel):
    data: list[FailedWebhook]


def add_failed(pipe: redis_lib.client.Pipeline, delivery: Delivery, result: AttemptResult, ttl_seconds: int) -> None:
    now = time.time()
    pipe.xadd(FAILED_KEY, {
        "failed_at": datetime.fromtimestamp(now, timezone.utc).isoformat(),
        "outcome": result.outcome.value,
        "status": "" if result.status_code is None else str(result.status_code),
        "error": (result.error or "")[:500],
        "delivery": json.dumps(asdict(delivery)),
    }, maxlen=FAILED_MAX_ENTRIES, approximate=False)
    pipe.xtrim(FAILED_KEY, minid=f"{int((now - ttl_seconds) * 1000)}-0", approximate=False)
    pipe.expire(FAILED_KEY, ttl_seconds)


def _parse_failed(entry_id: bytes | str, fields: dict) -> FailedDelivery:
    f = {text(k): text(v) for k, v in fields.items()}
    return FailedDelivery(id=text(entry_id), failed_at=f.get("failed_at") or "", outcome=f.get("outcome") or "",
                          status_code=int(f["status"]) if f.get("status") else None, error=f.get("error") or None,
                          delivery=Delivery(**json.loads(f["delivery"])))


def list_failed(redis: redis_lib.Redis, limit: int | None = 100, *,
                settings: Settings | None = None) -> list[FailedDelivery]:
    """Deliveries given up on, newest first (at most ``limit``; None: all kept)."""
    ttl = (settings or get_settings()).webhooks.state_ttl_seconds
    oldest = f"{int((time.time() - ttl) * 1000)}-0"
    rows = redis.xrevrange(FAILED_KEY, "+", oldest, count=limit)
    return [_parse_failed(entry_id, fields) for entry_id, fields in rows]


def find_failed(redis: redis_lib.Redis, ident: str, *, settings: Settings | None = None) -> FailedDelivery | None:
    """The newest failed entry whose webhook-id (``msg_…``) or stream entry id is ``ident``."""
    for entry in list_failed(redis, None, settings=settings):
        if ident in (entry.msg_id, entry.id):
            return entry
    return None


def replay_failed(redis: redis_lib.Redis, ident: str, *, settings: Settings | None = None) -> FailedDelivery:
    """Queue a failed delivery again (same webhook-id and body, attempts start over) and drop its entry.

    Atomic with the removal (WATCH + MULTI): two concurrent replays of one entry queue it once; the other
    raises ``KeyError`` like an unknown id. A replay that fails again lands back in the list.
    """
    settings = settings or get_settings()
    connection = rq_connection(redis)
    with connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(FAILED_KEY)
                entry = find_failed(pipe, ident, settings=settings)
                if entry is None:
                    raise KeyError(ident)
                delivery = replace(entry.delivery, attempt=1)
                key = state_key(delivery.edit_id)
                pipe.multi()
                pipe.xdel(FAILED_KEY, entry.id)
                pipe.hincrby(key, "pending", 1)
                pipe.expire(key, settings.webhooks.state_ttl_seconds)
                enqueue_delivery(connection, delivery, settings.webhooks, pipeline=pipe)
                pipe.execute()
                log.info("replaying webhook %s (edit %s, %s) to %s", delivery.msg_id, delivery.edit_id,
                         delivery.event, delivery.url)
                return entry
            except redis_lib.WatchError:
                continue
