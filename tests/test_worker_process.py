"""Real worker processes: SIGKILL mid-batch loses nothing and completes nothing twice; SIGTERM finishes the
running batch and exits 0; a second signal aborts and requeues. Real Redis, real S3, tiny models."""

from __future__ import annotations

import signal
import time

import pytest
import redis
from rq.job import Job, JobStatus
from worker_support import (
    EventCounter,
    WorkerProcess,
    edit_field,
    intermediate_entries,
    make_settings,
    p2p_payload,
    started_entries,
    submit,
    wait_until,
)

from editserve.contract import EditStatus
from service.jobstore import JobStore

FAST_RECOVERY = {"heartbeat_ttl_seconds": 5, "reaper_interval_seconds": 1, "max_batch_wait_ms": 300}


@pytest.fixture
def env(redis_url, s3_server, tiny_models):
    settings = make_settings(redis_url, s3_server)
    conn = redis.Redis.from_url(redis_url)
    workers: list[WorkerProcess] = []

    def spawn(name: str, **worker_env) -> WorkerProcess:
        worker = WorkerProcess(settings, s3_server, name, **{**FAST_RECOVERY, **worker_env})
        workers.append(worker)
        return worker

    yield settings, conn, JobStore(conn, settings), spawn
    for worker in workers:
        worker.stop()


def progressed(conn, ids) -> bool:
    return any(int(edit_field(conn, i, "progress_step") or 0) >= 1 for i in ids)


def test_sigkill_mid_batch_every_job_succeeds_exactly_once_on_another_worker(env, s3_server):
    _, conn, store, spawn = env
    events = EventCounter(conn)
    # A warm second worker, frozen while the victim takes the batch (else it could claim the jobs first):
    # the time to recovery then measures detection, not start-up.
    rescuer = spawn("rescuer")
    wait_until(lambda: '"event":"worker_started"' in rescuer.log(), 180, what="rescuer start")
    rescuer.signal(signal.SIGSTOP)
    ids = [submit(store, p2p_payload(steps=6, seed=s)) for s in (1, 2, 3)]
    victim = spawn("victim", debug_step_delay_seconds=0.5)
    wait_until(lambda: progressed(conn, ids), 180, what=lambda: f"progress; log:\n{victim.log()[-2000:]}")
    assert {edit_field(conn, i, "batch_size") for i in ids} == {"3"}
    assert len({edit_field(conn, i, "batch_id") for i in ids}) == 1
    rescuer.signal(signal.SIGCONT)

    victim.kill()
    killed_at = time.monotonic()
    wait_until(lambda: all(edit_field(conn, i, "status") != "processing" for i in ids), 120, what="detection")
    detected_after = time.monotonic() - killed_at
    wait_until(lambda: all(edit_field(conn, i, "status") == "succeeded" for i in ids), 120,
               what=lambda: f"recovery; log:\n{rescuer.log()[-3000:]}")
    print(f"\nSIGKILL → requeued after {detected_after:.1f}s, succeeded after "
          f"{time.monotonic() - killed_at:.1f}s (heartbeat TTL 5s, reaper every 1s)")

    s3 = s3_server.client()
    for edit_id in ids:
        edit = store.get(edit_id)
        assert edit.status is EditStatus.succeeded and edit.metrics.attempts == 2
        assert "victim" in (edit_field(conn, edit_id, "requeue_reason") or "")
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_server.bucket,
                                                           Prefix=f"edits/{edit_id}/").get("Contents", []))
        assert keys == [f"edits/{edit_id}/output-0-source.png", f"edits/{edit_id}/output-1-target-1.png"]
        assert Job.fetch(edit_id, connection=conn).get_status() == JobStatus.FINISHED
    time.sleep(0.3)
    events.close()
    assert [events.count(i, "succeeded") for i in ids] == [1, 1, 1]
    assert started_entries(conn) == [] and intermediate_entries(conn) == []

    rescuer.signal(signal.SIGTERM)
    assert rescuer.wait(90) == 0


def test_sigterm_finishes_the_running_batch_then_exits_0(env):
    _, conn, store, spawn = env
    ids = [submit(store, p2p_payload(steps=6, seed=s)) for s in (1, 2)]
    worker = spawn("graceful", debug_step_delay_seconds=0.3)
    wait_until(lambda: progressed(conn, ids), 180, what=lambda: f"progress; log:\n{worker.log()[-2000:]}")
    worker.signal(signal.SIGTERM)
    late = submit(store, p2p_payload(seed=9))  # arrives after the shutdown request: must stay queued
    assert worker.wait(120) == 0, worker.log()[-3000:]
    for edit_id in ids:
        edit = store.get(edit_id)
        assert edit.status is EditStatus.succeeded and edit.metrics.attempts == 1
    assert store.get(late).status is EditStatus.queued
    assert started_entries(conn) == [] and intermediate_entries(conn) == []
    log = worker.log()
    assert '"event":"warm_shutdown_requested"' in log and '"event":"worker_stopped"' in log
    assert '"event":"batch"' in log


def test_second_signal_aborts_and_requeues_the_running_jobs(env):
    _, conn, store, spawn = env
    ids = [submit(store, p2p_payload(steps=6, seed=s)) for s in (1, 2)]
    worker = spawn("impatient", debug_step_delay_seconds=0.5)
    wait_until(lambda: progressed(conn, ids), 180, what=lambda: f"progress; log:\n{worker.log()[-2000:]}")
    worker.signal(signal.SIGTERM)
    time.sleep(0.1)
    worker.signal(signal.SIGINT)
    assert worker.wait(90) == 0, worker.log()[-3000:]
    queue = edit_field(conn, ids[0], "queue")
    assert sorted(m.decode() for m in conn.lrange(f"rq:queue:{queue}", 0, -1)) == sorted(ids)
    for edit_id in ids:
        edit = store.get(edit_id)
        assert edit.status is EditStatus.queued and edit.metrics.attempts == 1
        assert "aborted" in edit_field(conn, edit_id, "requeue_reason")
    assert started_entries(conn) == [] and intermediate_entries(conn) == []
