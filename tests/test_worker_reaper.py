"""The reaper in-process: abandoned executions are requeued at the front (attempts counted by the JobStore)
until the retry limit, then failed with a clear error; stranded claims go back; one reaper at a time."""

from __future__ import annotations

import time

import pytest
import redis
from rq.job import Job, JobStatus
from worker_support import edit_field, intermediate_entries, make_settings, p2p_payload, started_entries, submit

from editserve.contract import EditStatus
from service.jobstore import JobStore
from worker.runtime.batching import QueueClaimer, queue_key
from worker.runtime.reaper import LOCK_KEY, Reaper
from worker.runtime.rqbridge import RqBridge


@pytest.fixture
def env(redis_url, s3_server):
    settings = make_settings(redis_url, s3_server, max_retries=2, stranded_claim_seconds=0.2)
    conn = redis.Redis.from_url(redis_url)
    store = JobStore(conn, settings)
    return settings, conn, store


def start_like_a_worker(conn, store, settings, name="doomed") -> str:
    """Claim and start one job the way the worker does, then 'die' (never heartbeat again)."""
    claimed = QueueClaimer(conn, ["tiny-sd"]).claim(QueueClaimer(conn, ["tiny-sd"]).queue_names(), 1)[0]
    bridge = RqBridge(conn, name, heartbeat_ttl=settings.worker.heartbeat_ttl_seconds, result_ttl=60)
    bridge.start(claimed.job, claimed.queue)
    assert store.mark_processing(claimed.id, batch_id="b", batch_size=1, worker=name)
    return claimed.id


def expire_heartbeats(conn) -> None:
    for key in conn.scan_iter("rq:wip:*"):
        for member in conn.zrange(key, 0, -1):
            conn.zadd(key, {member: time.time() - 1})


def test_abandoned_job_is_requeued_at_the_front_then_failed_after_max_attempts(env):
    settings, conn, store = env
    edit_id = submit(store, p2p_payload())
    queue_name = edit_field(conn, edit_id, "queue")
    reaper = Reaper(conn, settings, store)

    for attempt in (1, 2):
        assert start_like_a_worker(conn, store, settings) == edit_id
        waiting = submit(store, p2p_payload(seed=100 + attempt))  # queued behind; the requeue must jump it
        assert reaper.run_once().requeued == []  # heartbeat still valid: nothing to do
        expire_heartbeats(conn)
        report = reaper.run_once()
        assert report.requeued == [edit_id]
        edit = store.get(edit_id)
        assert edit.status is EditStatus.queued and edit.metrics.attempts == attempt
        assert conn.lindex(queue_key(queue_name), 0).decode() == edit_id
        assert started_entries(conn) == [] and not conn.keys("rq:execution:*")
        assert Job.fetch(edit_id, connection=conn).get_status() == JobStatus.QUEUED
        conn.lrem(queue_key(queue_name), 0, waiting)  # keep the next claim deterministic

    assert start_like_a_worker(conn, store, settings) == edit_id
    expire_heartbeats(conn)
    report = reaper.run_once()
    assert report.failed == [edit_id]
    edit = store.get(edit_id)
    assert edit.status is EditStatus.failed and edit.error.type == "worker_crashed"
    assert "worker crashed 3 times" in edit.error.message
    assert Job.fetch(edit_id, connection=conn).get_status() == JobStatus.FAILED
    assert conn.llen(queue_key(queue_name)) == 0 and started_entries(conn) == []


def test_abandoned_job_with_pending_cancel_ends_canceled(env):
    settings, conn, store = env
    edit_id = submit(store, p2p_payload())
    start_like_a_worker(conn, store, settings)
    store.request_cancel(edit_id, "tests")
    expire_heartbeats(conn)
    Reaper(conn, settings, store).run_once()
    assert store.get(edit_id).status is EditStatus.canceled
    assert Job.fetch(edit_id, connection=conn).get_status() == JobStatus.CANCELED
    assert started_entries(conn) == []


def test_stranded_claim_goes_back_to_the_front_of_its_queue(env):
    settings, conn, store = env
    edit_id = submit(store, p2p_payload())
    claimer = QueueClaimer(conn, ["tiny-sd"])
    assert claimer.claim(claimer.queue_names(), 1)[0].id == edit_id  # claimed, then the worker "dies"
    reaper = Reaper(conn, settings, store)
    assert reaper.run_once().stranded == []  # first sighting only starts the clock
    time.sleep(0.3)
    assert reaper.run_once().stranded == [edit_id]
    assert intermediate_entries(conn) == []
    assert claimer.claim(claimer.queue_names(), 1)[0].id == edit_id
    assert edit_field(conn, edit_id, "status") == "queued"


def test_only_one_reaper_runs_at_a_time(env):
    settings, conn, store = env
    conn.set(LOCK_KEY, "someone-else", px=5000)
    assert Reaper(conn, settings, store).run_once().skipped_locked
    conn.delete(LOCK_KEY)
    assert not Reaper(conn, settings, store).run_once().skipped_locked


def test_standalone_reaper_once(env, s3_server):
    import os
    import subprocess
    import sys

    from worker_support import REPO

    settings, conn, store = env
    edit_id = submit(store, p2p_payload())
    start_like_a_worker(conn, store, settings)
    expire_heartbeats(conn)
    env_vars = dict(os.environ, EDITSERVE_REDIS_URL=settings.redis_url, **s3_server.env())
    out = subprocess.run([sys.executable, "-m", "worker.runtime.reaper", "--once"], cwd=REPO, env=env_vars,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "requeued=1" in out.stdout
    assert store.get(edit_id).status is EditStatus.queued
