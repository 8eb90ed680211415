"""The read view of edits: rendering a record as the API's ``Edit`` (presigned URLs, queue position, ETA),
listing a tenant's edits, reading ETA statistics. Never changes a record.

Why apart from ``service.jobstore``: the write path (transitions, admission) has many writers that must
stay atomic; the view has many readers (GET, list, SSE, ``Prefer: wait``, every published change) and
only reads, so it can grow (new fields, new filters) without touching the transition code.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime

import redis
from rq import Queue

from editserve.contract import (
    AttentionMapResult,
    Edit,
    EditList,
    EditStatus,
    ErrorInfo,
    Inversion,
    InversionList,
    InversionProgress,
    InversionResultUrls,
    PreviewImage,
    Progress,
    ResultImage,
    RunMetrics,
    WebhookDeliveryState,
    WebhookSpec,
)
from service import limits
from service.config import Settings
from service.keys import edit_key, eta_stats_keys, tenant_index_key
from service.liveness import live_workers
from service.queues import rq_queue_key, same_key_queues_ahead
from service.storage import Storage

MAX_LIST_LIMIT = 100

P, S = EditStatus.processing, EditStatus.succeeded


def _now() -> float:
    return time.time()


def _ts(value: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(value), tz=UTC) if value else None


def _encode_cursor(score: float, edit_id: str) -> str:
    return base64.urlsafe_b64encode(f"{int(score)}:{edit_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, edit_id = raw.split(":", 1)
        return int(score), edit_id
    except Exception as exc:
        raise ValueError("cursor is not one this API returned") from exc


def load_record(connection: redis.Redis, edit_id: str) -> dict[str, str] | None:
    """The edit's hash as text, or None when unknown (or expired with retention)."""
    raw = connection.hgetall(edit_key(edit_id))
    if not raw:
        return None
    return {k.decode(): v.decode() for k, v in raw.items()}


class EditView:
    """Reads edits for the API. Presigning needs no network, so a worker or sender without a Storage gets a
    lazy one."""

    def __init__(self, connection: redis.Redis, settings: Settings, storage: Storage | None = None):
        self.redis = connection
        self.settings = settings
        self._storage = storage

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = Storage(self.settings.s3)
        return self._storage

    def get(self, edit_id: str, tenant: str | None = None) -> Edit | None:
        """The edit with presigned URLs, queue position and ETA; None if unknown or owned by another tenant."""
        record = load_record(self.redis, edit_id)
        if record is None or (tenant is not None and record.get("tenant") != tenant):
            return None
        return self.render(record)

    def list(self, tenant: str, *, status: str | None = None, kind: str | None = None, model: str | None = None,
             limit: int = 20, cursor: str | None = None) -> EditList:
        """The tenant's edits newest first; ``next_cursor`` continues after the last one returned."""
        limit = max(1, min(int(limit), MAX_LIST_LIMIT))
        index = tenant_index_key(tenant)
        max_score: float | str = "+inf"
        after: tuple[int, str] | None = None
        if cursor:
            after = _decode_cursor(cursor)
            max_score = after[0]
        found: list[tuple[str, float]] = []
        offset, chunk = 0, max(limit * 4, 50)
        exhausted = False
        while len(found) < limit and not exhausted:
            batch = self.redis.zrevrangebyscore(index, max_score, "-inf", start=offset, num=chunk, withscores=True)
            offset += len(batch)
            exhausted = len(batch) < chunk
            ids = [m.decode() if isinstance(m, bytes) else m for m, _ in batch]
            if after is not None:  # same-ms members sort by id, descending: skip up to the cursor
                batch = [(i, s) for i, (_, s) in zip(ids, batch) if not (int(s) == after[0] and i >= after[1])]
            else:
                batch = [(i, s) for i, (_, s) in zip(ids, batch)]
            if not batch:
                continue
            pipe = self.redis.pipeline(transaction=False)
            for edit_id, _ in batch:
                pipe.hmget(edit_key(edit_id), "status", "kind", "model")
            rows = pipe.execute()
            stale = []
            for (edit_id, score), (st, kd, md) in zip(batch, rows):
                if st is None:
                    stale.append(edit_id)  # record expired with retention: drop from the index
                    continue
                if (status and st.decode() != status) or (kind and kd.decode() != kind) or (
                        model and md.decode() != model):
                    continue
                found.append((edit_id, score))
                if len(found) == limit:
                    break
            if stale:
                self.redis.zrem(index, *stale)
        edits = [e for e in (self.get(i) for i, _ in found) if e is not None]
        next_cursor = None
        if len(found) == limit:
            last_id, last_score = found[-1]
            if self._has_more(index, last_score, last_id):
                next_cursor = _encode_cursor(last_score, last_id)
        return EditList(data=edits, next_cursor=next_cursor)

    def _has_more(self, index: str, score: float, edit_id: str) -> bool:
        """Cheap look-ahead: anything older than the last returned entry (filters may still skip it)."""
        nxt = self.redis.zrevrangebyscore(index, score, "-inf", start=0, num=50, withscores=True)
        for member, s in nxt:
            m = member.decode() if isinstance(member, bytes) else member
            if not (int(s) == int(score) and m >= edit_id):
                return True
        return len(nxt) == 50

    def render(self, r: dict[str, str], *, queue_state: tuple[int | None, dict[str, float]] | None = None) -> Edit:
        """The API view of a record; ``queue_state`` (jobs ahead, ETA stats) when the caller already knows it."""
        status = EditStatus(r["status"])
        payload_raw = json.loads(r["payload"])
        request = payload_raw["request"]
        progress = None
        if status is S:  # finished means every step ran, whatever the last throttled update said
            total = int(r.get("progress_total") or payload_raw["batch_key"]["steps"])
            progress = Progress(step=total, total=total)
        elif r.get("progress_total"):
            progress = Progress(step=int(r["progress_step"]), total=int(r["progress_total"]))
        webhook = None
        if r.get("webhook"):
            spec = WebhookSpec.model_validate_json(r["webhook"])
            webhook = WebhookDeliveryState(url=spec.url, events=spec.events,
                                           delivered=int(r.get("webhook_delivered", 0)),
                                           failed=int(r.get("webhook_failed", 0)),
                                           last_error=r.get("webhook_last_error"))
        queue_position, eta = self._position_and_eta(r, status, progress, payload_raw, queue_state)
        model = r["model"]
        workers = None
        if status is EditStatus.queued:  # honest availability: no live worker, no borrowed ETA
            workers = live_workers(self.redis).get(model, 0)
            eta = eta if workers else None
        spec_catalog = self.settings.model_catalog()
        return Edit(
            id=r["id"],
            kind=r["kind"],
            model=model,
            status=status,
            created_at=_ts(r["created_at"]),
            started_at=_ts(r.get("started_at")),
            completed_at=_ts(r.get("completed_at")),
            progress=progress,
            queue_position=queue_position,
            eta_seconds=eta,
            workers=workers,
            params=json.loads(r["params"]),
            results=self._results(r) if status is S else [],
            attention_maps=self._attention_maps(r) if status is S else [],
            preview=self._preview(r),
            error=ErrorInfo.model_validate_json(r["error"]) if r.get("error") else None,
            metrics=RunMetrics(
                queue_wait_seconds=float(r["queue_wait_seconds"]) if r.get("queue_wait_seconds") else None,
                run_seconds=float(r["run_seconds"]) if r.get("run_seconds") else None,
                batch_id=r.get("batch_id"),
                batch_size=int(r["batch_size"]) if r.get("batch_size") else None,
                attempts=int(r.get("attempts", 0)),
            ),
            webhook=webhook,
            metadata=request.get("metadata") or {},
            random_weights=bool(spec_catalog[model].random_weights) if model in spec_catalog else False,
            cancel_requested=r.get("cancel_requested") == "1",
            revision=int(r.get("revision", 0)),
        )

    # ------------------------------------------------------------------ inversions (records of kind inversion)
    def get_inversion(self, inversion_id: str, tenant: str | None = None) -> Inversion | None:
        """The inversion resource; None if unknown, another tenant's, or not an inversion record."""
        record = load_record(self.redis, inversion_id)
        if record is None or record.get("kind") != "inversion" or (
                tenant is not None and record.get("tenant") != tenant):
            return None
        return self.render_inversion(record)

    def list_inversions(self, tenant: str, **filters) -> InversionList:
        page = self.list(tenant, kind="inversion", **filters)
        found = [self.get_inversion(e.id) for e in page.data]
        return InversionList(data=[i for i in found if i is not None], next_cursor=page.next_cursor)

    def render_inversion(self, r: dict[str, str]) -> Inversion:
        edit = self.render(r)
        payload = json.loads(r["payload"])
        bk = payload["batch_key"]
        request = {k: v for k, v in payload["request"].items() if k not in ("image", "webhook", "metadata", "kind")}
        request.update(model=bk["model"], steps=bk["steps"], scheduler=bk["scheduler"], resolution=bk["height"])
        progress = None
        if r.get("progress_detail") and edit.status is not S:  # processing, or where it stopped
            progress = InversionProgress.model_validate_json(r["progress_detail"])
        elif edit.status is S:
            inner = int(request.get("num_inner_steps") or 0) if request.get("method") == "null-text" else 0
            progress = InversionProgress(phase="null-text" if inner else "ddim", step=int(bk["steps"]),
                                         total=int(bk["steps"]), inner_iterations=0, inner_total=inner)
            if r.get("progress_detail"):
                last = InversionProgress.model_validate_json(r["progress_detail"])
                progress.inner_iterations = last.inner_iterations
        result, error = None, None
        stored = json.loads(r["inversion"]) if r.get("inversion") else None
        if edit.status is S and stored:
            arrays_url, expires_at = self.storage.presign_get(stored["arrays_key"])
            rec_url, _ = self.storage.presign_get(stored.get("reconstruction_key") or stored["arrays_key"])
            result = InversionResultUrls(reconstruction_url=rec_url, arrays_url=arrays_url, expires_at=expires_at)
            error = stored.get("reconstruction_error")
        return Inversion(id=edit.id, status=edit.status, model=edit.model, created_at=edit.created_at,
                         started_at=edit.started_at, completed_at=edit.completed_at, request=request,
                         progress=progress, result=result, reconstruction_error=error, error=edit.error,
                         metrics=edit.metrics, metadata=edit.metadata, random_weights=edit.random_weights,
                         cancel_requested=edit.cancel_requested)

    def _results(self, r: dict[str, str]) -> list[ResultImage]:
        out = []
        for item in json.loads(r.get("results") or "[]"):
            url, expires_at = self.storage.presign_get(item["key"])
            fields = {k: v for k, v in item.items() if k in ResultImage.model_fields and k != "url"}
            out.append(ResultImage(url=url, expires_at=expires_at, **fields))
        return out

    def _preview(self, r: dict[str, str]) -> PreviewImage | None:
        if not r.get("preview"):
            return None
        item = json.loads(r["preview"])
        url, expires_at = self.storage.presign_get(item["key"])
        return PreviewImage(step=item["step"], total=item["total"], url=url, expires_at=expires_at)

    def _attention_maps(self, r: dict[str, str]) -> list[AttentionMapResult]:
        out = []
        for item in json.loads(r.get("attention_maps") or "[]"):
            grid_url, expires_at = self.storage.presign_get(item["grid_key"])
            array_url, _ = self.storage.presign_get(item["array_key"])
            out.append(AttentionMapResult(prompt_index=item["prompt_index"], prompt=item["prompt"],
                                          tokens=item["tokens"], grid_url=grid_url, array_url=array_url,
                                          expires_at=expires_at))
        return out

    def _position_and_eta(self, r: dict[str, str], status: EditStatus, progress: Progress | None,
                          payload: dict, known: tuple[int | None, dict[str, float]] | None = None
                          ) -> tuple[int | None, float | None]:
        """Jobs ahead (0 = next) and seconds left: remaining steps × s/step + jobs ahead × s/job, from statistics
        of the same model, kind, size and scheduler only (``eta_stats_keys``); none yet → no ETA."""
        if status.terminal:
            return None, None
        bk = payload["batch_key"]
        steps = int(bk["steps"])
        if known is not None:
            ahead, stats = known
        else:
            stats = self._stats(bk)
        step_s, job_s = stats.get("step_seconds"), stats.get("job_seconds")
        if job_s is None and stats.get("job_step_seconds") is not None:  # another step count: scale per step
            job_s = stats["job_step_seconds"] * steps
        if status is P:
            if progress and progress.step > 0 and r.get("started_at"):
                rate = (_now() - float(r["started_at"])) / progress.step
                return None, round(max(0.0, (progress.total - progress.step) * rate), 2)
            return None, round(steps * step_s, 2) if step_s is not None else None
        if known is None:
            ahead = self._queue_position(r)
        if ahead is None:
            return None, None
        if step_s is None or job_s is None:
            return ahead, None
        return ahead, round(steps * step_s + ahead * job_s, 2)

    def _queue_position(self, r: dict[str, str]) -> int | None:
        name = r["queue"]
        if r.get("held"):  # an estimate: its tenant's held edits ahead, one of its running edits, its queue now
            held = limits.held_ahead(self.redis, r["tenant"], r["held"], r["id"])
            position = None if held is None else held + 1 + self.redis.llen(rq_queue_key(name))
        else:
            try:
                position = Queue(name, connection=self.redis).get_job_position(r["id"])
            except redis.RedisError:
                position = None
        if position is None:
            return None
        return position + sum(self.redis.llen(rq_queue_key(q)) for q in same_key_queues_ahead(name))

    def _stats(self, bk: dict) -> dict[str, float]:
        for key in eta_stats_keys(bk["model"], bk["kind"], bk["height"], bk["width"], bk["steps"], bk["scheduler"]):
            raw = self.redis.hgetall(key)
            if raw:
                return {k.decode(): float(v) for k, v in raw.items()}
        return {}
