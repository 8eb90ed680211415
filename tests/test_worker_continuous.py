"""Step-level batching in the worker: the admission policy, jobs of different steps/schedulers sharing one
running batch, a late job joining it, a cancel mid-flight, and SIGKILL mid-batch losing nothing.
Real Redis, real S3 (SeaweedFS), tiny models, a real worker process for the kill."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
import redis
from rq.job import Job, JobStatus
from worker_support import (
    TENANT,
    EventCounter,
    WorkerProcess,
    edit_field,
    intermediate_entries,
    ip2p_payload,
    make_settings,
    p2p_payload,
    started_entries,
    submit,
    wait_until,
)

from editserve.contract import BatchKey, EditStatus
from service.jobstore import JobStore
from worker.runtime.continuous import Candidate, choose


def cand(name: str, rows: int, tenant: str = "t1", priority: str = "normal", at: float = 0.0) -> Candidate:
    return Candidate(job=name, rows=rows, tenant=tenant, priority=priority, enqueued_at=at)  # type: ignore[arg-type]


def names(chosen) -> list[str]:
    return [c.job for c in chosen]


def test_admission_counts_rows_and_priority_goes_first():
    pending = [cand("low", 8, priority="low", at=0), cand("p2p3", 8, at=1), cand("ip2p", 3, at=2),
               cand("hi", 4, priority="high", at=3)]
    assert names(choose(pending, running_rows=0, tenant_rows={}, budget=16, overflow=0)) == ["hi", "p2p3", "ip2p"]
    # full of bulk work: a high-priority job still joins at the next step (overflow), normal ones wait
    assert names(choose(pending, running_rows=16, tenant_rows={}, budget=16, overflow=8)) == ["hi"]
    assert names(choose(pending, running_rows=16, tenant_rows={}, budget=16, overflow=0)) == []
    # an empty batch always takes its first job, however big
    assert names(choose([cand("huge", 40)], running_rows=0, tenant_rows={}, budget=16, overflow=0)) == ["huge"]


def test_a_blocked_job_blocks_lower_priorities_and_tenants_share_fairly():
    pending = [cand("big", 12, at=0), cand("small-low", 2, priority="low", at=1)]
    assert names(choose(pending, running_rows=8, tenant_rows={}, budget=16, overflow=0)) == []
    burst = [cand(f"a{i}", 4, tenant="a", at=i) for i in range(4)] + [cand("b0", 4, tenant="b", at=9)]
    # tenant a already runs 8 rows: b's job goes first although it is the newest
    assert names(choose(burst, running_rows=8, tenant_rows={"a": 8}, budget=20, overflow=0)) == ["b0", "a0", "a1"]


@pytest.fixture
def step_worker(make_worker):
    # a slowed step leaves the late job time to be claimed while the batch runs (a fast box finishes first)
    worker = make_worker(batching="step", row_budget=24, poll_interval_ms=5, debug_step_delay_seconds=0.3)
    yield worker
    worker.continuous.close()


def p2p_with(steps: int, scheduler: str, seed: int, **request) -> object:
    payload = p2p_payload(steps=steps, seed=seed, **request)
    payload.batch_key = BatchKey(model="tiny-sd", kind="p2p", height=64, width=64, steps=steps, scheduler=scheduler)
    payload.request.scheduler = scheduler
    return payload


def test_different_steps_and_schedulers_share_the_running_batch_and_a_late_job_joins(step_worker):
    worker = step_worker
    store, conn = worker.store, worker.connection
    ids = [submit(store, p2p_with(3, "ddim", 1)), submit(store, p2p_with(6, "euler_a", 2)),
           submit(store, p2p_with(4, "pndm", 3, target_prompts=["a photo of a dog", "a photo of a fox"]))]
    ip2p = submit(store, ip2p_payload(worker.storage, steps=3))
    late: list[str] = []

    def submit_late():
        wait_until(lambda: int(edit_field(conn, ids[1], "progress_step") or 0) >= 2, 120, what="progress")
        late.append(submit(store, p2p_with(2, "ddim", 4)))

    thread = threading.Thread(target=submit_late)
    thread.start()
    outcomes = worker.continuous.run_until_idle(300)
    thread.join(5)
    all_ids = [*ids, ip2p, *late]
    assert outcomes == {i: "succeeded" for i in all_ids}
    edits = {i: store.get(i) for i in all_ids}
    p2p_ids = [*ids, *late]
    assert len({edits[i].metrics.batch_id for i in p2p_ids}) == 1  # one running batch, joined by the late job
    assert edits[ip2p].metrics.batch_id != edits[ids[0]].metrics.batch_id  # another model: its own batch
    assert [int(edit_field(conn, i, "progress_total")) for i in p2p_ids] == [3, 6, 5, 2]  # PNDM: steps + 1
    for edit in edits.values():
        assert edit.status is EditStatus.succeeded and edit.metrics.attempts == 1
        response = httpx.get(edit.results[0].url, timeout=10)
        assert response.status_code == 200 and response.content[:4] == b"\x89PNG"
    assert len(edits[ids[2]].results) == 3
    assert started_entries(conn) == [] and intermediate_entries(conn) == []
    for edit_id in all_ids:
        assert Job.fetch(edit_id, connection=conn).get_status() == JobStatus.FINISHED


def test_cancel_mid_flight_retires_only_that_job(make_worker):
    worker = make_worker(batching="step", debug_step_delay_seconds=0.2, cancel_check_interval_seconds=0.0)
    try:
        store, conn = worker.store, worker.connection
        ids = [submit(store, p2p_with(6, "ddim", s)) for s in (1, 2, 3)]
        victim = ids[1]

        def cancel_when_running():
            wait_until(lambda: int(edit_field(conn, victim, "progress_step") or 0) >= 1, 60, what="progress")
            store.request_cancel(victim, TENANT)

        canceller = threading.Thread(target=cancel_when_running)
        canceller.start()
        outcomes = worker.continuous.run_until_idle(300)
        canceller.join(5)
        assert outcomes[victim] == "canceled"
        assert store.get(victim).status is EditStatus.canceled and store.get(victim).results == []
        assert int(edit_field(conn, victim, "progress_step")) < 6
        assert [store.get(i).status for i in (ids[0], ids[2])] == [EditStatus.succeeded] * 2
        assert Job.fetch(victim, connection=conn).get_status() == JobStatus.CANCELED
        assert started_entries(conn) == [] and intermediate_entries(conn) == []
    finally:
        worker.continuous.close()


def test_sigkill_mid_step_batch_loses_nothing(redis_url, s3_server, tiny_models):
    settings = make_settings(redis_url, s3_server)
    conn = redis.Redis.from_url(redis_url)
    store = JobStore(conn, settings)
    events = EventCounter(conn)
    common = {"batching": "step", "heartbeat_ttl_seconds": 5, "reaper_interval_seconds": 1}
    rescuer = WorkerProcess(settings, s3_server, "step-rescuer", **common)
    victim = None
    try:
        wait_until(lambda: '"event":"worker_started"' in rescuer.log(), 180, what="rescuer start")
        rescuer.signal(signal.SIGSTOP)
        ids = [submit(store, p2p_with(steps, "ddim", s)) for s, steps in ((1, 6), (2, 8), (3, 6))]
        victim = WorkerProcess(settings, s3_server, "step-victim", debug_step_delay_seconds=0.5, **common)
        wait_until(lambda: all(edit_field(conn, i, "status") == "processing" for i in ids)
                   and any(int(edit_field(conn, i, "progress_step") or 0) >= 1 for i in ids), 180,
                   what=lambda: f"progress; log:\n{victim.log()[-2000:]}")
        rescuer.signal(signal.SIGCONT)
        victim.kill()
        wait_until(lambda: all(edit_field(conn, i, "status") == "succeeded" for i in ids), 180,
                   what=lambda: f"recovery; log:\n{rescuer.log()[-3000:]}")
        for edit_id in ids:
            edit = store.get(edit_id)
            assert edit.metrics.attempts == 2 and "step-victim" in (edit_field(conn, edit_id, "requeue_reason") or "")
            assert Job.fetch(edit_id, connection=conn).get_status() == JobStatus.FINISHED
        time.sleep(0.3)
        assert [events.count(i, "succeeded") for i in ids] == [1, 1, 1]
        assert started_entries(conn) == [] and intermediate_entries(conn) == []
        rescuer.signal(signal.SIGTERM)
        assert rescuer.wait(90) == 0
    finally:
        events.close()
        rescuer.stop()
        if victim is not None:
            victim.stop()
