"""The webhook event model and its queue: what a delivery is, where it waits, what an attempt can end in.

Shared by emission (GPU workers, gateway), delivery and the failed list; imports none of them. Keys are
``service.keys``' ``webhook:*`` names.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import asdict, dataclass
from datetime import timedelta
from enum import Enum
from typing import Any

import redis as redis_lib
from rq import Queue

from editserve.contract import WebhookDeliveryState, WebhookEventType
from service.config import WebhookSettings
from service.keys import WEBHOOKS_FAILED_KEY as FAILED_KEY
from service.keys import webhook_done_key as done_key
from service.keys import webhook_emitted_key as emitted_key
from service.keys import webhook_state_key as state_key
from service.keys import webhook_throttle_key as throttle_key

__all__ = ["FAILED_KEY", "QUEUE_NAME", "DELIVER_JOB", "TRANSIENT_REDIS_ERRORS", "AttemptResult", "Delivery",
           "DeliveryOutcome", "done_key", "emitted_key", "enqueue_delivery", "read_state", "rq_connection",
           "state_key", "text", "throttle_key"]

QUEUE_NAME = "webhooks"
DELIVER_JOB = "service.webhooks.delivery.deliver"  # by name: the sender process imports it

# Errors that mean "Redis is unavailable right now", not "this command is wrong": the sender waits them out.
TRANSIENT_REDIS_ERRORS: tuple[type[Exception], ...] = (
    redis_lib.exceptions.ConnectionError,  # refused, reset, BusyLoadingError (an AOF still loading)
    redis_lib.exceptions.TimeoutError,
    redis_lib.exceptions.ReadOnlyError,  # writing to a replica during a failover
    redis_lib.exceptions.OutOfMemoryError,
    redis_lib.exceptions.TryAgainError,
    redis_lib.exceptions.ClusterDownError,  # MasterDownError included
)


class DeliveryOutcome(str, Enum):
    delivered = "delivered"
    retrying = "retrying"
    failed = "failed"
    gone = "gone"
    refused = "refused"


@dataclass(frozen=True)
class Delivery:
    """One event for one destination; travels as the RQ job's argument (a plain dict)."""

    msg_id: str
    edit_id: str
    tenant: str
    url: str
    event: str
    body: str
    attempt: int = 1

    @property
    def retryable(self) -> bool:
        return self.event != WebhookEventType.progress.value

    def next_attempt(self) -> Delivery:
        return Delivery(**{**asdict(self), "attempt": self.attempt + 1})


@dataclass
class AttemptResult:
    outcome: DeliveryOutcome
    status_code: int | None = None
    error: str | None = None
    retry_in: float | None = None


_rq_connections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def rq_connection(redis: redis_lib.Redis) -> redis_lib.Redis:
    """RQ needs raw bytes; give it a non-decoding twin when the caller's client decodes responses."""
    kwargs = redis.connection_pool.connection_kwargs
    if not kwargs.get("decode_responses"):
        return redis
    twin = _rq_connections.get(redis)
    if twin is None:
        pool = redis_lib.ConnectionPool(
            connection_class=redis.connection_pool.connection_class, **{**kwargs, "decode_responses": False}
        )
        twin = _rq_connections[redis] = redis_lib.Redis(connection_pool=pool)
    return twin


def enqueue_delivery(redis: redis_lib.Redis, delivery: Delivery, config: WebhookSettings,
                     delay_seconds: float = 0.0, pipeline: redis_lib.client.Pipeline | None = None) -> None:
    """Put one attempt on the ``webhooks`` queue, now or (via the scheduler) after a delay.

    With ``pipeline``, the job is written there (executed by the caller, e.g. in one MULTI with other writes).
    """
    queue = Queue(QUEUE_NAME, connection=redis)
    options: dict[str, Any] = dict(
        job_timeout=int(config.timeout_seconds * 3 + 30),
        result_ttl=min(600, config.state_ttl_seconds),  # the body holds presigned URLs: do not keep it around
        failure_ttl=config.state_ttl_seconds,
        description=f"webhook {delivery.event} for edit {delivery.edit_id} (attempt {delivery.attempt})",
    )
    if pipeline is not None:
        options["pipeline"] = pipeline
    if delay_seconds > 0:
        queue.enqueue_in(timedelta(seconds=delay_seconds), DELIVER_JOB, asdict(delivery), **options)
    else:
        queue.enqueue(DELIVER_JOB, asdict(delivery), **options)


def text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def read_state(redis: redis_lib.Redis, edit_id: str) -> WebhookDeliveryState | None:
    """The contract's view of ``editserve:webhook:{edit_id}``; None before the first event was emitted."""
    raw = {text(k): text(v) for k, v in redis.hgetall(state_key(edit_id)).items()}
    if not raw.get("url"):
        return None
    return WebhookDeliveryState(
        url=raw["url"],
        events=json.loads(raw.get("events") or "[]"),
        delivered=int(raw.get("delivered") or 0),
        failed=int(raw.get("failed") or 0),
        last_error=raw.get("last_error"),
    )
