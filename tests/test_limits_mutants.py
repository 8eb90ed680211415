"""The limits module's small behaviours, pinned so that mutation testing (bench/mutation.py) has something to
fail: refusal fields and messages, Retry-After rounding, overrides read/write/defaults, the asyncio script
path (EVALSHA, loading on a miss), precheck with an override, odd script outcomes, the sweep's chunking and
the place of a held edit in line. Against the session's real Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio
from gateway_support import make_settings

from editserve.contract import ErrorType
from service import limits as limits_module
from service.keys import GLOBAL_QUEUED_KEY, TENANTS_KEY, edit_key, held_key, tenant_key
from service.limits import (
    Accounting,
    AdmissionRequest,
    LimitExceeded,
    RateLimiter,
    TenantLimitOverrides,
    held_ahead,
    queue_refusal,
    read_overrides,
    tenant_limits,
    write_overrides,
)


@pytest.fixture
def conn(redis_url):
    return redis.Redis.from_url(redis_url)


def settings(redis_url, **limits):
    return make_settings(redis_url, limits=limits)


def test_retry_after_is_a_whole_second_at_least_one():
    assert LimitExceeded(429, ErrorType.rate_limited, "m", limit="x", retry_after=0).retry_after == 1
    assert LimitExceeded(429, ErrorType.rate_limited, "m", limit="x", retry_after=2.9).retry_after == 2
    refused = LimitExceeded(503, ErrorType.queue_full, "the message", limit="max_queue_depth", retry_after=7)
    assert (refused.status, refused.type, refused.message, refused.limit, str(refused)) == (
        503, "queue_full", "the message", "max_queue_depth", "the message")


def test_queue_refusals_name_their_limit(redis_url):
    s = settings(redis_url, queue_full_retry_after_seconds=11)
    full = queue_refusal("queue_full", "acme", 5, 5, s)
    assert (full.status, full.type, full.limit, full.retry_after) == (503, "queue_full", "max_queue_depth", 11)
    assert full.message == "the service already holds 5 queued edits, its limit (max_queue_depth 5); retry later"
    mine = queue_refusal("tenant_queue_full", "acme", 3, 2, s)
    assert (mine.status, mine.type, mine.limit, mine.retry_after) == (429, "tenant_queue_full",
                                                                      "tenant_max_queued", 11)
    assert mine.message == ("tenant 'acme' already has 3 queued edits, its limit (tenant_max_queued 2); "
                            "retry when some have started")


def test_overrides_are_written_read_and_reset_to_the_defaults(redis_url, conn):
    s = settings(redis_url, tenant_rps=2.0, tenant_burst=4, tenant_max_queued=9, tenant_max_concurrent=3)
    tenant = "ovr-tenant"
    conn.delete(tenant_key(tenant))
    assert read_overrides(conn, tenant) == TenantLimitOverrides()
    fresh = tenant_limits(conn, tenant, s)
    assert (fresh.rps, fresh.burst, fresh.max_queued, fresh.max_concurrent) == (2.0, 4, 9, 3)
    assert (fresh.queued, fresh.released, fresh.held, fresh.tenant) == (0, 0, 0, tenant)
    every = TenantLimitOverrides(rps=0.5, burst=7, max_queued=0, max_concurrent=6)
    limits = write_overrides(conn, tenant, every, s)
    assert (limits.rps, limits.burst, limits.max_queued, limits.max_concurrent) == (0.5, 7, 0, 6)
    assert limits.overrides == every and read_overrides(conn, tenant) == every
    assert conn.hget(tenant_key(tenant), "limit_rps") == b"0.5"
    assert conn.hget(tenant_key(tenant), "limit_max_concurrent") == b"6"
    assert conn.sismember(TENANTS_KEY, tenant)
    limits = write_overrides(conn, tenant, TenantLimitOverrides(burst=2), s)
    assert (limits.rps, limits.burst, limits.max_queued, limits.max_concurrent) == (2.0, 2, 9, 3)
    assert conn.hget(tenant_key(tenant), "limit_rps") is None
    conn.rpush(held_key(tenant, "high"), "a")
    conn.rpush(held_key(tenant, "low"), "b", "c")
    try:
        assert tenant_limits(conn, tenant, s).held == 3
    finally:
        conn.delete(held_key(tenant, "high"), held_key(tenant, "low"), tenant_key(tenant))
        conn.srem(TENANTS_KEY, tenant)


def test_judge_rounds_the_wait_up_and_names_rate_and_burst():
    RateLimiter.judge("t", 1, 0, b"1", 1)  # allowed: nothing raised
    RateLimiter.judge("t", b"1", 0, b"1", 1)
    with pytest.raises(LimitExceeded) as refused:
        RateLimiter.judge("acme", b"0", b"1001", b"0.25", b"3")
    assert refused.value.retry_after == 2 and refused.value.limit == "tenant_rps"
    assert (refused.value.status, refused.value.type) == (429, "rate_limited")
    assert refused.value.message == ("tenant 'acme' may make 0.25 requests/s with bursts of 3 "
                                     "(tenant_rps, tenant_burst); retry in 2 s")
    with pytest.raises(LimitExceeded) as refused:
        RateLimiter.judge("acme", 0, 3000, 4.0, 1)
    assert refused.value.retry_after == 3 and "may make 4 requests/s" in refused.value.message
    with pytest.raises(LimitExceeded) as refused:
        RateLimiter.judge("acme", 0, 0, "1", 1)
    assert refused.value.retry_after == 1


def test_the_limiter_sends_the_default_rate_and_burst(redis_url, conn):
    rl = RateLimiter(conn, settings(redis_url, tenant_rps=3, tenant_burst=5))
    assert rl.args() == ["3.0", 5]
    assert RateLimiter.keys("acme") == ["editserve:ratelimit:acme", "editserve:tenant:acme"]


def test_the_asyncio_path_loads_the_script_on_a_miss_and_counts(redis_url, conn):
    tenant = "async-rate"
    conn.delete(limits_module.ratelimit_key(tenant), tenant_key(tenant))
    rl = RateLimiter(conn, settings(redis_url, tenant_rps=0.001, tenant_burst=2))

    async def run() -> list[bool]:
        aconn = redis.asyncio.Redis.from_url(redis_url)
        outcomes = []
        try:
            for _ in range(3):
                await aconn.script_flush()  # every call misses: EVALSHA, SCRIPT LOAD, EVALSHA
                try:
                    await rl.check_async(aconn, tenant)
                    outcomes.append(True)
                except LimitExceeded as refused:
                    assert refused.retry_after > 100 and refused.message.startswith(f"tenant '{tenant}' may make")
                    outcomes.append(False)
        finally:
            await aconn.aclose()
        return outcomes

    assert asyncio.run(run()) == [True, True, False]


def test_precheck_uses_the_tenants_override_and_the_global_depth(redis_url, conn):
    s = settings(redis_url, tenant_max_queued=1, max_queue_depth=10_000)
    tenant = "precheck-tenant"
    acct = Accounting(conn, s)
    conn.delete(tenant_key(tenant), f"editserve:tenant:{tenant}:queued")
    acct.precheck(tenant)
    conn.sadd(f"editserve:tenant:{tenant}:queued", "e1")
    with pytest.raises(LimitExceeded) as refused:
        acct.precheck(tenant)
    assert refused.value.limit == "tenant_max_queued"
    assert refused.value.message.startswith(f"tenant '{tenant}' already has 1 queued edits, its limit "
                                            "(tenant_max_queued 1)")
    conn.hset(tenant_key(tenant), "limit_max_queued", "2.0")
    acct.precheck(tenant)  # the override (2) allows a second
    conn.hset(tenant_key(tenant), "limit_max_queued", "1")
    with pytest.raises(LimitExceeded, match=r"tenant_max_queued 1\)"):
        acct.precheck(tenant)
    depth = conn.scard(GLOBAL_QUEUED_KEY)
    tight = Accounting(conn, settings(redis_url, max_queue_depth=depth))
    with pytest.raises(LimitExceeded) as refused:
        tight.precheck("another-tenant")
    assert refused.value.status == 503 and refused.value.limit == "max_queue_depth"
    assert refused.value.message.startswith(f"the service already holds {depth} queued edits, its limit "
                                            f"(max_queue_depth {depth})")
    Accounting(conn, settings(redis_url, max_queue_depth=depth + 1)).precheck("another-tenant")
    conn.delete(tenant_key(tenant), f"editserve:tenant:{tenant}:queued")


def request(edit_id: str = "e-odd") -> AdmissionRequest:
    return AdmissionRequest(record={"id": edit_id, "tenant": "odd"}, score_ms=1, priority="normal",
                            job_key="k", job_fields={}, queues_ahead=[], stats_keys=[])


def test_odd_script_outcomes(redis_url, conn):
    acct = Accounting(conn, settings(redis_url, queue_full_retry_after_seconds=4))
    with pytest.raises(RuntimeError, match="edit e-odd not admitted: weird"):
        acct._outcome(request(), [b"weird"])
    assert acct._outcome(request(), [b"duplicate", b"prior"]).prior_claim == b"prior"
    assert acct._outcome(request(), ["duplicate", b"prior"]).state == "duplicate"
    with pytest.raises(LimitExceeded) as refused:
        acct._outcome(request(), [b"tenant_queue_full", 3, 2])
    assert refused.value.limit == "tenant_max_queued"
    assert refused.value.message.startswith("tenant 'odd' already has 3 queued edits, its limit (tenant_max_queued 2)")
    with pytest.raises(LimitExceeded) as refused:
        acct._outcome(request(), [b"queue_full", 8, 8])
    assert refused.value.status == 503 and refused.value.retry_after == 4
    with pytest.raises(LimitExceeded) as refused:
        acct._outcome(request(), [b"rate_limited", 2500, b"0.5", 2])
    assert refused.value.retry_after == 3 and refused.value.limit == "tenant_rps"
    assert refused.value.message.startswith("tenant 'odd' may make 0.5 requests/s with bursts of 2")
    admitted = acct._outcome(request(), [b"held", 4, [b"mean", b"1.5", "n", "2"]])
    assert (admitted.state, admitted.ahead, admitted.stats) == ("held", 4, {"mean": 1.5, "n": 2.0})
    assert acct._outcome(request(), ["released", 0, []]).state == "released"


def test_admit_args_carry_rate_claim_and_job_fields(redis_url, conn):
    import json

    acct = Accounting(conn, settings(redis_url))
    r = request()
    r.rate = ("acme", 2, 5)
    r.claim = ("idem-key", "value", 60)
    r.job_fields = {"a": "1", "b": "2"}
    config, spec, *fields = acct._admit_args(r)
    spec = json.loads(spec)
    assert spec["rate"] == {"key": "editserve:ratelimit:acme", "rps": "2.0", "burst": 5}
    assert spec["claim"] == {"key": "idem-key", "value": "value", "ttl": 60}
    assert (spec["score"], spec["priority"], spec["job_key"]) == (1, "normal", "k")
    assert fields == ["a", "1", "b", "2"]
    assert "rate" not in json.loads(acct._admit_args(request())[1])


def test_the_sweep_prunes_the_global_set_in_chunks(redis_url, conn, monkeypatch):
    """Members of the global queued set whose edit is gone (or no longer queued) are pruned, in every chunk
    including a last partial one; a queued edit's member stays."""
    monkeypatch.setattr(limits_module, "SWEEP_CHUNK", 2)
    stale = [f"stale-sweep-{i}" for i in range(5)]  # two full chunks and a last one of one member
    conn.sadd(GLOBAL_QUEUED_KEY, *stale)
    Accounting(conn, settings(redis_url)).sweep()
    assert conn.smembers(GLOBAL_QUEUED_KEY) == set()
    live = "live-sweep-0"
    conn.hset(edit_key(live), mapping={"status": "queued", "tenant": "sweep-tenant"})
    conn.sadd(GLOBAL_QUEUED_KEY, live, "stale-again")
    Accounting(conn, settings(redis_url)).sweep()
    assert conn.smembers(GLOBAL_QUEUED_KEY) == {live.encode()}


def test_the_sweep_adds_up_every_tenants_releases_and_lost_edits(redis_url, conn):
    from gateway_support import p2p_payload
    from rq.job import Job

    from service.jobstore import JobStore, new_edit_id

    js = JobStore(conn, settings(redis_url, tenant_max_concurrent=1))

    def create(tenant: str) -> str:
        edit, _ = js.create(p2p_payload(new_edit_id(), tenant), webhook=None, idempotency_key=None)
        return edit.id

    tenants = ["sweep-a", "sweep-b", "sweep-c"]
    for tenant in tenants:
        create(tenant)  # released
    lost = {create(tenant) for tenant in tenants[:2]}  # held, then their RQ job hash deleted by hand
    for edit_id in lost:
        conn.delete(Job.key_for(edit_id))
    text = redis.Redis.from_url(redis_url, decode_responses=True)  # ids come back as str, not bytes
    released, found = Accounting(text, settings(redis_url, tenant_max_concurrent=1)).sweep()
    assert (released, set(found)) == (0, lost)
    for tenant in tenants:
        create(tenant)  # held behind the released one
    released, found = Accounting(conn, settings(redis_url, tenant_max_concurrent=2)).sweep()
    assert (released, set(found)) == (3, lost)  # the lost ones are reported until failed


def test_held_ahead_counts_higher_priorities_first(conn):
    tenant = "ahead-tenant"
    keys = {p: held_key(tenant, p) for p in ("high", "normal", "low")}
    conn.delete(*keys.values())
    conn.rpush(keys["high"], "h1", "h2")
    conn.rpush(keys["normal"], "n1", "n2", "n3")
    conn.rpush(keys["low"], "l1")
    try:
        assert held_ahead(conn, tenant, keys["high"], "h2") == 1
        assert held_ahead(conn, tenant, keys["normal"], "n1") == 2
        assert held_ahead(conn, tenant, keys["normal"], "n3") == 4
        assert held_ahead(conn, tenant, keys["low"], "l1") == 5
        assert held_ahead(conn, tenant, keys["low"], "gone") is None
    finally:
        conn.delete(*keys.values())
