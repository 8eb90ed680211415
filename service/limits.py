"""Per-tenant limits and fair share: request rate, queued edits, edits released to the workers, global depth.

Why in Redis and in Lua: several gateway processes and every GPU worker change these counts at once. Each
decision (admit or refuse, release or hold) is one script, so no two writers ever see the same free slot,
and the bookkeeping of an edit's terminal transition and the release of the tenant's next edit are one
atomic step (``JobStore._transition`` runs ``LIMITS_LUA`` inside its transition script).

Fair share, so that one tenant's burst cannot starve the others: a tenant has at most
``tenant_max_concurrent`` edits *released* to the RQ queues (queued there, claimed or running). Its further
edits are *held* in a per-tenant, per-priority Redis list: still ``queued``, cancellable, with a queue
position. When one of its released edits reaches a terminal status, the same script pops the oldest held
edit (high → normal → low) and pushes it onto its RQ queue. The RQ job hash of every edit is written
before admission (status ``created``), so releasing is a pure Redis move that Lua can do; RQ queues stay
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

Crash points: admission writes the record, the counts and the release/hold in one script, after the RQ
job hash was saved with a short expiry that admission removes (a gateway dying in between leaves nothing
behind). A terminal transition and the release it causes are one script. Sets, not counters: adding or
removing an id twice is harmless. :func:`release_held` repairs what no script can see (edits transitioned
by an older code version, raised limits, an RQ job hash deleted by hand); the worker's reaper calls it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import redis
from pydantic import BaseModel, ConfigDict, Field
from rq import Queue
from rq.job import Job
from rq.utils import now as rq_now
from rq.utils import utcformat

from service.auth import tenant_key
from service.config import Settings
from service.queues import PRIORITIES

log = logging.getLogger(__name__)

KEY_PREFIX = "editserve:"
GLOBAL_QUEUED_KEY = f"{KEY_PREFIX}limits:queued"
TENANTS_KEY = f"{KEY_PREFIX}limits:tenants"
OVERRIDE_FIELDS = {"rps": "limit_rps", "burst": "limit_burst", "max_queued": "limit_max_queued",
                   "max_concurrent": "limit_max_concurrent"}
SWEEP_CHUNK = 500


def queued_key(tenant: str) -> str:
    return f"{KEY_PREFIX}tenant:{tenant}:queued"


def released_key(tenant: str) -> str:
    return f"{KEY_PREFIX}tenant:{tenant}:released"


def held_key(tenant: str, priority: str) -> str:
    return f"{KEY_PREFIX}tenant:{tenant}:held:{priority}"


def ratelimit_key(tenant: str) -> str:
    return f"{KEY_PREFIX}ratelimit:{tenant}"


# ------------------------------------------------------------------------------------------------ refusals

class LimitExceeded(Exception):
    """A request refused by a limit: 429 (this tenant's limit) or 503 (the service's global queue)."""

    def __init__(self, status: int, type: str, message: str, *, limit: str, retry_after: int):
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.limit = limit
        """The setting that refused it (tenant_rps, tenant_max_queued, max_queue_depth)."""
        self.retry_after = max(1, int(retry_after))


def queue_refusal(reason: str, tenant: str, count: int, limit: int, settings: Settings) -> LimitExceeded:
    retry = settings.limits.queue_full_retry_after_seconds
    if reason == "queue_full":
        return LimitExceeded(503, "queue_full", f"the service already holds {count} queued edits, its limit "
                             f"(max_queue_depth {limit}); retry later", limit="max_queue_depth", retry_after=retry)
    return LimitExceeded(429, "tenant_queue_full", f"tenant {tenant!r} already has {count} queued edits, its limit "
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

_RATE_LUA = """
local rate = tonumber(redis.call('HGET', KEYS[2], 'limit_rps') or ARGV[1])
local burst = tonumber(redis.call('HGET', KEYS[2], 'limit_burst') or ARGV[2])
if rate <= 0 then return {1, 0, '0', burst} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = 1000 / rate
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - now - interval * burst
if wait > 0 then return {0, math.ceil(wait), tostring(rate), burst} end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1)
return {1, 0, tostring(rate), burst}
"""


class RateLimiter:
    """GCRA per tenant (a token bucket without a refill loop): ``burst`` requests at once, then ``rps``.

    Redis's clock decides, so every gateway process shares one bucket per tenant.
    """

    def __init__(self, connection: redis.Redis, settings: Settings):
        self.settings = settings
        self._script = connection.register_script(_RATE_LUA)

    def check(self, tenant: str) -> None:
        """Count one request of ``tenant``; raise :class:`LimitExceeded` (429) when over its rate."""
        limits = self.settings.limits
        allowed, wait_ms, rate, burst = self._script(keys=[ratelimit_key(tenant), tenant_key(tenant)],
                                                     args=[repr(float(limits.tenant_rps)), limits.tenant_burst])
        if allowed:
            return
        rate_s = rate.decode() if isinstance(rate, bytes) else str(rate)
        retry = max(1, math.ceil(int(wait_ms) / 1000))
        raise LimitExceeded(429, "rate_limited", f"tenant {tenant!r} may make {float(rate_s):g} requests/s with "
                            f"bursts of {burst} (tenant_rps, tenant_burst); retry in {retry} s",
                            limit="tenant_rps", retry_after=retry)


# ------------------------------------------------------------------------------------------------ accounting

LIMITS_LUA = """
local function lim_base(cfg, t) return cfg.prefix .. 'tenant:' .. t end
local function lim_override(cfg, t, field, default)
  local v = redis.call('HGET', lim_base(cfg, t), field)
  if v then return tonumber(v) end
  return default
end
local function lim_held_key(cfg, t, priority) return lim_base(cfg, t) .. ':held:' .. priority end

-- Push a released edit onto its RQ queue: its job hash exists since submission (status 'created').
local function lim_push(cfg, id, queue)
  local qk = cfg.rq_queue .. queue
  redis.call('HSET', cfg.rq_job .. id, 'status', 'queued', 'enqueued_at', cfg.now_rq)
  redis.call('SADD', cfg.rq_queues, qk)
  redis.call('RPUSH', qk, id)
end

-- Release the tenant's oldest held edits (high before normal before low) while it has free slots.
local function lim_release(cfg, t)
  local released_set = lim_base(cfg, t) .. ':released'
  local limit = lim_override(cfg, t, 'limit_max_concurrent', cfg.max_concurrent)
  local count = 0
  for _, p in ipairs(cfg.priorities) do
    local hk = lim_held_key(cfg, t, p)
    while redis.call('SCARD', released_set) < limit do
      local id = redis.call('LPOP', hk)
      if not id then break end
      local ek = cfg.prefix .. 'edit:' .. id
      local f = redis.call('HMGET', ek, 'status', 'held', 'queue')
      if f[1] == 'queued' and f[2] == hk then
        redis.call('HDEL', ek, 'held')
        redis.call('SADD', released_set, id)
        lim_push(cfg, id, f[3])
        count = count + 1
      end
    end
  end
  return count
end

-- Keep the sets in step with a status change of edit hash `ek` (cur -> to); release on terminal.
local function lim_note_transition(cfg, ek, cur, to)
  if to == '' or to == cur then return end
  local f = redis.call('HMGET', ek, 'id', 'tenant', 'held')
  local id, t, held = f[1], f[2], f[3]
  if not id or not t then return end
  local base = lim_base(cfg, t)
  if cur == 'queued' then
    redis.call('SREM', base .. ':queued', id)
    redis.call('SREM', cfg.prefix .. 'limits:queued', id)
  end
  if to == 'queued' then
    redis.call('SADD', base .. ':queued', id)
    redis.call('SADD', cfg.prefix .. 'limits:queued', id)
  end
  if held then  -- leaves the queue while held: canceled or failed (or started by hand: count it as released)
    redis.call('LREM', held, 0, id)
    redis.call('HDEL', ek, 'held')
    if to == 'processing' then redis.call('SADD', base .. ':released', id) end
  end
  if to == 'succeeded' or to == 'failed' or to == 'canceled' then
    redis.call('SREM', base .. ':released', id)
    lim_release(cfg, t)
  end
end
"""

_ADMIT_LUA = LIMITS_LUA + """
-- ARGV: cfg JSON, record JSON (field -> string), index score (ms), priority
local cfg = cjson.decode(ARGV[1])
local rec = cjson.decode(ARGV[2])
local id, t = rec['id'], rec['tenant']
local ek = cfg.prefix .. 'edit:' .. id
local base = lim_base(cfg, t)
if redis.call('EXISTS', ek) == 1 then return {'exists', 0, 0} end
if redis.call('EXISTS', cfg.rq_job .. id) == 0 then return {'job_missing', 0, 0} end
local depth = redis.call('SCARD', cfg.prefix .. 'limits:queued')
if depth >= cfg.max_depth then return {'queue_full', depth, cfg.max_depth} end
local mine = redis.call('SCARD', base .. ':queued')
local max_queued = lim_override(cfg, t, 'limit_max_queued', cfg.max_queued)
if mine >= max_queued then return {'tenant_queue_full', mine, max_queued} end
for field, value in pairs(rec) do redis.call('HSET', ek, field, value) end
redis.call('ZADD', base .. ':edits', ARGV[3], id)
redis.call('SADD', base .. ':queued', id)
redis.call('SADD', cfg.prefix .. 'limits:queued', id)
redis.call('SADD', cfg.prefix .. 'limits:tenants', t)
redis.call('PERSIST', cfg.rq_job .. id)
lim_release(cfg, t)  -- older held edits first (a no-op unless limits were raised)
if redis.call('SCARD', base .. ':released') < lim_override(cfg, t, 'limit_max_concurrent', cfg.max_concurrent) then
  redis.call('SADD', base .. ':released', id)
  lim_push(cfg, id, rec['queue'])
  return {'released', 0, 0}
end
local hk = lim_held_key(cfg, t, ARGV[4])
redis.call('RPUSH', hk, id)
redis.call('HSET', ek, 'held', hk)
return {'held', 0, 0}
"""

_RELEASE_LUA = LIMITS_LUA + """
return lim_release(cjson.decode(ARGV[1]), ARGV[2])
"""

# Drop ids whose edit left the state a set stands for (written by code without this bookkeeping), report
# queued edits whose RQ job hash is gone (they could never run), then release what the limits allow.
_SWEEP_TENANT_LUA = LIMITS_LUA + """
local cfg = cjson.decode(ARGV[1])
local t = ARGV[2]
local base = lim_base(cfg, t)
local lost, seen = {}, {}
local function check_job(id)
  if not seen[id] and redis.call('EXISTS', cfg.rq_job .. id) == 0 then table.insert(lost, id) end
  seen[id] = true
end
for _, id in ipairs(redis.call('SMEMBERS', base .. ':released')) do
  local st = redis.call('HGET', cfg.prefix .. 'edit:' .. id, 'status')
  if st ~= 'queued' and st ~= 'processing' then redis.call('SREM', base .. ':released', id)
  elseif st == 'queued' then check_job(id) end
end
for _, id in ipairs(redis.call('SMEMBERS', base .. ':queued')) do
  if redis.call('HGET', cfg.prefix .. 'edit:' .. id, 'status') ~= 'queued' then
    redis.call('SREM', base .. ':queued', id)
    redis.call('SREM', cfg.prefix .. 'limits:queued', id)
  else
    check_job(id)
  end
end
local released = lim_release(cfg, t)
local idle = redis.call('SCARD', base .. ':queued') == 0 and redis.call('SCARD', base .. ':released') == 0
for _, p in ipairs(cfg.priorities) do
  if redis.call('LLEN', lim_held_key(cfg, t, p)) > 0 then idle = false end
end
if idle then redis.call('SREM', cfg.prefix .. 'limits:tenants', t) end
local out = {released}
for _, id in ipairs(lost) do table.insert(out, id) end
return out
"""

_PRUNE_GLOBAL_LUA = """
local n = 0
for _, id in ipairs(ARGV) do
  if redis.call('HGET', KEYS[1] .. id, 'status') ~= 'queued' then
    n = n + redis.call('SREM', KEYS[2], id)
  end
end
return n
"""


def lua_config(settings: Settings) -> str:
    """What every accounting script needs: key names (ours and RQ's), default limits and RQ's clock format."""
    limits = settings.limits
    return json.dumps({
        "prefix": KEY_PREFIX,
        "rq_job": Job.redis_job_namespace_prefix,
        "rq_queue": Queue.redis_queue_namespace_prefix,
        "rq_queues": Queue.redis_queues_keys,
        "priorities": list(PRIORITIES),
        "max_concurrent": limits.tenant_max_concurrent,
        "max_queued": limits.tenant_max_queued,
        "max_depth": limits.max_queue_depth,
        "now_rq": utcformat(rq_now()),
    })


@dataclass
class Admission:
    """Outcome of :meth:`Accounting.admit`: ``released`` to a worker queue or ``held`` for fair share."""

    state: str


class Accounting:
    """The scripts that admit, hold and release edits (JobStore embeds ``LIMITS_LUA`` in its transitions)."""

    def __init__(self, connection: redis.Redis, settings: Settings):
        self.redis = connection
        self.settings = settings
        self._admit = connection.register_script(_ADMIT_LUA)
        self._release = connection.register_script(_RELEASE_LUA)
        self._sweep_tenant = connection.register_script(_SWEEP_TENANT_LUA)
        self._prune_global = connection.register_script(_PRUNE_GLOBAL_LUA)

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

    def admit(self, record: dict[str, str], score_ms: int, priority: str) -> Admission:
        """Write the edit record and either release it to its RQ queue or hold it, atomically.

        The RQ job hash must already exist (JobStore saves it first). Raises :class:`LimitExceeded`.
        """
        state, count, limit = self._admit(args=[lua_config(self.settings), json.dumps(record), score_ms, priority])
        state = state.decode() if isinstance(state, bytes) else state
        if state in ("queue_full", "tenant_queue_full"):
            raise queue_refusal(state, record["tenant"], int(count), int(limit), self.settings)
        if state not in ("released", "held"):
            raise RuntimeError(f"edit {record['id']} not admitted: {state}")
        return Admission(state)

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
                self._prune_global(keys=[f"{KEY_PREFIX}edit:", GLOBAL_QUEUED_KEY], args=chunk)
                chunk = []
        if chunk:
            self._prune_global(keys=[f"{KEY_PREFIX}edit:", GLOBAL_QUEUED_KEY], args=chunk)
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


def release_held(connection: redis.Redis, settings: Settings) -> int:
    """The periodic repair pass; the GPU worker's reaper calls it every pass (it is idempotent and cheap).

    Normal operation never needs it: admission and terminal transitions release atomically. It catches
    what they cannot see — edits finished by code without this bookkeeping (a rolling upgrade), a raised
    per-tenant limit, set members whose edits are gone — and fails queued edits whose RQ job hash was
    deleted (``rq empty``), which would otherwise hold their tenant's slot forever. Returns how many held
    edits it released.
    """
    released, lost = Accounting(connection, settings).sweep()
    if lost:
        from editserve.contract import ErrorInfo
        from service.jobstore import JobStore

        store = JobStore(connection, settings)
        for edit_id in lost:
            log.warning("edit %s: its RQ job is gone; failing it so its tenant's slot frees", edit_id)
            store.mark_failed(edit_id, ErrorInfo(type="queue_entry_lost",
                                                 message="the edit's queue entry was deleted before it ran; "
                                                         "submit it again"))
    return released
