"""Emission: the one part of webhooks a GPU worker runs (filter -> throttle -> enqueue; Redis only, no HTTP).

A JobStore listener: the gateway's app factory and the worker's main hand ``emit`` to their JobStore.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone

import redis as redis_lib

from editserve.contract import Dataset, DatasetWebhookEvent, Edit, EditStatus, WebhookEvent, WebhookEventType
from service.config import Settings, get_settings
from service.webhooks.events import (
    Delivery,
    emitted_key,
    enqueue_delivery,
    rq_connection,
    state_key,
    throttle_key,
)

log = logging.getLogger(__name__)

_EVENT_ALIASES = {
    EditStatus.processing.value: WebhookEventType.started,
    **{status.value: WebhookEventType.completed for status in EditStatus if status.terminal},
}


def _event_type(event: str | WebhookEventType) -> WebhookEventType | None:
    if isinstance(event, WebhookEventType):
        return event
    try:
        return WebhookEventType(event)
    except ValueError:
        return _EVENT_ALIASES.get(event)


def message_id(edit: Edit, event: WebhookEventType) -> str:
    """Stable per event: retries share it, and a repeated emit of the same event is recognised."""
    if event is WebhookEventType.progress:
        step = edit.progress.step if edit.progress else int(time.time() * 1000)
        return f"msg_{edit.id}_progress_{step}"
    return f"msg_{edit.id}_{event.value}"


def _throttled(redis: redis_lib.Redis, edit_id: str, interval_seconds: float) -> bool:
    if interval_seconds <= 0:
        return False
    acquired = redis.set(throttle_key(edit_id), b"1", px=max(1, int(interval_seconds * 1000)), nx=True)
    return not acquired


def emit(
    redis: redis_lib.Redis,
    edit: Edit,
    event: str | WebhookEventType,
    tenant: str,
    *,
    settings: Settings | None = None,
) -> None:
    """Queue a webhook for this status change if the edit subscribed to it. Never raises, never blocks on HTTP.

    ``event``: "started" (processing began), "progress", "completed" (any terminal status).
    """
    try:
        _emit(redis, edit, event, tenant, settings or get_settings())
    except Exception:  # a webhook problem must never fail an edit
        log.exception("webhook emission failed for edit %s (%s)", edit.id, event)


def _emit(redis: redis_lib.Redis, edit: Edit, event: str | WebhookEventType, tenant: str,
          settings: Settings) -> None:
    spec = edit.webhook
    if spec is None:
        return
    event_type = _event_type(event)
    if event_type is None:
        log.error("unknown webhook event %r for edit %s", event, edit.id)
        return
    if event_type not in spec.events:
        return
    config = settings.webhooks
    if event_type is WebhookEventType.progress and _throttled(redis, edit.id, config.progress_min_interval_seconds):
        return
    msg_id = message_id(edit, event_type)
    ttl = config.state_ttl_seconds
    with redis.pipeline() as pipe:
        pipe.sadd(emitted_key(edit.id), msg_id)
        pipe.expire(emitted_key(edit.id), ttl)
        first_time, _ = pipe.execute()
    if not first_time:
        return
    payload = WebhookEvent(type=f"edit.{event_type.value}", timestamp=datetime.now(timezone.utc), data=edit)
    delivery = Delivery(msg_id=msg_id, edit_id=edit.id, tenant=tenant, url=spec.url, event=event_type.value,
                        body=payload.model_dump_json())
    with redis.pipeline() as pipe:
        pipe.hset(state_key(edit.id), mapping={"url": spec.url, "events": json.dumps([e.value for e in spec.events])})
        pipe.hincrby(state_key(edit.id), "pending", 1)
        pipe.expire(state_key(edit.id), ttl)
        pipe.execute()
    enqueue_delivery(rq_connection(redis), delivery, config)


def emit_dataset(redis: redis_lib.Redis, dataset: Dataset, tenant: str, webhook, event: str, step: int | None,
                 *, settings: Settings | None = None) -> None:
    """A DatasetStore listener: queue ``dataset.{event}`` if the job subscribed to it, at most once per event
    and progress step; delivered and signed like an edit's webhook. Never raises."""
    try:
        if webhook is None or event not in [e.value for e in webhook.events]:
            return
        config = (settings or get_settings()).webhooks
        msg_id = f"msg_{dataset.id}_{event}" + (f"_{step}" if step is not None else "")
        with redis.pipeline() as pipe:
            pipe.sadd(emitted_key(dataset.id), msg_id)
            pipe.expire(emitted_key(dataset.id), config.state_ttl_seconds)
            first_time, _ = pipe.execute()
        if not first_time:
            return
        body = DatasetWebhookEvent(type=f"dataset.{event}", timestamp=datetime.now(timezone.utc), data=dataset)
        delivery = Delivery(msg_id=msg_id, edit_id=dataset.id, tenant=tenant, url=webhook.url, event=event,
                            body=body.model_dump_json())
        enqueue_delivery(rq_connection(redis), delivery, config)
    except Exception:  # a webhook problem must never fail a dataset job
        log.exception("webhook emission failed for dataset %s (%s)", dataset.id, event)
