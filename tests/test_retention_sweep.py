"""The retention sweep on real Redis: what it drops, what it keeps, and that one pass does bounded work."""

from __future__ import annotations

import time

import redis
from rq import Queue
from rq.worker_registration import REDIS_WORKER_KEYS, WORKERS_BY_QUEUE_KEY

from service.config import Settings
from service.keys import edit_key, tenant_index_key
from worker.runtime.retention import RetentionSweep

TTL = 60


def _settings(redis_url: str, batch: int) -> Settings:
    return Settings(redis_url=redis_url, retention={"record_ttl_seconds": TTL, "sweep_batch": batch})


def test_index_keeps_live_and_recent_members_and_drops_expired_ones_in_bounded_passes(redis_url):
    conn = redis.Redis.from_url(redis_url)
    old_ms = (time.time() - 2 * TTL) * 1000
    index = tenant_index_key("t1")
    gone = [f"gone-{i}" for i in range(5)]  # records expired long ago
    conn.zadd(index, {**{g: old_ms + i for i, g in enumerate(gone)}, "old-but-live": old_ms,
                      "recent": time.time() * 1000})
    conn.hset(edit_key("old-but-live"), "status", "processing")
    conn.hset(edit_key("recent"), "status", "queued")
    for tenant in range(2, 6):  # other tenants' indexes: the SCAN walks them over several passes
        conn.zadd(tenant_index_key(f"t{tenant}"), {f"x{tenant}": old_ms})

    sweep = RetentionSweep(conn, _settings(redis_url, batch=2))
    first = sweep.run_once()
    assert first.index_members_dropped <= 2 * 2  # at most sweep_batch members from each key it visited
    for _ in range(50):
        sweep.run_once()
    assert sorted(m.decode() for m in conn.zrange(index, 0, -1)) == ["old-but-live", "recent"]
    assert not [k for k in conn.keys("editserve:tenant:*:edits") if k != index.encode()]  # emptied: gone


def test_dead_workers_names_leave_rq_worker_sets(redis_url):
    conn = redis.Redis.from_url(redis_url)
    queue = Queue("edits.normal.tiny-sd", connection=conn)
    queue.enqueue("builtins.print", "x")  # registers the queue in rq:queues
    dead, live = "rq:worker:killed", "rq:worker:alive"
    conn.hset(live, "state", "idle")
    for key in (REDIS_WORKER_KEYS, WORKERS_BY_QUEUE_KEY % queue.name):
        conn.sadd(key, dead, live)
    RetentionSweep(conn, _settings(redis_url, batch=100)).run_once()
    assert conn.smembers(REDIS_WORKER_KEYS) == {live.encode()}
    assert conn.smembers(WORKERS_BY_QUEUE_KEY % queue.name) == {live.encode()}


def test_first_seen_marks_of_claims_that_left_the_intermediate_list_are_dropped(redis_url):
    conn = redis.Redis.from_url(redis_url)
    intermediate = "rq:queue:edits.normal.tiny-sd:intermediate"
    conn.rpush(intermediate, "still-claimed")
    for job_id in ("still-claimed", "started-long-ago"):
        conn.set(f"{intermediate}:first_seen:{job_id}", time.time(), ex=24 * 3600)  # as RQ writes them
    sweep = RetentionSweep(conn, _settings(redis_url, batch=100))
    for _ in range(5):
        sweep.run_once()
    assert conn.exists(f"{intermediate}:first_seen:still-claimed")
    assert not conn.exists(f"{intermediate}:first_seen:started-long-ago")
