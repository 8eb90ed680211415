"""Webhook events for edits: emission (filter → throttle → enqueue) and the delivery process.

Why split in two: status changes happen inside the GPU loop, which must never wait on a user's server.
``emit`` only touches Redis (a few commands) and enqueues a delivery job on the RQ queue ``webhooks``;
``python -m service.webhooks`` (``Sender``: RQ's job bookkeeping and retry scheduler driven by a loop of its
own, which outlasts Redis outages) does the HTTP.

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
``editserve:webhook:{edit_id}:done`` — hash, RQ job id → JSON outcome of the attempt that job ran: a job run
    again after an interruption (see "Redis outages") does not send or count that attempt a second time.
``editserve:webhooks:failed`` — stream of deliveries given up on (``failed`` after the last attempt, or
    ``refused``; not 410s, not progress events), newest ``FAILED_MAX_ENTRIES`` kept, none older than
    ``state_ttl_seconds``; each entry holds the whole delivery (body included) so it can be replayed:
    ``list_failed`` / ``replay_failed``, or ``python -m service.webhooks failed`` / ``replay ID``.

Metric: ``editserve_webhook_deliveries_total{outcome}``, one increment per attempt; outcome is one of
``DeliveryOutcome``: delivered, retrying (failed, will retry), failed (failed, no attempts left),
gone (410), refused (destination not allowed).

Redis outages (restarts, an AOF still ``LOADING``, a failover's read-only replica, timeouts): the process
(``Sender``, below) never exits on a ``redis.RedisError``. It logs once per outage, backs off (0.1 s doubling
to 5 s, jittered), and carries on with the same connection settings. Claim/acknowledge is RQ's: a job id is
moved to ``rq:queue:webhooks:intermediate`` when taken, gets a ``StartedJobRegistry`` entry while it runs and
leaves both when RQ records its end. An attempt cut off by an outage (the POST may or may not have reached
the receiver) is put back at the front of the queue once Redis answers and runs again: delivery is
at-least-once, always with the same ``webhook-id``. The ``:done`` mark, written in the same MULTI as the
attempt's counters and its next retry, keeps a job that already recorded its outcome from sending again.
Jobs left behind by a sender that died (SIGKILL, a cold stop during an outage) are requeued by any sender's
periodic sweep (``recover_stranded``) once their StartedJobRegistry entry has expired (the job timeout
+ 60 s) or, claimed but never started, after ``Sender.stranded_grace_seconds``.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import logging
import os
import random
import signal
import socket
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any

import httpx
import redis as redis_lib
from pydantic import BaseModel, Field
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue, SimpleWorker
from rq.exceptions import DequeueTimeout, NoSuchJobError
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.scheduler import RQScheduler
from rq.timeouts import JobTimeoutException
from rq.utils import parse_composite_key

from editserve.contract import Edit, EditStatus, WebhookDeliveryState, WebhookEvent, WebhookEventType
from editserve.webhooks import sign
from service import egress, redisconn
from service.config import Settings, WebhookSettings, get_settings

log = logging.getLogger(__name__)

QUEUE_NAME = "webhooks"
KEY_PREFIX = "editserve:webhook:"
USER_AGENT = "editserve-webhooks/1"
RETRY_AFTER_STATUSES = (429, 503)
DELIVER_JOB = "service.webhooks.deliver"  # by name: also right when enqueued from ``python -m service.webhooks``
FAILED_KEY = "editserve:webhooks:failed"  # "webhooks", plural: never an edit's editserve:webhook:{id}
FAILED_MAX_ENTRIES = 1000

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


def state_key(edit_id: str) -> str:
    return f"{KEY_PREFIX}{edit_id}"


def throttle_key(edit_id: str) -> str:
    return f"{KEY_PREFIX}{edit_id}:throttle"


def emitted_key(edit_id: str) -> str:
    return f"{KEY_PREFIX}{edit_id}:emitted"


def done_key(edit_id: str) -> str:
    return f"{KEY_PREFIX}{edit_id}:done"


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
                     delay_seconds: float = 0.0, pipeline: redis_lib.client.Pipeline | None = None) -> None:
    """Put one attempt on the ``webhooks`` queue, now or (via the scheduler) after a delay.

    With ``pipeline``, the job is written there (executed by the caller, e.g. in one MULTI with other writes).
    """
    queue = Queue(QUEUE_NAME, connection=redis)
    options: dict[str, Any] = dict(
        job_timeout=int(config.timeout_seconds * 3 + 30),
        result_ttl=600,  # the body holds presigned URLs: do not keep it around
        failure_ttl=config.state_ttl_seconds,
        description=f"webhook {delivery.event} for edit {delivery.edit_id} (attempt {delivery.attempt})",
    )
    if pipeline is not None:
        options["pipeline"] = pipeline
    if delay_seconds > 0:
        queue.enqueue_in(timedelta(seconds=delay_seconds), DELIVER_JOB, asdict(delivery), **options)
    else:
        queue.enqueue(DELIVER_JOB, asdict(delivery), **options)


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


def _dead_letter_worthy(delivery: Delivery, outcome: DeliveryOutcome) -> bool:
    """Given up on, and worth an operator's replay: not 410 (the receiver asked for silence), not progress."""
    return outcome in (DeliveryOutcome.failed, DeliveryOutcome.refused) and delivery.retryable


def _record_attempt(redis: redis_lib.Redis, settings: Settings, delivery: Delivery, result: AttemptResult,
                    job_id: str | None = None) -> None:
    """One MULTI/EXEC: the attempt's counters, its ``:done`` mark, its next attempt and its dead-letter entry.

    All or nothing: if Redis fails here, nothing of this attempt is recorded and the job, requeued by the
    sender, runs the attempt again (the POST may be repeated, with the same webhook-id). Once this commits, a
    re-run of the same job finds the ``:done`` mark and sends nothing.
    """
    config = settings.webhooks
    key = state_key(delivery.edit_id)
    outcome = result.outcome
    final = outcome is not DeliveryOutcome.retrying
    with redis.pipeline() as pipe:
        pipe.hincrby(key, "attempts", 1)
        pipe.hset(key, "last_attempt_at", datetime.now(timezone.utc).isoformat())
        if result.status_code is not None:
            pipe.hset(key, "last_status", result.status_code)
        if result.error:
            pipe.hset(key, "last_error", result.error[:500])
        if outcome is DeliveryOutcome.delivered:
            pipe.hincrby(key, "delivered", 1)
        elif final:
            pipe.hincrby(key, "failed", 1)
        if outcome is DeliveryOutcome.gone:
            pipe.hset(key, "gone", "1")
        if final:
            pipe.hincrby(key, "pending", -1)
        pipe.expire(key, config.state_ttl_seconds)
        if job_id is not None:
            pipe.hset(done_key(delivery.edit_id), job_id, _done_record(result))
            pipe.expire(done_key(delivery.edit_id), config.state_ttl_seconds)
        if result.retry_in is not None:
            enqueue_delivery(redis, delivery.next_attempt(), config, result.retry_in, pipeline=pipe)
        if final and _dead_letter_worthy(delivery, outcome):
            _add_failed(pipe, delivery, result, config.state_ttl_seconds)
        pipe.execute()
    try:
        from service import metrics

        metrics.webhook_deliveries_total.labels(outcome=outcome.value).inc()
    except Exception:  # metrics must never break delivery
        log.debug("could not count webhook delivery", exc_info=True)


def _done_record(result: AttemptResult, on_edit: bool = False) -> str:
    return json.dumps({"outcome": result.outcome.value, "status": result.status_code, "error": result.error,
                       "on_edit": on_edit})


def _record_on_edit(redis: redis_lib.Redis, settings: Settings, edit_id: str, ok: bool, error: str | None) -> None:
    """Mirror an event's final outcome into the edit record, which renders ``Edit.webhook`` (JobStore's fields).

    A transient Redis error propagates (the job is run again after the outage and, its attempt being
    recorded already, only redoes this step); anything else is logged and dropped.
    """
    try:
        from service.jobstore import JobStore

        store = JobStore(redis, settings)
        if store.tenant_of(edit_id) is None:
            return  # expired or unknown edit: do not resurrect a partial record
        store.record_webhook_delivery(edit_id, ok=ok, error=None if ok else error)
    except TRANSIENT_REDIS_ERRORS:
        raise
    except Exception:
        log.exception("edit %s: webhook outcome not recorded on the edit", edit_id)


# ---------------------------------------------------------------------------------------------- failed list

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


def _add_failed(pipe: redis_lib.client.Pipeline, delivery: Delivery, result: AttemptResult, ttl_seconds: int) -> None:
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
    f = {_text(k): _text(v) for k, v in fields.items()}
    return FailedDelivery(id=_text(entry_id), failed_at=f.get("failed_at") or "", outcome=f.get("outcome") or "",
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
    connection = _rq_connection(redis)
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

    def run(self, delivery: Delivery, job_id: str | None = None) -> AttemptResult:
        """One attempt. ``job_id``: the RQ job running it; a job run again after an interruption (Redis outage,
        dead sender) whose attempt was already recorded sends nothing and only finishes the bookkeeping."""
        if job_id is not None:
            earlier = self._recorded(delivery, job_id)
            if earlier is not None:
                return earlier
        if _text(self.redis.hget(state_key(delivery.edit_id), "gone")) == "1":
            result = AttemptResult(DeliveryOutcome.gone, error="receiver answered 410 Gone earlier; not sent")
        else:
            result = self._attempt(delivery)
        if result.outcome is DeliveryOutcome.retrying:
            if delivery.retryable and delivery.attempt < self.config.max_attempts:
                result.retry_in = retry_delay(delivery.attempt, self.config, result.retry_in)
            else:
                result.outcome, result.retry_in = DeliveryOutcome.failed, None
        _record_attempt(self.redis, self.settings, delivery, result, job_id)
        log.info("webhook %s attempt %d to %s: %s%s", delivery.msg_id, delivery.attempt, delivery.url,
                 result.outcome.value, f" ({result.error})" if result.error else "")
        if result.outcome is not DeliveryOutcome.retrying:
            self._mirror(delivery, result, job_id)
        return result

    def _recorded(self, delivery: Delivery, job_id: str) -> AttemptResult | None:
        raw = _text(self.redis.hget(done_key(delivery.edit_id), job_id))
        if raw is None:
            return None
        done = json.loads(raw)
        result = AttemptResult(DeliveryOutcome(done["outcome"]), done.get("status"), done.get("error"))
        log.warning("webhook %s attempt %d (job %s) ran again after an interruption; its outcome (%s) was "
                    "already recorded: not sent again", delivery.msg_id, delivery.attempt, job_id,
                    result.outcome.value)
        if result.outcome is not DeliveryOutcome.retrying and not done.get("on_edit"):
            self._mirror(delivery, result, job_id)
        return result

    def _mirror(self, delivery: Delivery, result: AttemptResult, job_id: str | None) -> None:
        _record_on_edit(self.redis, self.settings, delivery.edit_id, result.outcome is DeliveryOutcome.delivered,
                        result.error)
        if job_id is not None:
            self.redis.hset(done_key(delivery.edit_id), job_id, _done_record(result, on_edit=True))

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
    if job is None:  # called directly, outside a worker
        connection = redisconn.rq_client(settings.redis_url)
        return Deliverer(settings, connection).run(Delivery(**delivery)).outcome.value
    return Deliverer(settings, job.connection).run(Delivery(**delivery), job_id=job.id).outcome.value


# ---------------------------------------------------------------------------------------------- recovery

_REQUEUE_SCRIPT = """
local claimed = redis.call('LREM', KEYS[2], 0, ARGV[1])
for i = 2, #ARGV do claimed = claimed + redis.call('ZREM', KEYS[3], ARGV[i]) end
if claimed == 0 or redis.call('LPOS', KEYS[1], ARGV[1]) then return 0 end
redis.call('LPUSH', KEYS[1], ARGV[1])
return 1
"""


def requeue_job(connection: redis_lib.Redis, job_id: str, entries: list[str] | tuple[str, ...] = ()) -> bool:
    """Put a delivery job that was taken but never acknowledged back at the front of the queue.

    Atomic, and only for whoever *claims* it: the id must still be in the ``:intermediate`` list or hold one of
    ``entries`` (its StartedJobRegistry members, ``job_id:execution_id``), which this removes. So a sender
    requeueing its own interrupted job and another sender's sweep never both push it, and a job that RQ already
    acknowledged (neither left) is not pushed. Returns whether it was pushed.
    """
    queue = Queue(QUEUE_NAME, connection=connection)
    pushed = connection.eval(_REQUEUE_SCRIPT, 3, queue.key, queue.intermediate_queue_key,
                             queue.started_job_registry.key, job_id, *entries)
    if not pushed:
        return False
    try:
        job = Job.fetch(job_id, connection=connection)
    except NoSuchJobError:
        job = None
    with connection.pipeline() as pipe:
        if job is not None:
            job.set_status(JobStatus.QUEUED, pipeline=pipe)
        for entry in entries:
            execution = Execution.from_composite_key(entry, connection=connection)
            if job is not None:
                execution.delete(job=job, pipeline=pipe)
            else:
                pipe.delete(execution.key)
        pipe.delete(IntermediateQueue(queue.key, connection).get_first_seen_key(job_id))
        pipe.execute()
    return True


def recover_stranded(connection: redis_lib.Redis, *, grace_seconds: float = 30.0,
                     now: float | None = None) -> list[str]:
    """Requeue the delivery jobs a dead sender left behind; returns their ids. Safe to run from every sender.

    - StartedJobRegistry entries past their expiry (RQ sets it to the job timeout + 60 s when a job starts, and
      the job cannot run longer): the sender running it was killed, or stopped during an outage.
    - ids moved to ``:intermediate`` and never started, first seen there more than ``grace_seconds`` ago (a
      live sender starts a job milliseconds after taking it).
    Also trims RQ's finished/failed registries of this queue (RQ's own ``work()`` loop did, every 10 minutes).
    """
    now = time.time() if now is None else now
    queue = Queue(QUEUE_NAME, connection=connection)
    started_key = queue.started_job_registry.key
    recovered = []
    for raw in connection.zrangebyscore(started_key, 0, now):
        entry = _text(raw)
        job_id, _ = parse_composite_key(entry)
        if requeue_job(connection, job_id, [entry]):
            recovered.append(job_id)
    intermediate = IntermediateQueue(queue.key, connection)
    started_ids = {parse_composite_key(_text(m))[0] for m in connection.zrange(started_key, 0, -1)}
    for job_id in intermediate.get_job_ids():
        if job_id in started_ids or intermediate.set_first_seen(job_id):
            continue
        first_seen = intermediate.get_first_seen(job_id)
        if first_seen is not None and now - first_seen.timestamp() >= grace_seconds:
            if requeue_job(connection, job_id):
                recovered.append(job_id)
    FinishedJobRegistry(QUEUE_NAME, connection=connection).cleanup()
    FailedJobRegistry(QUEUE_NAME, connection=connection).cleanup()
    if recovered:
        log.warning("requeued %d webhook delivery job(s) left unfinished by a stopped sender: %s",
                    len(recovered), recovered)
    return recovered


# ---------------------------------------------------------------------------------------------- process

@dataclass
class Backoff:
    """Delays between tries while Redis is unavailable: ``first`` doubling up to ``cap``, each scaled by a
    random factor in [0.5, 1) so senders restarted together do not reconnect in lockstep."""

    first: float = 0.1
    cap: float = 5.0
    rand: Callable[[], float] = random.random
    failures: int = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2 ** min(self.failures, 32))
        self.failures += 1
        return delay * (0.5 + 0.5 * self.rand())

    def reset(self) -> None:
        self.failures = 0


class _RqWorker(SimpleWorker):
    """RQ's per-job bookkeeping (Execution, registries, results, counters) for ``Sender``, whose own loop
    replaces ``work()``: RQ's loop quits on any Redis error outside its dequeue call, and its forked scheduler
    dies on one and is only restarted by the 10-minute maintenance."""

    def handle_exception(self, job: Job, *exc_info) -> None:
        if isinstance(exc_info[1], (*TRANSIENT_REDIS_ERRORS, SystemExit, KeyboardInterrupt)):
            # Redis went away under the attempt, or a cold stop: not a failed delivery (RQ would file it as
            # one, never to be retried). Up to Sender, which requeues the job.
            raise exc_info[1]
        super().handle_exception(job, *exc_info)


@dataclass
class Sender:
    """The delivery process: take a job, run its attempt, move due retries to the queue, and repeat, riding
    out Redis outages (see the module docstring); SIGTERM/SIGINT stop it after the attempt in progress
    (within ``dequeue_timeout`` when idle, at once while waiting for Redis), a second one at once."""

    settings: Settings
    burst: bool = False
    logging_level: str | int = "INFO"
    backoff: Backoff = field(default_factory=Backoff)
    dequeue_timeout: int = 1  # seconds an idle sender blocks on the queue between looks at retries and signals
    schedule_interval: float = 1.0
    housekeeping_interval: float = 30.0
    stranded_grace_seconds: float = 30.0

    def __post_init__(self) -> None:
        # One quick try per command (redis-py's default retries would hide an outage for seconds, and could
        # repeat a non-idempotent write); the loop below does the waiting. Reconnects are implicit.
        self.connection = redisconn.rq_client(
            self.settings.redis_url, socket_connect_timeout=2, socket_timeout=self.dequeue_timeout + 4,
            retry=Retry(NoBackoff(), 0))
        self.queue = Queue(QUEUE_NAME, connection=self.connection)
        self.worker = _RqWorker([self.queue], connection=self.connection, prepare_for_work=False)
        self.worker.hostname, self.worker.pid = socket.gethostname(), os.getpid()
        self.scheduler = RQScheduler([self.queue], connection=self.connection, logging_level=self.logging_level)
        self.stop_requested = False
        self.in_flight: tuple[str, Job | None] | None = None  # taken from the queue, not yet acknowledged
        self.outage_since: float | None = None
        self.registered = False
        self.recovered_ok = False  # False at start and after an outage: check registration, sweep at once
        self.next_schedule = 0.0
        self.next_housekeeping = 0.0

    # -- lifecycle ----------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def request_stop(self, signum: int, frame: Any = None) -> None:
        if self.stop_requested:
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            raise SystemExit(1)  # an attempt in flight is left to recover_stranded
        self.stop_requested = True
        log.info("%s: stopping after the attempt in progress", signal.Signals(signum).name)

    def run(self) -> int:
        log.info("webhook sender %s on queue %s", self.worker.name, QUEUE_NAME)
        try:
            while not self.stop_requested:
                try:
                    more = self.step()
                except redis_lib.RedisError as exc:
                    self._redis_failed(exc)
                    continue
                except Exception:  # a bug must not take deliveries down with it; logged every time
                    log.exception("webhook sender loop failed; retrying")
                    self.in_flight = None  # no tight loop on one job: recover_stranded requeues it, later
                    self._sleep(self.backoff.next())
                    continue
                self._redis_ok()
                if not more:
                    break
        finally:
            self._teardown()
        return 0

    def step(self) -> bool:
        """One turn: recover, schedule, take at most one job and run it. False once a burst is done."""
        if not self.recovered_ok:
            self._after_reconnect()
        if self.in_flight is not None:
            self._requeue_in_flight()
        now = time.monotonic()
        if now >= self.next_schedule:
            self._schedule()
            self.next_schedule = now + self.schedule_interval
        if now >= self.next_housekeeping:
            self.worker.heartbeat()
            recover_stranded(self.connection, grace_seconds=self.stranded_grace_seconds)
            self.next_housekeeping = now + self.housekeeping_interval
        if self.stop_requested:
            return False
        taken = self._dequeue()
        if taken is None:
            return not self.burst
        job, queue = taken
        self.in_flight = (job.id, job)
        self.worker.execute_job(job, queue)  # a transient Redis error in it leaves in_flight set: requeued
        self.in_flight = None
        return True

    # -- the steps ----------------------------------------------------------------------------------
    def _after_reconnect(self) -> None:
        if not self.registered or not self.connection.exists(self.worker.key):
            self.worker.register_birth()  # again if Redis came back without our key (no AOF, long outage)
            self.registered = True
        self.worker.set_state("idle")
        self.next_housekeeping = 0.0  # sweep now: a sender may have died during the outage
        self.recovered_ok = True

    def _schedule(self) -> None:
        """Move retries that are due from the ScheduledJobRegistry to the queue (RQ's scheduler, in-process)."""
        scheduler = self.scheduler
        if scheduler.should_reacquire_locks:
            if scheduler.acquire_locks():
                scheduler.register_birth()
        if scheduler.acquired_locks:
            scheduler.heartbeat()  # refreshes the lock; drops it if another sender took it over
        if scheduler.acquired_locks:
            scheduler.enqueue_scheduled_jobs()

    def _dequeue(self) -> tuple[Job, Queue] | None:
        timeout = None if self.burst else self.dequeue_timeout
        try:
            return Queue.dequeue_any([self.queue], timeout, connection=self.connection)
        except DequeueTimeout:
            return None
        except redis_lib.RedisError as exc:
            job_id = getattr(exc, "job_id", None)  # rq: taken, then fetching it failed
            if job_id is not None:
                self.in_flight = (job_id, None)
            raise

    def _requeue_in_flight(self) -> None:
        job_id, job = self.in_flight
        started_key = self.queue.started_job_registry.key
        entries = [_text(member) for member, _ in self.connection.zscan_iter(started_key, match=f"{job_id}:*")]
        if requeue_job(self.connection, job_id, entries):
            log.warning("delivery job %s was cut off (Redis outage or cold stop) before RQ recorded its end: "
                        "queued again (its attempt is repeated unless recorded, same webhook-id)", job_id)
        elif job is not None and not self.connection.exists(job.key):
            self.queue.enqueue_job(job, at_front=True)  # Redis came back without it (no persistence)
            log.warning("delivery job %s was lost with Redis' data: queued again from memory", job_id)
        self.in_flight = None
        self.worker.set_state("idle")

    # -- outages ------------------------------------------------------------------------------------
    def _redis_failed(self, exc: redis_lib.RedisError) -> None:
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            log.warning("Redis unavailable (%s: %s); retrying with backoff up to %gs until it answers",
                        type(exc).__name__, exc, self.backoff.cap)
        else:
            log.debug("Redis still unavailable: %s: %s", type(exc).__name__, exc)
        self.recovered_ok = False
        self._sleep(self.backoff.next())

    def _redis_ok(self) -> None:
        if self.outage_since is not None:
            log.warning("Redis answers again after %.1fs; delivering", time.monotonic() - self.outage_since)
            self.outage_since = None
        self.backoff.reset()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stop_requested and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _teardown(self) -> None:
        if self.outage_since is not None:
            log.info("stopping while Redis is unavailable: not deregistering (entries expire by themselves)")
            return
        try:
            if self.in_flight is not None:
                self._requeue_in_flight()
            if self.scheduler.acquired_locks:
                self.scheduler.release_locks()
                self.scheduler.register_death()
            if self.registered:
                self.worker.register_death()
        except redis_lib.RedisError as exc:
            log.warning("could not deregister the sender: %s", exc)


def _cli_failed(settings: Settings, limit: int, as_json: bool) -> int:
    entries = list_failed(redisconn.rq_client(settings.redis_url), limit, settings=settings)
    for entry in entries:
        row = entry.summary()
        if as_json:
            print(json.dumps(row))
        else:
            status = f" HTTP {row['status_code']}" if row["status_code"] else ""
            print(f"{row['failed_at']}  {row['webhook_id']}  edit {row['edit_id']}  {row['event']}  "
                  f"{row['outcome']}{status} after {row['attempts']} attempt(s)  {row['url']}  {row['error'] or ''}")
    if not as_json:
        print(f"{len(entries)} failed deliver{'y' if len(entries) == 1 else 'ies'}", file=sys.stderr)
    return 0


def _cli_replay(settings: Settings, idents: list[str]) -> int:
    connection = redisconn.rq_client(settings.redis_url)
    rc = 0
    for ident in idents:
        try:
            entry = replay_failed(connection, ident, settings=settings)
        except KeyError:
            print(f"no failed delivery {ident!r} (see: python -m service.webhooks failed)", file=sys.stderr)
            rc = 1
            continue
        print(f"queued again: {entry.msg_id} (edit {entry.delivery.edit_id}, {entry.delivery.event}) "
              f"to {entry.delivery.url}")
    return rc


def main(argv: list[str] | None = None) -> int:
    """``python -m service.webhooks``: deliver webhooks; ``failed`` / ``replay ID…``: the failed list."""
    parser = argparse.ArgumentParser(prog="python -m service.webhooks", description=__doc__.split("\n")[0])
    parser.add_argument("--burst", action="store_true", help="deliver what is queued (and due), then exit")
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", metavar="[failed | replay]")
    failed = commands.add_parser("failed", help="list deliveries given up on, newest first")
    failed.add_argument("--limit", type=int, default=100)
    failed.add_argument("--json", action="store_true", help="one JSON object per line")
    replay = commands.add_parser("replay", help="queue failed deliveries again (same webhook-id; attempts restart)")
    replay.add_argument("ids", nargs="+", metavar="ID", help="a webhook-id (msg_…) or an entry id from `failed`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    if args.command == "failed":
        return _cli_failed(settings, args.limit, args.json)
    if args.command == "replay":
        return _cli_replay(settings, args.ids)
    if settings.webhooks.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.webhooks.metrics_port)
    sender = Sender(settings, burst=args.burst, logging_level=args.log_level)
    sender.install_signal_handlers()
    return sender.run()


if __name__ == "__main__":
    from service.webhooks import main as _main  # the importable module, not a second copy named __main__

    raise SystemExit(_main())
