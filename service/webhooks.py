"""Webhook events for edits: emission (filter → throttle → enqueue) and the delivery process.

Why split in two: status changes happen inside the GPU loop, which must never wait on a user's server.
``emit`` only touches Redis (a few commands) and enqueues a delivery job on the RQ queue ``webhooks``;
``python -m service.webhooks`` (an RQ SimpleWorker with the scheduler, for delayed retries) does the HTTP.

Emission, called by JobStore on every status change: ``emit(redis, edit, "started"|"progress"|"completed",
tenant)``. Events the edit did not subscribe to (``edit.webhook.events``) are dropped; ``progress`` is
throttled per edit to ``settings.webhooks.progress_min_interval_seconds``; each event gets a stable
``webhook-id`` (``msg_{edit_id}_{started|completed|progress_<step>}``), reused by its retries and emitted at
most once, so receivers can deduplicate on it.

Delivery, per attempt: re-resolve and SSRF-check the URL (``service.egress``), sign with the tenant's
secret (Standard Webhooks, fresh ``webhook-timestamp`` per attempt), POST to the pinned IP without
following redirects. 2xx = delivered; 410 = give up and send nothing more for this edit; anything else
(3xx, 4xx, 5xx, timeout, connection error) is retried after ``backoff_seconds[attempt-1]`` ± jitter (a
longer ``Retry-After`` on 429/503 wins) until ``max_attempts``. ``progress`` events are sent once, never
retried: a late progress report is worse than none. Delivery order across events is not guaranteed.

Where outcomes go: each event's final outcome is mirrored into the edit record through
``JobStore.record_webhook_delivery`` (fields ``webhook_delivered``/``webhook_failed``/``webhook_last_error`` of
``editserve:edit:{id}``, rendered as ``Edit.webhook``); the details live in the keys below.

Redis keys (all expire after ``settings.webhooks.state_ttl_seconds``):

``editserve:webhook:{edit_id}`` — hash, delivery state of the edit's webhook:
    ``url``               destination as given
    ``events``            JSON list of subscribed event types
    ``delivered``         events delivered (2xx)
    ``failed``            events given up on (attempts exhausted, 410, refused destination)
    ``pending``           events queued or waiting for a retry
    ``attempts``          HTTP attempts made, refused ones included
    ``last_status``       HTTP status of the latest attempt that got an answer
    ``last_error``        reason of the latest failed attempt (kept after later successes)
    ``last_attempt_at``   ISO-8601 UTC time of the latest attempt
    ``gone``              "1" once the receiver answered 410: later events are dropped
    → ``read_state(redis, edit_id)`` turns it into the contract's ``WebhookDeliveryState``.
``editserve:webhook:{edit_id}:throttle`` — string with a PX expiry: a progress event was sent recently.
``editserve:webhook:{edit_id}:emitted`` — set of webhook-ids already enqueued (at-most-once emission).

Metric: ``editserve_webhook_deliveries_total{outcome}``, one increment per attempt; outcome is one of
``DeliveryOutcome``: delivered, retrying (failed, will retry), failed (failed, no attempts left),
gone (410), refused (destination not allowed).
"""

from __future__ import annotations

import argparse
import email.utils
import json
import logging
import random
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any

import httpx
import redis as redis_lib
from rq import Queue
from rq.timeouts import JobTimeoutException

from editserve.contract import Edit, EditStatus, WebhookDeliveryState, WebhookEvent, WebhookEventType
from editserve.webhooks import sign
from service import egress
from service.config import Settings, WebhookSettings, get_settings

log = logging.getLogger(__name__)

QUEUE_NAME = "webhooks"
KEY_PREFIX = "editserve:webhook:"
USER_AGENT = "editserve-webhooks/1"
RETRY_AFTER_STATUSES = (429, 503)


class DeliveryOutcome(str, Enum):
    delivered = "delivered"
    retrying = "retrying"
    failed = "failed"
    gone = "gone"
    refused = "refused"


def state_key(edit_id: str) -> str:
    return f"{KEY_PREFIX}{edit_id}"


def throttle_key(edit_id: str) -> str:
    return f"{KEY_PREFIX}{edit_id}:throttle"


def emitted_key(edit_id: str) -> str:
    return f"{KEY_PREFIX}{edit_id}:emitted"


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


# ---------------------------------------------------------------------------------------------- emission

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


_rq_connections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rq_connection(redis: redis_lib.Redis) -> redis_lib.Redis:
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
    enqueue_delivery(_rq_connection(redis), delivery, config)


def enqueue_delivery(redis: redis_lib.Redis, delivery: Delivery, config: WebhookSettings,
                     delay_seconds: float = 0.0) -> None:
    """Put one attempt on the ``webhooks`` queue, now or (via the RQ scheduler) after a delay."""
    queue = Queue(QUEUE_NAME, connection=redis)
    options: dict[str, Any] = dict(
        job_timeout=int(config.timeout_seconds * 3 + 30),
        result_ttl=600,  # the body holds presigned URLs: do not keep it around
        failure_ttl=config.state_ttl_seconds,
        description=f"webhook {delivery.event} for edit {delivery.edit_id} (attempt {delivery.attempt})",
    )
    if delay_seconds > 0:
        queue.enqueue_in(timedelta(seconds=delay_seconds), deliver, asdict(delivery), **options)
    else:
        queue.enqueue(deliver, asdict(delivery), **options)


# ---------------------------------------------------------------------------------------------- state

def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def read_state(redis: redis_lib.Redis, edit_id: str) -> WebhookDeliveryState | None:
    """The contract's view of ``editserve:webhook:{edit_id}``; None before the first event was emitted."""
    raw = {_text(k): _text(v) for k, v in redis.hgetall(state_key(edit_id)).items()}
    if not raw.get("url"):
        return None
    return WebhookDeliveryState(
        url=raw["url"],
        events=json.loads(raw.get("events") or "[]"),
        delivered=int(raw.get("delivered") or 0),
        failed=int(raw.get("failed") or 0),
        last_error=raw.get("last_error"),
    )


def _record_attempt(redis: redis_lib.Redis, settings: Settings, delivery: Delivery, outcome: DeliveryOutcome,
                    status_code: int | None, error: str | None) -> None:
    key = state_key(delivery.edit_id)
    final = outcome is not DeliveryOutcome.retrying
    with redis.pipeline() as pipe:
        pipe.hincrby(key, "attempts", 1)
        pipe.hset(key, "last_attempt_at", datetime.now(timezone.utc).isoformat())
        if status_code is not None:
            pipe.hset(key, "last_status", status_code)
        if error:
            pipe.hset(key, "last_error", error[:500])
        if outcome is DeliveryOutcome.delivered:
            pipe.hincrby(key, "delivered", 1)
        elif final:
            pipe.hincrby(key, "failed", 1)
        if outcome is DeliveryOutcome.gone:
            pipe.hset(key, "gone", "1")
        if final:
            pipe.hincrby(key, "pending", -1)
        pipe.expire(key, settings.webhooks.state_ttl_seconds)
        pipe.execute()
    if final:
        _record_on_edit(redis, settings, delivery.edit_id, outcome is DeliveryOutcome.delivered, error)
    try:
        from service import metrics

        metrics.webhook_deliveries_total.labels(outcome=outcome.value).inc()
    except Exception:  # metrics must never break delivery
        log.debug("could not count webhook delivery", exc_info=True)


def _record_on_edit(redis: redis_lib.Redis, settings: Settings, edit_id: str, ok: bool, error: str | None) -> None:
    """Mirror an event's final outcome into the edit record, which renders ``Edit.webhook`` (JobStore's fields)."""
    try:
        from service.jobstore import JobStore

        store = JobStore(redis, settings)
        if store.tenant_of(edit_id) is None:
            return  # expired or unknown edit: do not resurrect a partial record
        store.record_webhook_delivery(edit_id, ok=ok, error=None if ok else error)
    except Exception:
        log.exception("edit %s: webhook outcome not recorded on the edit", edit_id)


# ---------------------------------------------------------------------------------------------- delivery

def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_delay(attempt: int, config: WebhookSettings, retry_after: float | None = None,
                rand: Callable[[], float] = random.random) -> float:
    """Backoff for the retry after ``attempt`` failed: schedule ± jitter, or the receiver's Retry-After."""
    schedule = config.backoff_seconds or [1.0]
    base = schedule[min(attempt - 1, len(schedule) - 1)]
    delay = base * (1 + config.jitter_ratio * (2 * rand() - 1))
    if retry_after is not None:
        delay = max(delay, min(retry_after, config.max_retry_after_seconds))
    return max(0.0, delay)


def signing_secret(redis: redis_lib.Redis, tenant: str, settings: Settings) -> str:
    """The tenant's webhook secret (``service.auth``), read per attempt so a rotation applies at once.

    ``service.auth`` itself falls back to ``settings.webhooks.secret`` for tenants without one (auth off).
    """
    try:
        from service.auth import webhook_secret
    except ImportError:  # the sender deployed without the auth module
        return settings.webhooks.secret
    return webhook_secret(redis, tenant, settings) or settings.webhooks.secret


@dataclass
class AttemptResult:
    outcome: DeliveryOutcome
    status_code: int | None = None
    error: str | None = None
    retry_in: float | None = None


class Deliverer:
    """Runs one delivery attempt end to end: guard → sign → POST → record → maybe schedule a retry."""

    def __init__(self, settings: Settings, redis: redis_lib.Redis,
                 resolver: egress.Resolver = egress.system_resolver,
                 client_factory: Callable[[], httpx.Client] = egress.new_client):
        self.settings = settings
        self.config = settings.webhooks
        self.redis = redis
        self.resolver = resolver
        self.client_factory = client_factory
        self.allow = egress.AllowList.parse(self.config.allow_hosts)

    def run(self, delivery: Delivery) -> AttemptResult:
        if _text(self.redis.hget(state_key(delivery.edit_id), "gone")) == "1":
            result = AttemptResult(DeliveryOutcome.gone, error="receiver answered 410 Gone earlier; not sent")
        else:
            result = self._attempt(delivery)
        if result.outcome is DeliveryOutcome.retrying:
            if delivery.retryable and delivery.attempt < self.config.max_attempts:
                result.retry_in = retry_delay(delivery.attempt, self.config, result.retry_in)
            else:
                result.outcome, result.retry_in = DeliveryOutcome.failed, None
        _record_attempt(self.redis, self.settings, delivery, result.outcome, result.status_code, result.error)
        log.info("webhook %s attempt %d to %s: %s%s", delivery.msg_id, delivery.attempt, delivery.url,
                 result.outcome.value, f" ({result.error})" if result.error else "")
        if result.retry_in is not None:
            enqueue_delivery(self.redis, delivery.next_attempt(), self.config, result.retry_in)
        return result

    def _attempt(self, delivery: Delivery) -> AttemptResult:
        try:
            destination = egress.check_url(delivery.url, self.allow, self.resolver)
        except egress.DestinationRefused as exc:
            outcome = DeliveryOutcome.refused if exc.permanent else DeliveryOutcome.retrying
            return AttemptResult(outcome, error=f"refused: {exc}" if exc.permanent else str(exc))
        body = delivery.body.encode()
        headers = {
            **sign(signing_secret(self.redis, delivery.tenant, self.settings), delivery.msg_id, None, body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }
        try:
            with self.client_factory() as client:
                reply = egress.pinned_post(client, destination, body, headers, self.config.timeout_seconds)
        except (httpx.TimeoutException, JobTimeoutException):
            return AttemptResult(DeliveryOutcome.retrying, error=f"timeout after {self.config.timeout_seconds:g}s")
        except httpx.HTTPError as exc:
            return AttemptResult(DeliveryOutcome.retrying, error=f"connection error: {exc!r}")
        return self._classify(reply)

    @staticmethod
    def _classify(reply: egress.Reply) -> AttemptResult:
        status = reply.status_code
        if 200 <= status < 300:
            return AttemptResult(DeliveryOutcome.delivered, status)
        if status == 410:
            return AttemptResult(DeliveryOutcome.gone, status, "HTTP 410 Gone: no more events for this edit")
        if 300 <= status < 400:
            where = reply.headers.get("location", "?")
            return AttemptResult(DeliveryOutcome.retrying, status, f"HTTP {status} redirect to {where} not followed")
        retry_after = parse_retry_after(reply.headers.get("retry-after")) if status in RETRY_AFTER_STATUSES else None
        snippet = reply.body_prefix[:200].decode("utf-8", "replace").strip()
        return AttemptResult(DeliveryOutcome.retrying, status, f"HTTP {status}" + (f": {snippet}" if snippet else ""),
                             retry_in=retry_after)


def deliver(delivery: dict) -> str:
    """The RQ job: one attempt of one delivery (runs in ``python -m service.webhooks``)."""
    from rq import get_current_job

    job = get_current_job()
    settings = get_settings()
    connection = job.connection if job is not None else redis_lib.Redis.from_url(settings.redis_url)
    return Deliverer(settings, connection).run(Delivery(**delivery)).outcome.value


# ---------------------------------------------------------------------------------------------- process

def main(argv: list[str] | None = None) -> None:
    """``python -m service.webhooks``: serve the ``webhooks`` queue (retries need the RQ scheduler)."""
    from rq import SimpleWorker

    parser = argparse.ArgumentParser(prog="python -m service.webhooks", description=__doc__.split("\n")[0])
    parser.add_argument("--burst", action="store_true", help="deliver what is queued, then exit")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    if settings.webhooks.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.webhooks.metrics_port)
    connection = redis_lib.Redis.from_url(settings.redis_url)
    worker = SimpleWorker([Queue(QUEUE_NAME, connection=connection)], connection=connection)
    worker.work(burst=args.burst, with_scheduler=True, logging_level=args.log_level)


if __name__ == "__main__":
    main()
