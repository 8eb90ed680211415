"""Dataset jobs (the InstructPix2Pix data engine): records, the sample plan, keys and events. Torch-free.

A dataset job turns caption triplets into CLIP-filtered image pairs. It owns no GPU work itself: a driver
(``worker.runtime.datasets``) fans each triplet out into ``samples_per_triplet`` ordinary P2P edits on the
edit queues at *low* priority, collects their CLIP scores, applies the keep rule and writes the kept pairs.

Redis layout (prefix ``editserve:``)::

    dataset:{id}            hash: status, tenant, model, request (JSON, triplets left out), params, total,
                            next (first triplet not fanned out yet), done, counts (c_samples, c_kept, c_failed,
                            c_with_pairs), output (JSON of S3 keys), error, timestamps, revision
    dataset:{id}:inflight   hash: triplet index → JSON list of its sample edit ids (fanned out, not collected)
    dataset:{id}:done       set of collected triplet indexes: a triplet is counted once, whoever collects it
    dataset:{id}:kept       hash: triplet index → kept pairs (which part objects exist)
    datasets:active         set of dataset ids a driver still has to advance
    tenant:{t}:datasets     set of the tenant's active dataset ids (the per-tenant limit)
    dataset:{id}:lease      string with a PX expiry: the driver advancing this job now

S3 layout under ``datasets/{id}/``: ``triplets.jsonl`` (normalised input), ``parts/{i}.tar`` (one
collected triplet's kept pairs), then ``shards/shard-{k}.tar`` (WebDataset), ``metadata.jsonl`` and
``manifest.json``.

Why this shape survives crashes: every step is either a pure function of stored state (the sample plan is
derived from the job's seed, so a redone sample is the same sample) or writes S3 objects under fixed keys
(a redo overwrites, never adds), and each triplet's counts are added by one script guarded by the ``done``
set. Sample edit ids are recorded in ``inflight`` *before* their edits are created, so a driver that dies
in between leaves ids whose records are missing, which the next driver creates.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from collections.abc import Callable, Sequence
from typing import Any

import redis

from editserve.contract import (
    CaptionTriplet,
    Dataset,
    DatasetCounts,
    DatasetOutput,
    DatasetProgress,
    DatasetRequest,
    EditStatus,
    ErrorInfo,
)
from service import scripts
from service.config import Settings
from service.keys import (
    DATASETS_ACTIVE_KEY as ACTIVE_KEY,
    dataset_key,
    done_key,
    inflight_key,
    kept_key,
    lease_key,
    tenant_active_key,
)

log = logging.getLogger(__name__)

DatasetListener = Callable[[redis.Redis, Dataset, str, Any, str, "int | None"], None]
"""``(redis, dataset, tenant, webhook spec or None, event, progress step)``: told of every dataset event."""

Q, P, S, F, C = (EditStatus.queued, EditStatus.processing, EditStatus.succeeded, EditStatus.failed,
                 EditStatus.canceled)
SHARD_PAIRS = 1000  # kept pairs per WebDataset shard


def prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/"


def triplets_object(dataset_id: str) -> str:
    return f"{prefix(dataset_id)}triplets.jsonl"


def part_object(dataset_id: str, triplet: int) -> str:
    return f"{prefix(dataset_id)}parts/{triplet:08d}.tar"


def shard_object(dataset_id: str, shard: int) -> str:
    return f"{prefix(dataset_id)}shards/shard-{shard:05d}.tar"


def metadata_object(dataset_id: str) -> str:
    return f"{prefix(dataset_id)}metadata.jsonl"


def manifest_object(dataset_id: str) -> str:
    return f"{prefix(dataset_id)}manifest.json"


def sample_key(triplet: int, sample: int) -> str:
    """The WebDataset key of one pair (no dots: WebDataset splits the extension at the first one)."""
    return f"t{triplet:08d}_s{sample:04d}"


# ---------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class SamplePlan:
    """One sample of one triplet: everything that makes its pair, derived from the job's seed alone."""

    sample: int
    seed: int
    p2p_fraction: float
    guidance: float


def triplet_plan(job_seed: int, triplet: int, count: int, fraction: tuple[float, float],
                 guidance: tuple[float, float]) -> list[SamplePlan]:
    """``count`` samples: a fresh 32-bit seed each (unique within the triplet, as the reference draws them),
    p ~ U(fraction), guidance ~ U(guidance). A redo gives the same plan (string seeds hash deterministically)."""
    rng = random.Random(f"editserve-dataset:{job_seed}:{triplet}")
    seen: set[int] = set()
    plan = []
    for sample in range(count):
        seed = rng.getrandbits(32)
        while seed in seen:
            seed = rng.getrandbits(32)
        seen.add(seed)
        plan.append(SamplePlan(sample=sample, seed=seed, p2p_fraction=round(rng.uniform(*fraction), 6),
                               guidance=round(rng.uniform(*guidance), 6)))
    return plan


def parse_triplets_jsonl(data: bytes, field: str = "triplets_key") -> list[CaptionTriplet]:
    """JSONL lines → triplets; ``caption``/``edit`` are accepted for ``input``/``instruction`` (the released
    IP2P prompt file and its generation script disagree on the key). Errors name the line."""
    from pydantic import ValidationError

    triplets = []
    for number, line in enumerate(data.decode("utf-8", errors="strict").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{field}: line {number} is not JSON: {exc.msg}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{field}: line {number} is not a JSON object")
        raw = dict(raw)
        if "input" not in raw and "caption" in raw:
            raw["input"] = raw.pop("caption")
        if "instruction" not in raw and "edit" in raw:
            raw["instruction"] = raw.pop("edit")
        raw = {k: raw[k] for k in ("input", "instruction", "output") if k in raw}
        try:
            triplets.append(CaptionTriplet(**raw))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise ValueError(f"{field}: line {number}, {where}: {first.get('msg')}") from None
    if not triplets:
        raise ValueError(f"{field}: the object holds no triplets")
    return triplets


def triplets_jsonl(triplets: list[CaptionTriplet]) -> bytes:
    return "".join(t.model_dump_json() + "\n" for t in triplets).encode()


class DatasetNotFound(LookupError):
    pass


class DatasetConflict(Exception):
    pass


def _ts(value: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(value), UTC) if value else None


class DatasetStore:
    """Dataset records: create (gateway), read and render, cancel, and the driver's guarded steps."""

    def __init__(self, connection: redis.Redis, settings: Settings, storage=None,
                 listeners: Sequence[DatasetListener] = ()):
        self.redis = connection
        self.settings = settings
        self._storage = storage
        self._listeners = list(listeners)
        self._transition = connection.register_script(scripts.DATASET_TRANSITION)
        self._collect = connection.register_script(scripts.DATASET_COLLECT)
        self._plan = connection.register_script(scripts.DATASET_PLAN)
        self._lease = connection.register_script(scripts.DATASET_LEASE)

    @property
    def storage(self):
        if self._storage is None:
            from service.storage import Storage

            self._storage = Storage(self.settings.s3)
        return self._storage

    # ------------------------------------------------------------------ gateway side
    def active_count(self, tenant: str) -> int:
        return int(self.redis.scard(tenant_active_key(tenant)))

    def create(self, dataset_id: str, tenant: str, request: DatasetRequest, params: dict[str, Any],
               total: int) -> Dataset:
        now = repr(time.time())
        record = {
            "id": dataset_id, "tenant": tenant, "status": Q.value, "model": params["model"],
            "request": request.model_dump_json(exclude={"triplets"}), "params": json.dumps(params),
            "total": str(total), "next": "0", "done": "0", "c_samples": "0", "c_kept": "0", "c_failed": "0",
            "c_with_pairs": "0", "created_at": now, "revision": "1",
        }
        with self.redis.pipeline() as pipe:
            pipe.hset(dataset_key(dataset_id), mapping=record)
            pipe.sadd(tenant_active_key(tenant), dataset_id)
            pipe.sadd(ACTIVE_KEY, dataset_id)
            pipe.execute()
        return self.render(record)

    def get(self, dataset_id: str, tenant: str | None = None) -> Dataset | None:
        record = self.record(dataset_id)
        if record is None or (tenant is not None and record.get("tenant") != tenant):
            return None
        return self.render(record)

    def request_cancel(self, dataset_id: str, tenant: str) -> Dataset:
        """Canceled at once; the driver then cancels the job's samples still queued or running."""
        record = self.record(dataset_id)
        if record is None or record.get("tenant") != tenant:
            raise DatasetNotFound(dataset_id)
        if not self.transition(dataset_id, (Q, P), C, completed_at=True):
            current = (self.record(dataset_id) or record)["status"]
            if current != C.value:
                raise DatasetConflict(f"dataset {dataset_id} is already {current}; only queued or processing "
                                      "datasets can be canceled")
        self.emit(dataset_id, "completed")
        return self.get(dataset_id)  # type: ignore[return-value]

    # ------------------------------------------------------------------ driver side
    def record(self, dataset_id: str) -> dict[str, str] | None:
        raw = self.redis.hgetall(dataset_key(dataset_id))
        return {k.decode(): v.decode() for k, v in raw.items()} if raw else None

    def request(self, record: dict[str, str]) -> DatasetRequest:
        data = json.loads(record["request"])
        data["triplets_key"] = data.get("triplets_key") or triplets_object(record["id"])
        return DatasetRequest.model_validate(data)

    def active(self) -> list[str]:
        return sorted(v.decode() for v in self.redis.smembers(ACTIVE_KEY))

    def retire(self, dataset_id: str, tenant: str | None) -> None:
        """A terminal (or vanished) job leaves the active sets; its keys expire with the edit records'
        retention (README "Retention") instead of living forever."""
        ttl = self.settings.retention.record_ttl_seconds or self.settings.s3.retention_days * 24 * 3600
        with self.redis.pipeline() as pipe:
            pipe.srem(ACTIVE_KEY, dataset_id)
            if tenant:
                pipe.srem(tenant_active_key(tenant), dataset_id)
            for key in (dataset_key(dataset_id), inflight_key(dataset_id), done_key(dataset_id),
                        kept_key(dataset_id)):
                pipe.expire(key, ttl)
            pipe.execute()

    def take_lease(self, dataset_id: str, owner: str) -> bool:
        ttl_ms = int(self.settings.datasets.lease_seconds * 1000)
        return bool(self._lease(keys=[lease_key(dataset_id)], args=[owner, ttl_ms]))

    def release_lease(self, dataset_id: str, owner: str) -> None:
        if self.redis.get(lease_key(dataset_id)) == owner.encode():
            self.redis.delete(lease_key(dataset_id))

    def transition(self, dataset_id: str, allowed: tuple[EditStatus, ...], to: EditStatus, *,
                   started_at: bool = False, completed_at: bool = False, fields: dict[str, str] | None = None) -> bool:
        values = dict(fields or {})
        if started_at:
            values["started_at"] = repr(time.time())
        if completed_at:
            values["completed_at"] = repr(time.time())
        return bool(self._transition(keys=[dataset_key(dataset_id)],
                                     args=[json.dumps([s.value for s in allowed]), to.value, json.dumps(values)]))

    def inflight(self, dataset_id: str) -> dict[int, list[str]]:
        raw = self.redis.hgetall(inflight_key(dataset_id))
        return {int(k): json.loads(v) for k, v in raw.items()}

    def plan(self, dataset_id: str, triplet: int, edit_ids: list[str]) -> bool:
        return bool(self._plan(keys=[dataset_key(dataset_id), inflight_key(dataset_id)],
                               args=[triplet, json.dumps(edit_ids)]))

    def collect(self, dataset_id: str, triplet: int, *, samples: int, kept: int, failed: int) -> bool:
        """Count one triplet exactly once (False: it was counted already, by this or another driver)."""
        keys = [dataset_key(dataset_id), inflight_key(dataset_id), done_key(dataset_id), kept_key(dataset_id)]
        return bool(self._collect(keys=keys, args=[triplet, samples, kept, failed]))

    def kept_triplets(self, dataset_id: str) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.redis.hgetall(kept_key(dataset_id)).items()}

    # ------------------------------------------------------------------ views and events
    def render(self, r: dict[str, str]) -> Dataset:
        status = EditStatus(r["status"])
        output = None
        if status is S and r.get("output"):
            keys = json.loads(r["output"])
            manifest_url, expires_at = self.storage.presign_get(keys["manifest"])
            metadata_url, _ = self.storage.presign_get(keys["metadata"])
            shard_urls = [self.storage.presign_get(k)[0] for k in keys["shards"]]
            output = DatasetOutput(prefix=prefix(r["id"]), manifest_url=manifest_url, metadata_url=metadata_url,
                                   shard_urls=shard_urls, expires_at=expires_at)
        request = json.loads(r["request"])
        catalog = self.settings.model_catalog()
        return Dataset(
            id=r["id"], status=status, model=r["model"], created_at=_ts(r["created_at"]),
            started_at=_ts(r.get("started_at")), completed_at=_ts(r.get("completed_at")),
            progress=DatasetProgress(done=int(r.get("done", 0)), total=int(r["total"])),
            counts=DatasetCounts(samples=int(r.get("c_samples", 0)), kept=int(r.get("c_kept", 0)),
                                 failed=int(r.get("c_failed", 0)), triplets_with_pairs=int(r.get("c_with_pairs", 0))),
            params=json.loads(r["params"]), output=output,
            error=ErrorInfo.model_validate_json(r["error"]) if r.get("error") else None,
            metadata=request.get("metadata") or {},
            random_weights=bool(catalog[r["model"]].random_weights) if r["model"] in catalog else False,
        )

    def emit(self, dataset_id: str, event: str, *, step: int | None = None) -> None:
        """Tell the listeners (the webhook emitter, wired by the gateway and the worker) of ``dataset.{event}``;
        a listener's failure never fails a dataset job."""
        if not self._listeners:
            return
        record = self.record(dataset_id)
        if record is None:
            return
        webhook = DatasetRequest.model_validate({**json.loads(record["request"]), "triplets_key": "x"}).webhook
        dataset = self.render(record)
        for listener in self._listeners:
            try:
                listener(self.redis, dataset, record["tenant"], webhook, event, step)
            except Exception:  # noqa: BLE001
                log.exception("dataset %s: listener failed on %s", dataset_id, event)


# ---------------------------------------------------------------------------------------------- the samples

def sample_payload(dataset_id: str, tenant: str, params: dict[str, Any], triplet_index: int,
                   triplet: CaptionTriplet, plan: SamplePlan, edit_id: str):
    """One sample as an ordinary P2P edit at low priority: source = input caption, target = edited caption,
    one shared initial latent, self-attention shared for the first ``p2p_fraction`` of the steps (the
    reference's data-generation variant: cross-attention is left alone), CLIP scores asked for."""
    from editserve.contract import BatchKey, JobPayload, P2PEditRequest

    request = P2PEditRequest(
        source_prompt=triplet.input, target_prompts=[triplet.output], edit="refine", cross_replace_steps=0.0,
        self_replace_steps=plan.p2p_fraction, self_replace_layers=params["self_replace_layers"],
        guidance_scale=plan.guidance, model=params["model"], steps=params["steps"], scheduler=params["scheduler"],
        height=params["height"], width=params["width"], seed=plan.seed, priority="low", metrics=True,
        metadata={"dataset": dataset_id, "triplet": str(triplet_index), "sample": str(plan.sample)})
    key = BatchKey(model=params["model"], kind="p2p", height=params["height"], width=params["width"],
                   steps=params["steps"], scheduler=params["scheduler"])
    return JobPayload(id=edit_id, tenant=tenant, request=request, batch_key=key, seeds=[plan.seed],
                      created_at=datetime.now(UTC))
