"""Every Lua script editserve runs in Redis, in one place; each says what KEYS and ARGV it takes.

Why one module: a script is the unit of atomicity (an admission, a transition and the fair-share release it
causes, a claim), and the scripts share helpers (``LIMITS_FN``, ``RATE_FN``) that are concatenated in
front of a script's body. Constants are not retyped in Lua: the transition table and the terminal statuses
are Python (``editserve.contract``), handed in through ARGV (a transition's ``from`` list, and
``lua_config``'s ``terminal`` list), as are the key prefix and RQ's key names.

Callers register a script on their connection (``connection.register_script(scripts.ADMIT)``); the
gateway's asyncio path runs the same registered script through :func:`service.limits.eval_script_async`.
"""

from __future__ import annotations

import json

from rq.job import Job
from rq.queue import Queue
from rq.utils import now as rq_now
from rq.utils import utcformat

from editserve.contract import TERMINAL_STATUSES
from service.config import Settings
from service.keys import KEY_PREFIX
from service.queues import PRIORITIES


def lua_config(settings: Settings) -> str:
    """ARGV ``cfg`` of the accounting scripts: key names (ours and RQ's), terminal statuses, default limits
    and RQ's clock format."""
    limits = settings.limits
    return json.dumps({
        "prefix": KEY_PREFIX,
        "rq_job": Job.redis_job_namespace_prefix,
        "rq_queue": Queue.redis_queue_namespace_prefix,
        "rq_queues": Queue.redis_queues_keys,
        "priorities": list(PRIORITIES),
        "terminal": sorted(s.value for s in TERMINAL_STATUSES),
        "max_concurrent": limits.tenant_max_concurrent,
        "max_queued": limits.tenant_max_queued,
        "max_depth": limits.max_queue_depth,
        "now_rq": utcformat(rq_now()),
    })


# ------------------------------------------------------------------------------------------------ helpers
# Function libraries, not scripts: prepended to the scripts that call them.

RATE_FN = """
-- GCRA: true when the request may pass, else the ms to wait; the tenant hash may override rate and burst.
-- now_ms (optional) replaces Redis's clock: tests drive time through whole intervals without sleeping.
local function rate_take(key, tkey, default_rate, default_burst, now_ms)
  local rate = tonumber(redis.call('HGET', tkey, 'limit_rps') or default_rate)
  local burst = tonumber(redis.call('HGET', tkey, 'limit_burst') or default_burst)
  if rate <= 0 then return {1, 0, '0', burst} end
  local now = tonumber(now_ms)
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  end
  local interval = 1000 / rate
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  local wait = new_tat - now - interval * burst
  if wait > 0 then return {0, math.ceil(wait), tostring(rate), burst} end
  redis.call('SET', key, tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1)
  return {1, 0, tostring(rate), burst}
end
"""

# Fair-share bookkeeping (see service.limits): every function takes ``cfg``, the decoded ``lua_config``.
LIMITS_FN = """
local function lim_base(cfg, t) return cfg.prefix .. 'tenant:' .. t end
local function lim_override(cfg, t, field, default)
  local v = redis.call('HGET', lim_base(cfg, t), field)
  if v then return tonumber(v) end
  return default
end
local function lim_held_key(cfg, t, priority) return lim_base(cfg, t) .. ':held:' .. priority end
local function lim_terminal(cfg, status)  -- cfg.terminal: editserve.contract.TERMINAL_STATUSES
  for _, s in ipairs(cfg.terminal) do if s == status then return true end end
  return false
end

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
  if lim_terminal(cfg, to) then
    redis.call('SREM', base .. ':released', id)
    lim_release(cfg, t)
  end
end
"""

# ------------------------------------------------------------------------------------------------ admission

RATE = RATE_FN + """
-- KEYS: ratelimit:{t}, tenant:{t}.  ARGV: default rps, default burst, [now ms: tests only].
-- Returns {allowed 0|1, wait ms, rate, burst}.
return rate_take(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
"""

ADMIT = LIMITS_FN + RATE_FN + """
-- KEYS: none (the names come with the spec; a cluster would need them declared).
-- ARGV: [1] cfg JSON (lua_config), [2] spec JSON {record, score, priority, job_key, queues_ahead, stats_keys,
--       rate?, claim?}, [3..] the RQ job hash as field, value, ... (binary-safe: RQ pickles its data).
-- Returns {'released'|'held', ahead, stats} | {'duplicate', prior claim} | {'rate_limited', wait, rate, burst}
--       | {'queue_full'|'tenant_queue_full', count, limit} | {'exists', 0, 0}.
-- The whole of creating an edit, one round trip: count the request against the tenant's rate (optional),
-- find an Idempotency-Key's earlier edit (optional), check the queue limits, write the RQ job hash and the
-- edit record, release or hold it, and report its place in line and the ETA statistics.
local cfg = cjson.decode(ARGV[1])
local spec = cjson.decode(ARGV[2])
local rec = spec.record
local id, t = rec['id'], rec['tenant']
local ek = cfg.prefix .. 'edit:' .. id
local base = lim_base(cfg, t)
if spec.rate then
  local r = rate_take(spec.rate.key, base, spec.rate.rps, spec.rate.burst)
  if r[1] == 0 then return {'rate_limited', r[2], r[3], r[4]} end
end
if spec.claim then
  local prior = redis.call('GET', spec.claim.key)
  if prior then return {'duplicate', prior} end
end
if redis.call('EXISTS', ek) == 1 or redis.call('EXISTS', spec.job_key) == 1 then return {'exists', 0, 0} end
local depth = redis.call('SCARD', cfg.prefix .. 'limits:queued')
if depth >= cfg.max_depth then return {'queue_full', depth, cfg.max_depth} end
local mine = redis.call('SCARD', base .. ':queued')
local max_queued = lim_override(cfg, t, 'limit_max_queued', cfg.max_queued)
if mine >= max_queued then return {'tenant_queue_full', mine, max_queued} end
if spec.claim then redis.call('SET', spec.claim.key, spec.claim.value, 'EX', spec.claim.ttl) end
redis.call('HSET', spec.job_key, unpack(ARGV, 3))
for field, value in pairs(rec) do redis.call('HSET', ek, field, value) end
redis.call('ZADD', base .. ':edits', spec.score, id)
redis.call('SADD', base .. ':queued', id)
redis.call('SADD', cfg.prefix .. 'limits:queued', id)
redis.call('SADD', cfg.prefix .. 'limits:tenants', t)
lim_release(cfg, t)  -- older held edits first (a no-op unless limits were raised)
local qk = cfg.rq_queue .. rec['queue']
local ahead = 0
for _, k in ipairs(spec.queues_ahead) do ahead = ahead + redis.call('LLEN', k) end
local state
if redis.call('SCARD', base .. ':released') < lim_override(cfg, t, 'limit_max_concurrent', cfg.max_concurrent) then
  redis.call('SADD', base .. ':released', id)
  lim_push(cfg, id, rec['queue'])
  state = 'released'
  ahead = ahead + redis.call('LLEN', qk) - 1
else
  local hk = lim_held_key(cfg, t, spec.priority)
  redis.call('RPUSH', hk, id)
  redis.call('HSET', ek, 'held', hk)
  state = 'held'  -- its tenant's held edits ahead, then one of its running edits, then the RQ queue now
  local held = redis.call('LLEN', hk) - 1
  for _, p in ipairs(cfg.priorities) do
    if p == spec.priority then break end
    held = held + redis.call('LLEN', lim_held_key(cfg, t, p))
  end
  ahead = ahead + held + 1 + redis.call('LLEN', qk)
end
local stats = {}
for _, k in ipairs(spec.stats_keys) do
  stats = redis.call('HGETALL', k)
  if #stats > 0 then break end
end
return {state, ahead, stats}
"""

RELEASE = LIMITS_FN + """
-- KEYS: none.  ARGV: [1] cfg JSON, [2] tenant.  Returns how many held edits it released.
return lim_release(cjson.decode(ARGV[1]), ARGV[2])
"""

SWEEP_TENANT = LIMITS_FN + """
-- Drop ids whose edit left the state a set stands for (written by code without this bookkeeping), report
-- queued edits whose RQ job hash is gone (they could never run), then release what the limits allow.
-- KEYS: none.  ARGV: [1] cfg JSON, [2] tenant.  Returns {released, lost id, ...}.
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
  if not st or lim_terminal(cfg, st) then redis.call('SREM', base .. ':released', id)
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

PRUNE_GLOBAL = """
-- Drop edits no longer queued from the global queued set.
-- KEYS: [1] the edit key prefix (editserve:edit:), [2] limits:queued.  ARGV: edit ids.  Returns how many.
local n = 0
for _, id in ipairs(ARGV) do
  if redis.call('HGET', KEYS[1] .. id, 'status') ~= 'queued' then
    n = n + redis.call('SREM', KEYS[2], id)
  end
end
return n
"""

# ------------------------------------------------------------------------------------------------ edit records

TRANSITION = LIMITS_FN + """
-- One guarded status change (compare-and-set against the allowed previous statuses) plus its field writes,
-- fair-share bookkeeping and release.
-- KEYS: [1] edit:{id}.
-- ARGV: [1] spec JSON {from: [allowed statuses], to: status|'' (fields only), set, set_nx, incr, del,
--       queue_wait, now, ttl}, [2] cfg JSON (lua_config).
-- Returns {revision (0: not applied), previous status ('' : no record)}.
local key = KEYS[1]
local spec = cjson.decode(ARGV[1])
local cur = redis.call('HGET', key, 'status')
if not cur then return {0, ''} end
local allowed = false
for _, s in ipairs(spec['from']) do if s == cur then allowed = true end end
if not allowed then return {0, cur} end
if spec['to'] ~= '' then redis.call('HSET', key, 'status', spec['to']) end
for f, v in pairs(spec['set']) do redis.call('HSET', key, f, v) end
for f, v in pairs(spec['set_nx']) do redis.call('HSETNX', key, f, v) end
for _, f in ipairs(spec['incr']) do redis.call('HINCRBY', key, f, 1) end
for _, f in ipairs(spec['del']) do redis.call('HDEL', key, f) end
if spec['queue_wait'] then
  local enq = redis.call('HGET', key, 'enqueued_at')
  if enq then
    redis.call('HSET', key, 'queue_wait_seconds', tostring(math.max(0, tonumber(spec['now']) - tonumber(enq))))
  end
end
if spec['to'] ~= '' then lim_note_transition(cjson.decode(ARGV[2]), key, cur, spec['to']) end
local rev = redis.call('HINCRBY', key, 'revision', 1)
if spec['ttl'] > 0 then redis.call('EXPIRE', key, spec['ttl']) end
return {rev, cur}
"""

PROGRESS = """
-- KEYS: [1] edit:{id}.  ARGV: [1] step, [2] total.  Returns the new revision, 0 when not processing.
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
redis.call('HSET', KEYS[1], 'progress_step', ARGV[1], 'progress_total', ARGV[2])
return redis.call('HINCRBY', KEYS[1], 'revision', 1)
"""

PREVIEW = """
-- KEYS: [1] edit:{id}.  ARGV: [1] preview JSON {step, total, key}.  Returns the new revision, 0 when not
-- processing (a late preview never lands on a finished edit).
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
redis.call('HSET', KEYS[1], 'preview', ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'revision', 1)
"""

PROGRESS_DETAIL = """
-- KEYS: [1] edit:{id}.  ARGV: [1] the kind's progress detail (JSON).  Returns 1, 0 when not processing.
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
redis.call('HSET', KEYS[1], 'progress_detail', ARGV[1])
return 1
"""

EWMA = """
-- KEYS: stats hashes to update (service.keys.eta_stats_keys: the batch shape first).
-- ARGV: [1] seconds per step (the batch), [2] seconds per job, [3] alpha, [4] TTL (s), [5] seconds per step of
-- one job. job_seconds only means something at one step count, so only KEYS[1] (the exact shape) keeps it;
-- statistics of a batch shape nobody runs any more expire.
local alpha = tonumber(ARGV[3])
for i, k in ipairs(KEYS) do
  for j, f in ipairs({'step_seconds', 'job_seconds', '', '', 'job_step_seconds'}) do
    local v = tonumber(ARGV[j])
    if f ~= '' and v and (i == 1 or f ~= 'job_seconds') then
      local old = redis.call('HGET', k, f)
      if old then v = alpha * v + (1 - alpha) * tonumber(old) end
      redis.call('HSET', k, f, tostring(v))
    end
  end
  if ARGV[4] then redis.call('EXPIRE', k, ARGV[4]) end
end
return 1
"""

COMPARE_AND_DELETE = """
-- Delete a key only while it still holds our value (an Idempotency-Key claim, the reaper's lock).
-- KEYS: [1] the key.  ARGV: [1] the value.  Returns 1 if deleted.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# ------------------------------------------------------------------------------------------------ queues

CLAIM = """
-- A worker's atomic, priority-ordered claim: move up to ARGV[1] job ids into their queues' intermediate lists.
-- With a batch tag, only jobs of that tag (compatible with the batch being gathered) are taken, from anywhere in
-- the first ARGV[3] ids of each queue (bounded cost); with '' the heads are taken. A tag ending in '*' matches
-- every tag that starts with the rest (step-level batching: same model, kind and size, any steps/scheduler).
-- KEYS: [queue_1, intermediate_1, queue_2, intermediate_2, ...] in priority order.
-- ARGV: [1] how many, [2] batch tag ('' = any), [3] scan window, [4] job hash prefix, [5] tag field.
-- Returns {queue key, job id, ...}.
local wanted, tag, window = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local claimed = {}
local stem = string.sub(tag, -1) == '*' and string.sub(tag, 1, -2) or nil
for i = 1, #KEYS, 2 do
  if tag == '' then
    while #claimed < wanted * 2 do
      local id = redis.call('LMOVE', KEYS[i], KEYS[i + 1], 'LEFT', 'RIGHT')
      if not id then break end
      table.insert(claimed, KEYS[i])
      table.insert(claimed, id)
    end
  else
    for _, id in ipairs(redis.call('LRANGE', KEYS[i], 0, window - 1)) do
      if #claimed >= wanted * 2 then break end
      local t = redis.call('HGET', ARGV[4] .. id, ARGV[5])
      if t and (t == tag or (stem and string.sub(t, 1, #stem) == stem))
          and redis.call('LREM', KEYS[i], 1, id) == 1 then
        redis.call('RPUSH', KEYS[i + 1], id)
        table.insert(claimed, KEYS[i])
        table.insert(claimed, id)
      end
    end
  end
  if #claimed >= wanted * 2 then break end
end
return claimed
"""

REAPER_LEASE = """
-- Take an expired StartedJobRegistry entry for recovery (push its score past now + lease).
-- KEYS: [1] the registry.  ARGV: [1] entry, [2] now, [3] lease deadline.  Returns 1 if taken.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""

RETURN_STRANDED = """
-- Move a claimed, never-started job id from a queue's intermediate list back to the front of its queue.
-- KEYS: [1] intermediate list, [2] queue.  ARGV: [1] job id.  Returns 1 if moved.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

WEBHOOK_REQUEUE = """
-- Put a delivery job that was taken but never acknowledged back at the front of the webhooks queue, only for
-- whoever claims it (removes it from the intermediate list or one of its StartedJobRegistry entries).
-- KEYS: [1] queue, [2] its intermediate list, [3] its StartedJobRegistry.  ARGV: [1] job id, [2..] entries.
-- Returns 1 if pushed.
local claimed = redis.call('LREM', KEYS[2], 0, ARGV[1])
for i = 2, #ARGV do claimed = claimed + redis.call('ZREM', KEYS[3], ARGV[i]) end
if claimed == 0 or redis.call('LPOS', KEYS[1], ARGV[1]) then return 0 end
redis.call('LPUSH', KEYS[1], ARGV[1])
return 1
"""


# ------------------------------------------------------------------------------------------------ datasets

DATASET_TRANSITION = """
-- A dataset job's guarded status change. KEYS: [1] record. ARGV: [1] JSON allowed from-statuses, [2] new status,
-- [3] JSON fields to set. Returns the new revision, or 0.
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
local allowed = cjson.decode(ARGV[1])
local ok = false
for _, s in ipairs(allowed) do if s == cur then ok = true end end
if not ok then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
local fields = cjson.decode(ARGV[3])
for f, v in pairs(fields) do redis.call('HSET', KEYS[1], f, v) end
return redis.call('HINCRBY', KEYS[1], 'revision', 1)
"""

DATASET_COLLECT = """
-- Count one finished triplet once. KEYS: [1] record, [2] inflight, [3] done set, [4] kept hash.
-- ARGV: [1] triplet, [2] samples, [3] kept, [4] failed. Returns 1, or 0 when it was already counted.
if redis.call('SADD', KEYS[3], ARGV[1]) == 0 then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'done', 1)
redis.call('HINCRBY', KEYS[1], 'c_samples', tonumber(ARGV[2]))
redis.call('HINCRBY', KEYS[1], 'c_kept', tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[1], 'c_failed', tonumber(ARGV[4]))
if tonumber(ARGV[3]) > 0 then
  redis.call('HINCRBY', KEYS[1], 'c_with_pairs', 1)
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
end
redis.call('HINCRBY', KEYS[1], 'revision', 1)
return 1
"""

DATASET_PLAN = """
-- Fan triplet ARGV[1] out only if it is still `next`. KEYS: [1] record, [2] inflight. ARGV: [1] triplet, [2] JSON ids.
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'next')) ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], 'next', tonumber(ARGV[1]) + 1)
return 1
"""

DATASET_LEASE = """
-- Take a free lease or renew our own. KEYS: [1] lease. ARGV: [1] owner, [2] ttl ms. Returns 1 if held.
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
"""
