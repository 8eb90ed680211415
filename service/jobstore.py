"""Edit records in Redis and their RQ jobs: the write path, the single place that changes an edit's status.

Reading (rendering, presigned URLs, ETA, listing) is ``service.editview``; this module writes.

Why one place: the gateway, every GPU worker and the reaper write the same records concurrently. Each
status change is one Lua script that checks the current status against an explicit transition table, so
a terminal edit never changes again (a late ``mark_succeeded`` after a cancel, or a duplicate run, is a
no-op) and no writer can clobber another. After a change the new ``Edit`` is published on
``editserve:events:{id}`` (SSE, ``Prefer: wait``) and handed to the store's listeners: the process's main
(the gateway's app factory, the worker) adds ``service.webhooks.emit``; this module never imports a watcher.

Redis layout (all keys prefixed ``editserve:``; names in ``service.keys``, scripts in ``service.scripts``)::

    edit:{id}                 hash: status, tenant, kind, model, queue, payload, params, webhook, timestamps,
                              progress, results, attention_maps, error, attempts, batch/worker info, revision
    tenant:{tenant}:edits     sorted set of edit ids scored by creation time (ms): listing, newest first
    idem:{tenant}:{key}       JSON {edit_id, fingerprint}, claimed with SET NX (24 h)
    stats:{batch key}|all     hash: EWMA of seconds per step and per job (ETA estimates)
    events:{id}               pub/sub channel carrying the Edit JSON after every change
    (tenant:{t}:queued|released|held:{p}, limits:*)   admission and fair share: see service.limits

The RQ job id IS the edit id; RQ retries are off because the worker's reaper requeues crashed jobs
through ``mark_requeued`` + ``reenqueue`` within ``worker.max_retries``.

Creating an edit is one script (``service.limits``): it checks the queue limits (and, on the JSON submit
path, the request rate and the Idempotency-Key), writes the RQ job hash and the record, and either pushes
the id onto its RQ queue or holds it for fair share. Every transition script also keeps those counts and, on a terminal status,
releases the tenant's next held edit in the same atomic step.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
from rq import Queue
from rq.exceptions import InvalidJobOperationError, NoSuchJobError
from rq.job import Job, JobStatus

from editserve.contract import (
    ALLOWED_FROM,
    BatchKey,
    Edit,
    EditList,
    EditStatus,
    ErrorInfo,
    ErrorType,
    JobPayload,
    WebhookSpec,
    job_error,
)
from editserve.kinds import sweep_cells
from service import limits, metrics, scripts, throughput
from service.config import Settings
from service.editview import EditView, load_record
from service.keys import edit_key, eta_stats_keys, events_channel, idem_key
from service.limits import Accounting
from service.queues import BATCH_TAG_FIELD, batch_tag, queue_name, rq_queue_key, same_key_queues_ahead
from service.storage import Storage

log = logging.getLogger(__name__)

JOB_FUNCTION = "worker.runtime.execute.run_single"
IDEMPOTENCY_WAIT_SECONDS = 5.0
STATS_EWMA_ALPHA = 0.2

Q, P, S, F, C = (EditStatus.queued, EditStatus.processing, EditStatus.succeeded, EditStatus.failed,
                 EditStatus.canceled)

StatusListener = Callable[[redis.Redis, Edit, str, str], None]
"""Told of every published change: ``(connection, edit, event, tenant)``, event ``started``, ``progress`` or
``completed``. Must not raise into the caller's transition (a raise is logged and dropped)."""


_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


_last_id = [0]
_id_lock = threading.Lock()


def new_edit_id() -> str:
    """26 lowercase Crockford-base32 characters: 48-bit ms timestamp + 80 random bits.

    Time-sortable, URL-safe and valid as an RQ job id (letters and digits only). Monotonic within a process
    (as ULIDs: in the same millisecond the previous id + 1), because listings order edits of one
    millisecond by id and one gateway creates several per millisecond.
    """
    value = (int(time.time() * 1000) << 80) | secrets.randbits(80)
    with _id_lock:
        if value >> 80 <= _last_id[0] >> 80:
            value = _last_id[0] + 1
        _last_id[0] = value
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def request_fingerprint(payload: JobPayload, extra: str = "") -> str:
    """Identity of a request for idempotency: the request as resolved, without the per-id image key."""
    body = payload.request.model_dump_json(exclude={"image"})
    return hashlib.sha256((body + "|" + extra).encode()).hexdigest()


class EditNotFound(LookupError):
    pass


class EditConflict(Exception):
    """The edit's state does not allow the operation (e.g. cancel of a finished edit)."""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


def _now() -> float:
    return time.time()



class JobStore:
    def __init__(self, redis: redis.Redis, settings: Settings, storage: Storage | None = None,
                 listeners: Iterable[StatusListener] = ()):
        self.redis = redis
        self.settings = settings
        self.view = EditView(redis, settings, storage)
        self._listeners: list[StatusListener] = list(listeners)
        self._transition_script = redis.register_script(scripts.TRANSITION)
        self._progress_script = redis.register_script(scripts.PROGRESS)
        self._preview_script = redis.register_script(scripts.PREVIEW)
        self._detail_script = redis.register_script(scripts.PROGRESS_DETAIL)
        self._ewma_script = redis.register_script(scripts.EWMA)
        self._release_claim_script = redis.register_script(scripts.COMPARE_AND_DELETE)
        self.accounting = Accounting(redis, settings)
        self._last_progress_publish: dict[str, float] = {}
        self._in_progress_here: set[str] = set()  # for the livesum gauge: only this process decrements
        self._lock = threading.Lock()

    def add_listener(self, listener: StatusListener) -> None:
        """Tell ``listener`` of every start, progress report and terminal change this store publishes."""
        self._listeners.append(listener)

    @property
    def storage(self) -> Storage:
        return self.view.storage

    # Reads are the view's (service.editview); these two keep callers that hold a store short.
    def get(self, edit_id: str, tenant: str | None = None) -> Edit | None:
        """:meth:`EditView.get`: the edit as the API shows it; None if unknown or another tenant's."""
        return self.view.get(edit_id, tenant)

    def list(self, tenant: str, **filters) -> EditList:
        """:meth:`EditView.list`: the tenant's edits newest first."""
        return self.view.list(tenant, **filters)

    @property
    def retention_seconds(self) -> int:
        return self.settings.retention.record_ttl_seconds or self.settings.s3.retention_days * 24 * 3600

    # ------------------------------------------------------------------ gateway side

    def find_idempotent(self, tenant: str, key: str, fingerprint: str) -> Edit | None:
        """The edit an Idempotency-Key already created, or None; IdempotencyConflict if the body differs."""
        raw = self.redis.get(idem_key(tenant, key))
        if raw is None:
            return None
        return self._resolve_claim(tenant, key, raw, fingerprint)

    def _resolve_claim(self, tenant: str, key: str, raw: bytes, fingerprint: str) -> Edit:
        claim = json.loads(raw)
        if claim["fingerprint"] != fingerprint:
            raise IdempotencyConflict(
                "this Idempotency-Key was already used with a different request body; "
                "use a new key for a different request")
        deadline = time.monotonic() + IDEMPOTENCY_WAIT_SECONDS
        while True:  # a concurrent duplicate may still be writing the record
            edit = self.get(claim["edit_id"], tenant)
            if edit is not None:
                return edit
            if time.monotonic() > deadline:
                # its creator died between claim and record: release the claim so a retry can proceed
                self._release_claim_script(keys=[idem_key(tenant, key)], args=[raw])
                raise EditConflict("a request with this Idempotency-Key did not complete; retry the request")
            time.sleep(0.02)

    def create(self, payload: JobPayload, *, webhook: WebhookSpec | None, idempotency_key: str | None,
               fingerprint: str | None = None, rate_limit: bool = False) -> tuple[Edit, bool]:
        """Record the edit and enqueue its RQ job; with an Idempotency-Key a duplicate returns the first edit.

        ``fingerprint`` identifies the request body (the gateway includes the input image's hash);
        by default it is derived from ``payload.request``. ``rate_limit`` counts the request against its
        tenant's rate in the same script. Returns (edit, created).
        """
        admission_request = self._admission_request(payload, webhook, idempotency_key, fingerprint, rate_limit)
        admission = self.accounting.admit(admission_request)
        if admission.state == "duplicate":
            return self._duplicate(payload, idempotency_key, admission, admission_request), False
        return self._admitted(payload, admission_request, admission), True

    async def create_async(self, connection, payload: JobPayload, *, webhook: WebhookSpec | None,
                           idempotency_key: str | None, fingerprint: str | None = None,
                           rate_limit: bool = False) -> tuple[Edit, bool]:
        """:meth:`create` through an asyncio Redis client: one round trip, no thread (the JSON submit path)."""
        admission_request = self._admission_request(payload, webhook, idempotency_key, fingerprint, rate_limit)
        admission = await self.accounting.admit_async(connection, admission_request)
        if admission.state == "duplicate":  # rare: a replay; resolving it may poll for the first request's record
            edit = await asyncio.to_thread(self._duplicate, payload, idempotency_key, admission, admission_request)
            return edit, False
        return self._admitted(payload, admission_request, admission), True

    def _admission_request(self, payload: JobPayload, webhook: WebhookSpec | None, idempotency_key: str | None,
                           fingerprint: str | None, rate_limit: bool) -> limits.AdmissionRequest:
        """The record, its RQ job hash and the claim, built without Redis."""
        request = payload.request
        name = queue_name(payload.batch_key, request.priority)
        created = payload.created_at.timestamp()
        record: dict[str, str] = {
            "id": payload.id,
            "status": EditStatus.queued.value,
            "tenant": payload.tenant,
            "kind": request.kind,
            "model": payload.batch_key.model,
            "queue": name,
            "payload": payload.model_dump_json(),
            "params": json.dumps(build_params(payload)),
            "created_at": repr(created),
            "enqueued_at": repr(_now()),
            "attempts": "0",
            "revision": "1",
        }
        if webhook is not None:
            record["webhook"] = webhook.model_dump_json()
        claim = None
        if idempotency_key:
            fingerprint = fingerprint or request_fingerprint(payload)
            claim = (idem_key(payload.tenant, idempotency_key),
                     json.dumps({"edit_id": payload.id, "fingerprint": fingerprint}),
                     self.settings.retention.idempotency_ttl_seconds)
        worker = self.settings.worker
        job = Queue(name, connection=self.redis).create_job(
            JOB_FUNCTION, args=(record["payload"],), job_id=payload.id, timeout=worker.job_timeout_seconds,
            result_ttl=worker.result_ttl_seconds, failure_ttl=worker.result_ttl_seconds,
            description=f"edit {payload.id}", status=JobStatus.CREATED)
        lim = self.settings.limits
        return limits.AdmissionRequest(
            record=record, score_ms=int(created * 1000), priority=request.priority, job_key=job.key,
            job_fields={**job.to_dict(), BATCH_TAG_FIELD: batch_tag(payload.batch_key)}, queues_ahead=[rq_queue_key(q) for q in same_key_queues_ahead(name)],
            stats_keys=_eta_keys(payload.batch_key),
            rate=(payload.tenant, lim.tenant_rps, lim.tenant_burst) if rate_limit else None, claim=claim)

    def _admitted(self, payload: JobPayload, request: limits.AdmissionRequest, admission: limits.Admission) -> Edit:
        """The new edit, rendered from what was just written (no read back). Nobody can be subscribed to a
        brand-new id's events yet (a stream starts with a snapshot), so nothing is published."""
        metrics.jobs_submitted_total.labels(kind=payload.request.kind, model=payload.batch_key.model).inc()
        return self.view.render(request.record, queue_state=(admission.ahead, admission.stats))

    def _duplicate(self, payload: JobPayload, idempotency_key: str | None, admission: limits.Admission,
                   request: limits.AdmissionRequest) -> Edit:
        claim = json.loads(request.claim[1]) if request.claim else {}
        return self._resolve_claim(payload.tenant, idempotency_key or "", admission.prior_claim or b"",
                                   claim.get("fingerprint", ""))

    def _enqueue(self, edit_id: str, name: str, payload_json: str, *, unique: bool, at_front: bool = False) -> Job:
        worker = self.settings.worker
        return Queue(name, connection=self.redis).enqueue(
            JOB_FUNCTION,
            payload_json,
            job_id=edit_id,
            job_timeout=worker.job_timeout_seconds,
            result_ttl=worker.result_ttl_seconds,
            failure_ttl=worker.result_ttl_seconds,
            retry=None,
            unique=unique,
            at_front=at_front,
            description=f"edit {edit_id}",
        )

    def request_cancel(self, edit_id: str, tenant: str) -> Edit:
        """Queued: canceled now and removed from RQ. Processing: flag for the worker. Canceled already: the edit
        (a repeated cancel is idempotent). Succeeded or failed: EditConflict."""
        record = self._record(edit_id)
        if record is None or record.get("tenant") != tenant:
            raise EditNotFound(edit_id)
        for _ in range(3):
            status = EditStatus(record["status"])
            if status is C:
                break
            if status.terminal:
                raise EditConflict(f"edit {edit_id} is already {status.value}; only queued or processing "
                                   "edits can be canceled")
            if status is Q:
                if self._transition(edit_id, C, completed_at=True):
                    break
            else:
                rev, _ = self._run_transition(edit_id, {P}, None, set_fields={"cancel_requested": "1"})
                if rev:
                    self._publish(self._require(edit_id), tenant, event=None)
                    break
            record = self._record(edit_id) or record  # lost a race: re-read and decide again
        return self._require(edit_id)

    # ------------------------------------------------------------------ worker side

    def load_payload(self, edit_id: str) -> JobPayload:
        raw = self.redis.hget(edit_key(edit_id), "payload")
        if raw is None:
            raise EditNotFound(edit_id)
        return JobPayload.model_validate_json(raw)

    def mark_processing(self, edit_id: str, *, batch_id: str, batch_size: int, worker: str) -> bool:
        """queued → processing; counts an attempt. False (skip the job!) if the edit is no longer queued."""
        now = _now()
        rev, _ = self._run_transition(
            edit_id, ALLOWED_FROM[P], P,
            set_fields={"batch_id": batch_id, "batch_size": str(batch_size), "worker": worker},
            set_nx={"started_at": repr(now)}, incr=["attempts"], delete=["progress_step", "progress_total", "progress_detail"],
            queue_wait=True, now=now)
        if not rev:
            return False
        with self._lock:
            self._in_progress_here.add(edit_id)
        metrics.jobs_in_progress.inc()
        wait, model, kind = self.redis.hmget(edit_key(edit_id), "queue_wait_seconds", "model", "kind")
        if wait is not None:
            metrics.queue_wait_seconds.labels(model=(model or b"?").decode(), kind=(kind or b"?").decode()).observe(
                float(wait))
        self._publish_current(edit_id, event="started")
        return True

    def set_progress(self, edit_id: str, step: int, total: int) -> None:
        """One Redis round trip per step; publishing (SSE, webhooks) is throttled per edit."""
        rev = self._progress_script(keys=[edit_key(edit_id)], args=[int(step), int(total)])
        if not rev:
            return
        now = time.monotonic()
        interval = self.settings.worker.progress_min_interval_seconds
        with self._lock:
            last = self._last_progress_publish.get(edit_id, 0.0)
            due = step >= total or step <= 1 or now - last >= interval
            if due:
                self._last_progress_publish[edit_id] = now
        if due:
            self._publish_current(edit_id, event="progress")

    def set_preview(self, edit_id: str, step: int, total: int, key: str) -> None:
        """The latest preview (an S3 key) of a processing edit; published (SSE ``preview``), no webhook."""
        preview = json.dumps({"step": int(step), "total": int(total), "key": key})
        if self._preview_script(keys=[edit_key(edit_id)], args=[preview]):
            self._publish_current(edit_id, event=None)

    def set_progress_detail(self, edit_id: str, detail: str) -> None:
        """A kind's own progress beyond step/total (an inversion's phase and inner iterations), stored as JSON
        while the edit is processing; it travels with the next published change."""
        self._detail_script(keys=[edit_key(edit_id)], args=[detail])

    def is_cancel_requested(self, edit_id: str) -> bool:
        """True when the worker should stop: cancel asked, edit already terminal, or record gone."""
        status, flag = self.redis.hmget(edit_key(edit_id), "status", "cancel_requested")
        if status is None:
            return True
        return flag == b"1" or EditStatus(status.decode()).terminal

    def mark_succeeded(self, edit_id: str, *, results: list[dict], attention_maps: list[dict],
                       run_seconds: float, inversion: dict | None = None) -> bool:
        """``inversion``: an inversion job's stored objects (arrays, reconstruction, its error). True when this
        call made the edit succeeded (False: it was terminal already)."""
        fields = {"results": json.dumps(results), "attention_maps": json.dumps(attention_maps),
                  "run_seconds": repr(float(run_seconds))}
        if inversion is not None:
            fields["inversion"] = json.dumps(inversion)
        if self._transition(edit_id, S, completed_at=True, set_fields=fields):
            model, kind = self.redis.hmget(edit_key(edit_id), "model", "kind")
            metrics.job_duration_seconds.labels(model=(model or b"?").decode(), kind=(kind or b"?").decode()).observe(
                run_seconds)
            self._record_stats(edit_id, run_seconds, images=len(results))
            return True
        return False

    def mark_failed(self, edit_id: str, error: ErrorInfo) -> None:
        self._transition(edit_id, F, completed_at=True, set_fields={"error": error.model_dump_json()})

    def mark_canceled(self, edit_id: str) -> None:
        self._transition(edit_id, C, completed_at=True)

    def mark_requeued(self, edit_id: str, reason: str) -> bool:
        """processing → queued after a crash. Returns True if the caller should now ``reenqueue``.

        An edit whose cancel was requested becomes canceled instead (returns False), as does any edit
        that is no longer processing.
        """
        if self.redis.hget(edit_key(edit_id), "cancel_requested") == b"1":
            self._transition(edit_id, C, completed_at=True)
            return False
        requeued = self._transition(
            edit_id, Q, set_fields={"enqueued_at": repr(_now()), "requeue_reason": reason[:500]},
            delete=["progress_step", "progress_total", "progress_detail", "batch_id", "batch_size", "worker"])
        if requeued:
            self._leave_in_progress(edit_id)
        return requeued

    def reenqueue(self, edit_id: str, *, at_front: bool = True) -> None:
        """Put a requeued edit's RQ job back on its queue (same job id), at the front by default."""
        record = self._record(edit_id)
        if record is None or record["status"] != Q.value:
            return
        payload = JobPayload.model_validate_json(record["payload"])
        name = queue_name(payload.batch_key, payload.request.priority)  # today's layout, even for older records
        self.redis.hset(Job.key_for(edit_id), BATCH_TAG_FIELD, batch_tag(payload.batch_key))
        self._enqueue(edit_id, name, record["payload"], unique=False, at_front=at_front)

    def tenant_of(self, edit_id: str) -> str | None:
        raw = self.redis.hget(edit_key(edit_id), "tenant")
        return raw.decode() if raw is not None else None

    # ------------------------------------------------------------------ repair pass

    def release_held(self) -> int:
        """The periodic fair-share repair pass (``service.limits.Accounting.sweep``); the GPU worker's reaper
        calls it every pass (it is idempotent and cheap).

        Normal operation never needs it: admission and terminal transitions release atomically. It catches
        what they cannot see (edits finished by code without this bookkeeping, a raised per-tenant limit,
        set members whose edits are gone) and fails queued edits whose RQ job hash was deleted (``rq empty``),
        which would otherwise hold their tenant's slot forever. Returns how many held edits it released.
        """
        released, lost = self.accounting.sweep()
        for edit_id in lost:
            log.warning("edit %s: its RQ job is gone; failing it so its tenant's slot frees", edit_id)
            self.mark_failed(edit_id, job_error(ErrorType.queue_entry_lost,
                                                "the edit's queue entry was deleted before it ran; submit it again"))
        return released

    # ------------------------------------------------------------------ webhook sender side

    def record_webhook_delivery(self, edit_id: str, *, ok: bool, error: str | None = None) -> None:
        """Delivery bookkeeping shown in ``Edit.webhook`` (no status change, no event)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hincrby(edit_key(edit_id), "webhook_delivered" if ok else "webhook_failed", 1)
        if error is not None:
            pipe.hset(edit_key(edit_id), "webhook_last_error", error[:500])
        pipe.execute()

    # ------------------------------------------------------------------ internals

    def _record(self, edit_id: str) -> dict[str, str] | None:
        return load_record(self.redis, edit_id)

    def _require(self, edit_id: str) -> Edit:
        edit = self.get(edit_id)
        if edit is None:
            raise EditNotFound(edit_id)
        return edit

    def _run_transition(self, edit_id: str, allowed: Iterable[EditStatus], to: EditStatus | None, *,
                        set_fields: dict[str, str] | None = None, set_nx: dict[str, str] | None = None,
                        incr: list[str] | None = None, delete: list[str] | None = None,
                        queue_wait: bool = False, now: float | None = None, ttl: int = 0) -> tuple[int, str]:
        spec = {
            "from": [s.value for s in allowed], "to": to.value if to else "",
            "set": set_fields or {}, "set_nx": set_nx or {}, "incr": incr or [], "del": delete or [],
            "queue_wait": queue_wait, "now": now or _now(), "ttl": ttl,
        }
        # cjson turns an empty JSON object into an empty table either way; arrays stay arrays
        rev, previous = self._transition_script(keys=[edit_key(edit_id)],
                                                args=[json.dumps(spec), scripts.lua_config(self.settings)])
        return int(rev), previous.decode() if isinstance(previous, bytes) else previous

    def _transition(self, edit_id: str, to: EditStatus, *, completed_at: bool = False,
                    set_fields: dict[str, str] | None = None, delete: list[str] | None = None) -> bool:
        """Apply ``to`` if the transition table allows it; publish, emit webhooks, count. False if ignored."""
        fields = dict(set_fields or {})
        if completed_at:
            fields["completed_at"] = repr(_now())
        rev, previous = self._run_transition(
            edit_id, ALLOWED_FROM[to], to, set_fields=fields, delete=delete,
            ttl=self.retention_seconds if to.terminal else 0)
        if not rev:
            if previous:
                log.info("edit %s: %s → %s ignored", edit_id, previous, to.value)
            return False
        if to.terminal:
            self._finish_bookkeeping(edit_id, previous, to)
        event = "completed" if to.terminal else None
        self._publish_current(edit_id, event=event)
        return True

    def _leave_in_progress(self, edit_id: str) -> None:
        """This process no longer runs the edit (finished or requeued): keep the in-progress gauge true."""
        with self._lock:
            mine = edit_id in self._in_progress_here
            self._in_progress_here.discard(edit_id)
            self._last_progress_publish.pop(edit_id, None)
        if mine:
            metrics.jobs_in_progress.dec()

    def _finish_bookkeeping(self, edit_id: str, previous: str, to: EditStatus) -> None:
        self._leave_in_progress(edit_id)
        kind, model = self.redis.hmget(edit_key(edit_id), "kind", "model")
        metrics.jobs_completed_total.labels(model=(model or b"?").decode(), kind=(kind or b"?").decode(),
                                            status=to.value).inc()
        if previous == Q.value:  # never started: make sure no worker picks the RQ job up
            self._cancel_rq_job(edit_id)

    def _cancel_rq_job(self, edit_id: str) -> None:
        try:
            job = Job.fetch(edit_id, connection=self.redis)
            if not job.is_canceled:
                job.cancel()
            job.delete()  # never started: its hash and CanceledJobRegistry entry would otherwise stay forever
        except (NoSuchJobError, InvalidJobOperationError):
            pass
        except Exception:
            log.exception("edit %s: could not remove its RQ job", edit_id)

    def _record_stats(self, edit_id: str, run_seconds: float, *, images: int) -> None:
        """ETA statistics of this kind of work, and its model's recent throughput (``/v1/models``)."""
        record = self._record(edit_id)
        if record is None:
            return
        payload = JobPayload.model_validate_json(record["payload"])
        steps = max(1, payload.batch_key.steps)
        per_job = run_seconds / max(1, int(record.get("batch_size") or 1))
        self._ewma_script(keys=_eta_keys(payload.batch_key),
                          args=[run_seconds / steps, per_job, STATS_EWMA_ALPHA,
                                self.settings.retention.stats_ttl_seconds, per_job / steps])
        throughput.record(self.redis, payload.batch_key.model, images=images, steps=payload.batch_key.steps,
                          ttl=throughput.throughput_ttl(self.settings.throughput_window_seconds,
                                                        self.settings.retention.stats_ttl_seconds))

    def _publish_current(self, edit_id: str, *, event: str | None) -> None:
        record = self._record(edit_id)
        if record is None:
            return
        self._publish(self.view.render(record), record["tenant"], event=event)

    def _publish(self, edit: Edit, tenant: str, *, event: str | None) -> None:
        try:
            self.redis.publish(events_channel(edit.id), edit.model_dump_json())
        except redis.RedisError:
            log.exception("edit %s: event not published", edit.id)
        if event is None:
            return
        for listener in self._listeners:
            try:
                listener(self.redis, edit, event, tenant)
            except Exception:  # a watcher must never fail a transition
                log.exception("edit %s: listener %r failed on %s", edit.id, listener, event)

def _eta_keys(bk: BatchKey) -> list[str]:
    return eta_stats_keys(bk.model, bk.kind, bk.height, bk.width, bk.steps, bk.scheduler)


def build_params(payload: JobPayload) -> dict[str, Any]:
    """The parameters actually used (defaults resolved, seeds included) shown as ``Edit.params``."""
    request = payload.request
    params = request.model_dump(mode="json", exclude={"image", "webhook", "metadata", "kind"})
    bk = payload.batch_key
    params.update(model=bk.model, steps=bk.steps, scheduler=bk.scheduler, height=bk.height, width=bk.width,
                  seeds=list(payload.seeds))
    if request.kind == "p2p":
        params["seed"] = payload.seeds[0] if payload.seeds else None
        if payload.inversion_id:
            params["inversion_id"] = payload.inversion_id
    elif request.kind == "inversion":
        params.pop("seeds", None)
        params.pop("priority", None)
    else:
        params["cells"] = [
            {"index": i, "image_guidance": ig, "text_guidance": tg, "seed": seed}
            for i, (ig, tg, seed) in enumerate(sweep_cells(request, payload.seeds))
        ]
    return params
