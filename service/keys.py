"""Every Redis key editserve writes, in one place (RQ's own keys stay RQ's: see ``service.queues``).

Why one module: the gateway, the GPU workers, the webhook sender and the Lua scripts (which receive
``KEY_PREFIX`` and build the same names) must agree on every name; a key spelled twice drifts. Imports
nothing of editserve, so any layer may use it.

Layout (all prefixed ``editserve:``)::

    edit:{id}                     hash: the edit record (status, tenant, kind, payload, params, results, ...)
    tenant:{t}:edits              sorted set of the tenant's edit ids by creation time (ms): listing
    idem:{t}:{key}                JSON {edit_id, fingerprint}: an Idempotency-Key's claim (retention.idempotency_ttl_seconds)
    stats:{batch key}             hash: EWMA seconds per step and per job of one batch shape (ETA; expires unused)
    stats:{m}:{kind}:{HxW}:{sched} hash: EWMA seconds per step (batch, one job) of that work at any step count
    throughput:{model}:{minute}   hash: edits, images, steps finished in that minute (expires after the window)
    events:{id}                   pub/sub channel: the Edit JSON after every change
    tenant:{t}                    hash: webhook secret, created_at, limit overrides
    tenant:{t}:queued             set: the tenant's queued edits (held or released)
    tenant:{t}:released           set: its edits in a worker queue or running
    tenant:{t}:held:{priority}    list: held edit ids, oldest first
    limits:queued                 set: every queued edit (global depth)
    limits:tenants                set: tenants that may have work in the sets above
    ratelimit:{t}                 GCRA theoretical arrival time (ms)
    apikey:{sha256}               hash: key_id, tenant, label, created_at
    apikeys                       hash: key_id -> sha256
    webhook:{id}                  hash: the edit's webhook delivery state
    webhook:{id}:throttle         string with PX expiry: a progress event went out recently
    webhook:{id}:emitted          set: webhook-ids already enqueued (at-most-once emission)
    webhook:{id}:done             hash: delivery job id -> JSON outcome of its attempt
    webhooks:failed               stream: deliveries given up on (replayable)
    reaper:lock                   string: one reaper pass at a time
    dataset:{id}                  hash: a dataset job (+ :inflight, :done, :kept, :lease; expire once retired)
    datasets:active               set: dataset jobs not yet terminal
    tenant:{t}:datasets           set: the tenant's active dataset jobs
    workers:live                  sorted set: model|worker -> heartbeat expiry (live workers per model)
    tenant:{t}:inversion:{digest} string: the id of the tenant's finished inversion with that key (reuse)
    cancel:scheduled              sorted set: edit id -> Cancel-After deadline (epoch s), swept by the reaper
"""

from __future__ import annotations

KEY_PREFIX = "editserve:"

# ---------------------------------------------------------------------------------------------- edits

EDIT_PREFIX = f"{KEY_PREFIX}edit:"


def edit_key(edit_id: str) -> str:
    return f"{EDIT_PREFIX}{edit_id}"


def tenant_index_key(tenant: str) -> str:
    return f"{KEY_PREFIX}tenant:{tenant}:edits"


def idem_key(tenant: str, key: str) -> str:
    return f"{KEY_PREFIX}idem:{tenant}:{key}"


def events_channel(edit_id: str) -> str:
    return f"{KEY_PREFIX}events:{edit_id}"


def stats_key(suffix: str) -> str:
    return f"{KEY_PREFIX}stats:{suffix}"


def eta_stats_keys(model: str, kind: str, height: int, width: int, steps: int, scheduler: str) -> list[str]:
    """The statistics an ETA may use, best first: the exact batch shape, then the same model, kind, size and
    scheduler at any step count (a per-step cost). Never another kind's or model's: no borrowed ETAs."""
    return [stats_key(f"{model}:{kind}:{height}x{width}:s{steps}:{scheduler}"),
            stats_key(f"{model}:{kind}:{height}x{width}:{scheduler}")]


def throughput_key(model: str, minute: int) -> str:
    """Work a model's workers finished in one minute (epoch seconds // 60): ``/v1/models`` throughput."""
    return f"{KEY_PREFIX}throughput:{model}:{minute}"


# ---------------------------------------------------------------------------------------------- tenants, limits

GLOBAL_QUEUED_KEY = f"{KEY_PREFIX}limits:queued"
TENANTS_KEY = f"{KEY_PREFIX}limits:tenants"


def tenant_key(tenant: str) -> str:
    """The tenant's own hash: webhook secret, creation time, limit overrides."""
    return f"{KEY_PREFIX}tenant:{tenant}"


def queued_key(tenant: str) -> str:
    return f"{tenant_key(tenant)}:queued"


def released_key(tenant: str) -> str:
    return f"{tenant_key(tenant)}:released"


def held_key(tenant: str, priority: str) -> str:
    return f"{tenant_key(tenant)}:held:{priority}"


def ratelimit_key(tenant: str) -> str:
    return f"{KEY_PREFIX}ratelimit:{tenant}"


# ---------------------------------------------------------------------------------------------- API keys

APIKEY_INDEX_KEY = f"{KEY_PREFIX}apikeys"


def apikey_key(digest: str) -> str:
    return f"{KEY_PREFIX}apikey:{digest}"


# ---------------------------------------------------------------------------------------------- webhooks

WEBHOOK_PREFIX = f"{KEY_PREFIX}webhook:"
WEBHOOKS_FAILED_KEY = f"{KEY_PREFIX}webhooks:failed"  # "webhooks", plural: never an edit's webhook:{id}


def webhook_state_key(edit_id: str) -> str:
    return f"{WEBHOOK_PREFIX}{edit_id}"


def webhook_throttle_key(edit_id: str) -> str:
    return f"{WEBHOOK_PREFIX}{edit_id}:throttle"


def webhook_emitted_key(edit_id: str) -> str:
    return f"{WEBHOOK_PREFIX}{edit_id}:emitted"


def webhook_done_key(edit_id: str) -> str:
    return f"{WEBHOOK_PREFIX}{edit_id}:done"


# ---------------------------------------------------------------------------------------------- worker

REAPER_LOCK_KEY = f"{KEY_PREFIX}reaper:lock"
LIVE_WORKERS_KEY = f"{KEY_PREFIX}workers:live"  # sorted set "model|worker" -> expiry (service.liveness)


# ---------------------------------------------------------------------------------------------- datasets

DATASETS_ACTIVE_KEY = f"{KEY_PREFIX}datasets:active"  # set: dataset jobs a driver must advance


def dataset_key(dataset_id: str) -> str:
    return f"{KEY_PREFIX}dataset:{dataset_id}"


def inflight_key(dataset_id: str) -> str:
    return f"{dataset_key(dataset_id)}:inflight"


def done_key(dataset_id: str) -> str:
    return f"{dataset_key(dataset_id)}:done"


def kept_key(dataset_id: str) -> str:
    return f"{dataset_key(dataset_id)}:kept"


def lease_key(dataset_id: str) -> str:
    return f"{dataset_key(dataset_id)}:lease"


def tenant_active_key(tenant: str) -> str:
    return f"{KEY_PREFIX}tenant:{tenant}:datasets"


# ---------------------------------------------------------------------------------------------- inversions


def inversion_cache_key(tenant: str, digest: str) -> str:
    """Per tenant: one tenant's photo never resolves to another tenant's inversion."""
    return f"{KEY_PREFIX}tenant:{tenant}:inversion:{digest}"


# ------------------------------------------------------------------------------------------- cancel-after

CANCEL_AFTER_KEY = f"{KEY_PREFIX}cancel:scheduled"
