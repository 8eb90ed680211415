"""Per-tenant limits and fair share: request rate, queued edits, edits released to the workers, global depth.

Why in Redis and in Lua: several gateway processes and every GPU worker change these counts at once. Each
decision (admit or refuse, release or hold) is one script, so no two writers ever see the same free slot,
and the bookkeeping of an edit's terminal transition and the release of the tenant's next edit are one
atomic step (the transition script, ``service.scripts.TRANSITION``, runs ``LIMITS_FN`` inside it). The
scripts live in ``service.scripts``, the key names in ``service.keys``.

Fair share, so that one tenant's burst cannot starve the others: a tenant has at most
``tenant_max_concurrent`` edits *released* to the RQ queues (queued there, claimed or running). Its further
edits are *held* in a per-tenant, per-priority Redis list: still ``queued``, cancellable, with a queue
position. When one of its released edits reaches a terminal status, the same script pops the oldest held
edit (high → normal → low) and pushes it onto its RQ queue. The RQ job hash of every edit is written
at admission (status ``created`` while held), so releasing is a pure Redis move that Lua can do; RQ queues stay
one per batch key and the worker needs no change.

Redis layout (prefix ``editserve:``)::

    tenant:{t}                  hash (service.auth): limit_rps, limit_burst, limit_max_queued,
                                limit_max_concurrent override the settings' defaults
    tenant:{t}:queued           set of the tenant's edits in status queued (held or released)
    tenant:{t}:released         set of its edits released to the worker queues and not yet terminal
    tenant:{t}:held:{priority}  list of held edit ids, oldest first; the edit hash's ``held`` field names it
    limits:queued               set of every queued edit (the global depth limit counts it)
    limits:tenants              set of tenants that may have work in the sets above (the sweep's list)
    ratelimit:{t}               GCRA theoretical arrival time in ms (expires when idle)

Crash points: admission is one script that writes the RQ job hash, the record, the counts and the
release/hold (and, on the JSON submit path, counts the request's rate and claims its Idempotency-Key), so a
gateway dying mid-request leaves nothing half-written. A terminal transition and the release it causes are
one script. Sets, not counters: adding or removing an id twice is harmless. :func:`release_held` repairs
what no script can see (edits transitioned by an older code version, raised limits, an RQ job hash deleted
by hand); the worker's reaper calls it (``JobStore.release_held``, which fails edits that lost their RQ job).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from pydantic import BaseModel, ConfigDict, Field

from editserve.contract import ErrorType
from service import scripts
from service.config import Settings
from service.keys import (
    EDIT_PREFIX,
    GLOBAL_QUEUED_KEY,
    TENANTS_KEY,
    held_key,
    queued_key,
    ratelimit_key,
    released_key,
    tenant_key,
)
from service.queues import PRIORITIES
from service.scripts import lua_config

log = logging.getLogger(__name__)

OVERRIDE_FIELDS = {"rps": "limit_rps", "burst": "limit_burst", "max_queued": "limit_max_queued",
                   "max_concurrent": "limit_max_concurrent"}
SWEEP_CHUNK = 500


# ------------------------------------------------------------------------------------------------ refusals

class LimitExceeded(Exception):
    """A request refused by a limit: 429 (this tenant's limit) or 503 (the service's global queue)."""

    def __init__(self, status: int, type: ErrorType, message: str, *, limit: str, retry_after: int):
        super().__init__(message)
        self.status = status
        self.type = ErrorType(type).value
        self.message = message
        self.limit = limit
        """The setting that refused it (tenant_rps, tenant_max_queued, max_queue_depth)."""
        self.retry_after = max(1, int(retry_after))


def queue_refusal(reason: str, tenant: str, count: int, limit: int, settings: Settings) -> LimitExceeded:
    retry = settings.limits.queue_full_retry_after_seconds
    if reason == "queue_full":
        return LimitExceeded(503, ErrorType.queue_full, f"the service already holds {count} queued edits, its limit "
                             f"(max_queue_depth {limit}); retry later", limit="max_queue_depth", retry_after=retry)
    return LimitExceeded(429, ErrorType.tenant_queue_full, f"tenant {tenant!r} already has {count} queued edits, its limit "
                         f"(tenant_max_queued {limit}); retry when some have started", limit="tenant_max_queued",
                         retry_after=retry)


# ------------------------------------------------------------------------------------------------ overrides

class TenantLimitOverrides(BaseModel):
    """Per-tenant values replacing the defaults in ``settings.limits``; null means "use the default"."""

    model_config = ConfigDict(extra="forbid")
    rps: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False, description="requests/s; 0: unlimited")
    burst: int | None = Field(None, ge=1, le=1_000_000)
    max_queued: int | None = Field(None, ge=0, le=10_000_000)
    max_concurrent: int | None = Field(None, ge=1, le=100_000)


class TenantLimits(BaseModel):
    """A tenant's effective limits, its overrides and what it uses right now."""

    tenant: str
    rps: float
    burst: int
    max_queued: int
    max_concurrent: int
    overrides: TenantLimitOverrides
    queued: int = Field(description="edits waiting to start (held or in a worker queue)")
    released: int = Field(description="edits in a worker queue or running")
    held: int = Field(description="edits waiting for one of the tenant's released edits to finish")


def read_overrides(connection: redis.Redis, tenant: str) -> TenantLimitOverrides:
    raw = connection.hmget(tenant_key(tenant), list(OVERRIDE_FIELDS.values()))
    values = {name: (v.decode() if isinstance(v, bytes) else v) for name, v in zip(OVERRIDE_FIELDS, raw)}
    return TenantLimitOverrides.model_validate({k: v for k, v in values.items() if v is not None})


def write_overrides(connection: redis.Redis, tenant: str, overrides: TenantLimitOverrides,
                    settings: Settings) -> TenantLimits:
    """Replace the tenant's overrides (absent/null fields go back to the defaults), then release held edits a
    raised ``max_concurrent`` now allows."""
    pipe = connection.pipeline(transaction=True)
    for name, field in OVERRIDE_FIELDS.items():
        value = getattr(overrides, name)
        if value is None:
            pipe.hdel(tenant_key(tenant), field)
        else:
            pipe.hset(tenant_key(tenant), field, repr(value))
    pipe.sadd(TENANTS_KEY, tenant)
    pipe.execute()
    Accounting(connection, settings).release(tenant)
    return tenant_limits(connection, tenant, settings)


def tenant_limits(connection: redis.Redis, tenant: str, settings: Settings) -> TenantLimits:
    overrides = read_overrides(connection, tenant)
    defaults = settings.limits
    pipe = connection.pipeline(transaction=False)
    pipe.scard(queued_key(tenant))
    pipe.scard(released_key(tenant))
    for priority in PRIORITIES:
        pipe.llen(held_key(tenant, priority))
    queued, released, *held = pipe.execute()
    return TenantLimits(
        tenant=tenant,
        rps=overrides.rps if overrides.rps is not None else defaults.tenant_rps,
        burst=overrides.burst if overrides.burst is not None else defaults.tenant_burst,
        max_queued=overrides.max_queued if overrides.max_queued is not None else defaults.tenant_max_queued,
        max_concurrent=(overrides.max_concurrent if overrides.max_concurrent is not None
                        else defaults.tenant_max_concurrent),
        overrides=overrides, queued=queued, released=released, held=sum(held))


# ------------------------------------------------------------------------------------------------ rate limit



async def eval_script_async(connection, script: Script, keys: list, args: list):
    """Run a script registered on a sync client through an asyncio client (EVALSHA, loading it on a miss):
    the gateway's submit path makes its one round trip without a thread-pool hop."""
    try:
        return await connection.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        await connection.script_load(script.script)
        return await connection.evalsha(script.sha, len(keys), *keys, *args)


class RateLimiter:
    """GCRA per tenant (a token bucket without a refill loop): ``burst`` requests at once, then ``rps``.

    Redis's clock decides, so every gateway process shares one bucket per tenant.
    """

    def __init__(self, connection: redis.Redis, settings: Settings):
        self.settings = settings
        self._script: Script = connection.register_script(scripts.RATE)

    def check(self, tenant: str, now: float | None = None) -> None:
        """Count one request of ``tenant``; raise :class:`LimitExceeded` (429) when over its rate.

        ``now`` (epoch seconds) replaces Redis's clock, for tests that step time instead of sleeping.
        """
        args = self.args() if now is None else [*self.args(), repr(now * 1000.0)]
        self.judge(tenant, *self._script(keys=self.keys(tenant), args=args))

    async def check_async(self, connection, tenant: str) -> None:
        self.judge(tenant, *await eval_script_async(connection, self._script, self.keys(tenant), self.args()))

    @staticmethod
    def keys(tenant: str) -> list[str]:
        return [ratelimit_key(tenant), tenant_key(tenant)]

    def args(self) -> list:
        limits = self.settings.limits
        return [repr(float(limits.tenant_rps)), limits.tenant_burst]

    @staticmethod
    def judge(tenant: str, allowed, wait_ms, rate, burst) -> None:
        """Raise the 429 for a refused ``rate_take`` outcome."""
        if int(allowed):
            return
        rate_s = rate.decode() if isinstance(rate, bytes) else str(rate)
        retry = max(1, math.ceil(int(wait_ms) / 1000))
        raise LimitExceeded(429, ErrorType.rate_limited, f"tenant {tenant!r} may make {float(rate_s):g} requests/s with "
                            f"bursts of {int(burst)} (tenant_rps, tenant_burst); retry in {retry} s",
                            limit="tenant_rps", retry_after=retry)


# ------------------------------------------------------------------------------------------------ accounting

@dataclass
class Admission:
    """Outcome of :meth:`Accounting.admit`: ``released`` to a worker queue or ``held`` for fair share, with
    the edit's place in line and its batch key's ETA statistics; or ``duplicate`` with the earlier claim."""

    state: str
    ahead: int | None = None
    stats: dict[str, float] = field(default_factory=dict)
    prior_claim: bytes | None = None


@dataclass
class AdmissionRequest:
    """Everything :meth:`Accounting.admit` writes, prepared without Redis (so the sync and asyncio paths share
    it). ``rate_tenant`` counts the request against that tenant's rate; ``claim`` is an Idempotency-Key's
    ``(key, value, ttl)``."""

    record: dict[str, str]
    score_ms: int
    priority: str
    job_key: str
    job_fields: dict[str, Any]
    queues_ahead: list[str]
    stats_keys: list[str]
    rate: tuple[str, float, int] | None = None
    claim: tuple[str, str, int] | None = None


class Accounting:
    """The scripts that admit, hold and release edits (the transition script embeds the same ``LIMITS_FN``)."""

    def __init__(self, connection: redis.Redis, settings: Settings):
        self.redis = connection
        self.settings = settings
        self._admit: Script = connection.register_script(scripts.ADMIT)
        self._release = connection.register_script(scripts.RELEASE)
        self._sweep_tenant = connection.register_script(scripts.SWEEP_TENANT)
        self._prune_global = connection.register_script(scripts.PRUNE_GLOBAL)

    def precheck(self, tenant: str) -> None:
        """Refuse early (before an image is stored) when a queue limit is already reached; not atomic —
        :meth:`admit` decides."""
        limits = self.settings.limits
        pipe = self.redis.pipeline(transaction=False)
        pipe.scard(GLOBAL_QUEUED_KEY)
        pipe.scard(queued_key(tenant))
        pipe.hget(tenant_key(tenant), OVERRIDE_FIELDS["max_queued"])
        depth, mine, override = pipe.execute()
        if depth >= limits.max_queue_depth:
            raise queue_refusal("queue_full", tenant, depth, limits.max_queue_depth, self.settings)
        max_queued = int(float(override)) if override is not None else limits.tenant_max_queued
        if mine >= max_queued:
            raise queue_refusal("tenant_queue_full", tenant, mine, max_queued, self.settings)

    def admit(self, request: AdmissionRequest) -> Admission:
        """Write the edit's RQ job hash and record and either release it to its RQ queue or hold it, atomically.

        Raises :class:`LimitExceeded` (429 rate or tenant queue, 503 global queue) and changes nothing then.
        """
        return self._outcome(request, self._admit(args=self._admit_args(request)))

    async def admit_async(self, connection, request: AdmissionRequest) -> Admission:
        """:meth:`admit` through an asyncio client: the gateway's JSON submit path, one round trip."""
        return self._outcome(request, await eval_script_async(connection, self._admit, [], self._admit_args(request)))

    def _admit_args(self, r: AdmissionRequest) -> list:
        spec: dict[str, Any] = {"record": r.record, "score": r.score_ms, "priority": r.priority, "job_key": r.job_key,
                                "queues_ahead": r.queues_ahead, "stats_keys": r.stats_keys}
        if r.rate is not None:
            spec["rate"] = {"key": ratelimit_key(r.rate[0]), "rps": repr(float(r.rate[1])), "burst": r.rate[2]}
        if r.claim is not None:
            spec["claim"] = {"key": r.claim[0], "value": r.claim[1], "ttl": r.claim[2]}
        args: list = [lua_config(self.settings), json.dumps(spec)]
        for name, value in r.job_fields.items():
            args += [name, value]
        return args

    def _outcome(self, r: AdmissionRequest, out: list) -> Admission:
        state = out[0].decode() if isinstance(out[0], bytes) else out[0]
        tenant = r.record["tenant"]
        if state == "rate_limited":
            RateLimiter.judge(tenant, 0, *out[1:4])
        if state in ("queue_full", "tenant_queue_full"):
            raise queue_refusal(state, tenant, int(out[1]), int(out[2]), self.settings)
        if state == "duplicate":
            return Admission(state, prior_claim=out[1])
        if state not in ("released", "held"):
            raise RuntimeError(f"edit {r.record['id']} not admitted: {state}")
        flat = [v.decode() if isinstance(v, bytes) else v for v in out[2]]
        return Admission(state, ahead=int(out[1]), stats={k: float(v) for k, v in zip(flat[::2], flat[1::2])})

    def release(self, tenant: str) -> int:
        return int(self._release(args=[lua_config(self.settings), tenant]))

    def sweep(self) -> tuple[int, list[str]]:
        """Repair every tenant's sets, release what the limits allow; (released, ids of edits that lost their
        RQ job and can never run)."""
        released, lost = 0, []
        for raw in self.redis.sscan_iter(TENANTS_KEY):
            tenant = raw.decode() if isinstance(raw, bytes) else raw
            out = self._sweep_tenant(args=[lua_config(self.settings), tenant])
            released += int(out[0])
            lost += [i.decode() if isinstance(i, bytes) else i for i in out[1:]]
        chunk: list[bytes] = []
        for member in self.redis.sscan_iter(GLOBAL_QUEUED_KEY, count=SWEEP_CHUNK):
            chunk.append(member)
            if len(chunk) >= SWEEP_CHUNK:
                self._prune_global(keys=[EDIT_PREFIX, GLOBAL_QUEUED_KEY], args=chunk)
                chunk = []
        if chunk:
            self._prune_global(keys=[EDIT_PREFIX, GLOBAL_QUEUED_KEY], args=chunk)
        return released, lost


def held_ahead(connection: redis.Redis, tenant: str, held_list: str, edit_id: str) -> int | None:
    """How many of the tenant's held edits will be released before this one (None: no longer held)."""
    index = connection.lpos(held_list, edit_id)
    if index is None:
        return None
    ahead = int(index)
    for priority in PRIORITIES:
        key = held_key(tenant, priority)
        if key == held_list:
            break
        ahead += connection.llen(key)
    return ahead
