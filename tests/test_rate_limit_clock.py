"""The GCRA rate limit over time, against a real Redis, with the clock driven by the test (no sleeping).

Intervals are long (100 s per request) so the bucket's key, which expires in real time, outlives any loaded
test run; the injected clock then steps through whole intervals: a used-up burst is remembered until the
intervals it owes have passed, refills one request per interval, and comes back whole after burst intervals.
"""

from __future__ import annotations

import pytest
import redis
from gateway_support import make_settings

from service.limits import LimitExceeded, RateLimiter, ratelimit_key, tenant_key

T0 = 1_900_000_000.0  # an arbitrary epoch second; nothing below depends on the real time
INTERVAL = 100.0  # seconds per request at 0.01 rps
BURST = 3


@pytest.fixture
def conn(redis_url):
    return redis.Redis.from_url(redis_url)


def limiter(conn, redis_url, rps: float = 1 / INTERVAL, burst: int = BURST) -> RateLimiter:
    return RateLimiter(conn, make_settings(redis_url, limits={"tenant_rps": rps, "tenant_burst": burst}))


def allowed(rl: RateLimiter, at: float, tenant: str = "acme") -> bool:
    try:
        rl.check(tenant, now=at)
    except LimitExceeded as refused:
        assert refused.status == 429 and refused.limit == "tenant_rps" and refused.retry_after >= 1
        return False
    return True


def retry_after(rl: RateLimiter, at: float, tenant: str = "acme") -> int:
    with pytest.raises(LimitExceeded) as refused:
        rl.check(tenant, now=at)
    return refused.value.retry_after


def test_a_used_up_burst_is_remembered_until_its_intervals_pass(conn, redis_url):
    rl = limiter(conn, redis_url)
    assert [allowed(rl, T0) for _ in range(BURST + 1)] == [True] * BURST + [False]
    assert retry_after(rl, T0 + 1) == 99  # one interval after the burst, less the second that passed
    assert not allowed(rl, T0 + INTERVAL / 2)
    assert not allowed(rl, T0 + INTERVAL - 0.001)
    assert allowed(rl, T0 + INTERVAL)  # one interval: one request back, not the burst
    assert not allowed(rl, T0 + INTERVAL)
    assert not allowed(rl, T0 + 2 * INTERVAL - 0.001)
    assert allowed(rl, T0 + 2 * INTERVAL)
    assert not allowed(rl, T0 + 2 * INTERVAL + 1)


def test_the_whole_burst_returns_after_burst_intervals_and_not_before(conn, redis_url):
    rl = limiter(conn, redis_url)
    assert all(allowed(rl, T0) for _ in range(BURST))
    later = T0 + (BURST - 1) * INTERVAL  # two of three requests owed back: exactly two pass
    assert [allowed(rl, later) for _ in range(BURST)] == [True, True, False]
    full = later + BURST * INTERVAL
    assert [allowed(rl, full) for _ in range(BURST + 1)] == [True] * BURST + [False]


def test_idle_time_does_not_bank_more_than_the_burst(conn, redis_url):
    rl = limiter(conn, redis_url)
    assert allowed(rl, T0)
    much_later = T0 + 1000 * INTERVAL
    assert [allowed(rl, much_later) for _ in range(BURST + 1)] == [True] * BURST + [False]


def test_the_bucket_key_lives_as_long_as_the_debt(conn, redis_url):
    """Redis expires the key in real time: it must last as long as the used-up burst is owed, or the burst is
    forgotten early (a key that expired after one interval would give back three requests instead of one)."""
    rl = limiter(conn, redis_url)
    for _ in range(BURST):
        rl.check("acme", now=T0)
    ttl_ms = conn.pttl(ratelimit_key("acme"))
    assert BURST * INTERVAL * 1000 - 60_000 < ttl_ms <= BURST * INTERVAL * 1000 + 1
    assert float(conn.get(ratelimit_key("acme"))) == pytest.approx((T0 + BURST * INTERVAL) * 1000)


def test_refused_requests_are_not_counted(conn, redis_url):
    rl = limiter(conn, redis_url)
    for _ in range(BURST):
        rl.check("acme", now=T0)
    stored = conn.get(ratelimit_key("acme"))
    for _ in range(5):
        assert not allowed(rl, T0 + 10)
    assert conn.get(ratelimit_key("acme")) == stored
    assert allowed(rl, T0 + INTERVAL)


def test_tenants_have_their_own_buckets_and_overrides(conn, redis_url):
    rl = limiter(conn, redis_url)
    assert all(allowed(rl, T0, "acme") for _ in range(BURST))
    assert not allowed(rl, T0, "acme")
    assert allowed(rl, T0, "globex")
    conn.hset(tenant_key("initech"), mapping={"limit_rps": 1.0, "limit_burst": 1})  # 1 s interval, burst 1
    assert allowed(rl, T0, "initech") and not allowed(rl, T0 + 0.999, "initech") and allowed(rl, T0 + 1, "initech")


def test_a_zero_rate_means_unlimited(conn, redis_url):
    rl = limiter(conn, redis_url, rps=0.0, burst=1)
    assert all(allowed(rl, T0) for _ in range(20))
    assert conn.get(ratelimit_key("acme")) is None
