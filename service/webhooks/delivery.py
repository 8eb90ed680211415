"""One delivery attempt end to end (guard -> sign -> POST -> record -> maybe schedule a retry): the RQ job
``deliver`` the sender process runs, never the GPU loop."""

from __future__ import annotations

import email.utils
import json
import logging
import random
import time
from collections.abc import Callable
from datetime import datetime, timezone

import httpx
import redis as redis_lib
from rq.timeouts import JobTimeoutException

from editserve.webhooks import sign
from service import egress, metrics, redisconn
from service.auth import webhook_secret
from service.config import Settings, WebhookSettings, get_settings
from service.jobstore import JobStore
from service.webhooks.events import (
    TRANSIENT_REDIS_ERRORS,
    AttemptResult,
    Delivery,
    DeliveryOutcome,
    done_key,
    enqueue_delivery,
    state_key,
    text,
)
from service.webhooks.failed import add_failed

log = logging.getLogger(__name__)

USER_AGENT = "editserve-webhooks/1"
RETRY_AFTER_STATUSES = (429, 503)


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
            add_failed(pipe, delivery, result, config.state_ttl_seconds)
        pipe.execute()
    try:
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
        store = JobStore(redis, settings)
        if store.tenant_of(edit_id) is None:
            return  # expired or unknown edit: do not resurrect a partial record
        store.record_webhook_delivery(edit_id, ok=ok, error=None if ok else error)
    except TRANSIENT_REDIS_ERRORS:
        raise
    except Exception:
        log.exception("edit %s: webhook outcome not recorded on the edit", edit_id)


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
    return webhook_secret(redis, tenant, settings) or settings.webhooks.secret


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
        if text(self.redis.hget(state_key(delivery.edit_id), "gone")) == "1":
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
        raw = text(self.redis.hget(done_key(delivery.edit_id), job_id))
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
