"""The worker's finisher thread: batch N+1 runs while batch N's jobs are settled, one finishing batch at a time,
heartbeats kept alive meanwhile, a warm stop drains it, an abort still requeues, a crash while finishing one
job fails that job alone, and a worker killed between its uploads and its marks re-runs the job without a
second terminal transition. In-process workers, real Redis, real S3 (SeaweedFS), tiny models."""

from __future__ import annotations

import threading
import time

from rq.job import Job, JobStatus
from worker_support import (
    EventCounter,
    edit_field,
    intermediate_entries,
    p2p_payload,
    started_entries,
    submit,
    wait_until,
)

from editserve.contract import EditStatus
from worker.runtime import processing
from worker.runtime.reaper import Reaper

SLOW_MARK_SECONDS = 0.75  # each of batch 1's JobStore marks: its finishing outlasts batch 2's run
HEARTBEAT_INTERVAL = 0.1


def assert_rq_clean(connection) -> None:
    assert started_entries(connection) == [] and intermediate_entries(connection) == []


class Timeline:
    """What the worker did when, from hooks on the batch run, the JobStore marks and the heartbeats."""

    def __init__(self, worker, monkeypatch, *, on_run=lambda index: None):
        self.runs: list[tuple[list[str], float, float]] = []  # (edit ids, started, ended)
        self.marks: list[tuple[str, float, float]] = []  # (edit id, started, ended)
        self.renewals: list[tuple[str, set[str], float]] = []  # (thread name, edit ids, when)
        self._lock = threading.Lock()
        run, mark, renew = processing.run_with_split, worker.store.mark_succeeded, worker.bridge.renew

        def timed_run(runner, specs, on_step):
            on_run(len(self.runs))
            started = time.monotonic()
            try:
                return run(runner, specs, on_step)
            finally:
                with self._lock:
                    self.runs.append(([s.job_id for s in specs], started, time.monotonic()))

        def slow_mark(edit_id, **kwargs):
            started = time.monotonic()
            if edit_id in self.batch(0):
                time.sleep(SLOW_MARK_SECONDS)
            mark(edit_id, **kwargs)
            with self._lock:
                self.marks.append((edit_id, started, time.monotonic()))

        def recorded_renew(running):
            with self._lock:
                self.renewals.append((threading.current_thread().name, {job.id for job, _ in running},
                                      time.monotonic()))
            renew(running)

        monkeypatch.setattr(processing, "run_with_split", timed_run)
        monkeypatch.setattr(worker.store, "mark_succeeded", slow_mark)
        monkeypatch.setattr(worker.bridge, "renew", recorded_renew)

    def batch(self, index: int) -> list[str]:
        return self.runs[index][0] if len(self.runs) > index else []

    def marked(self, edit_id: str) -> tuple[float, float]:
        return next((started, ended) for i, started, ended in self.marks if i == edit_id)

    def renewed(self, edit_id: str, after: float, before: float) -> list[tuple[str, float]]:
        return [(thread, at) for thread, ids, at in self.renewals if edit_id in ids and after <= at <= before]


def run_loop(worker) -> threading.Thread:
    """``EditWorker.run`` (the process's loop) on a thread; the test stops it through ``stop_requested``."""
    thread = threading.Thread(target=worker.run, name="worker-loop", daemon=True)
    thread.start()
    return thread


def test_the_next_batch_runs_while_the_previous_one_is_finished(make_worker, monkeypatch):
    worker = make_worker(max_batch_size=2, heartbeat_interval_seconds=HEARTBEAT_INTERVAL)
    store, conn = worker.store, worker.connection
    ids = [submit(store, p2p_payload(seed=s)) for s in range(4)]
    events = EventCounter(conn)

    def stop_during_batch_2(index: int) -> None:
        if index == 1:  # a warm stop while batch 2 runs and batch 1 is being finished
            worker.stop_requested = True

    timeline = Timeline(worker, monkeypatch, on_run=stop_during_batch_2)
    loop = run_loop(worker)
    loop.join(60)
    assert not loop.is_alive()
    # the warm stop drained the finisher: every job is terminal the moment the loop returns
    assert [edit_field(conn, i, "status") for i in ids] == ["succeeded"] * 4

    first, second = timeline.batch(0), timeline.batch(1)
    assert sorted(first + second) == sorted(ids) and len(timeline.runs) == 2
    batch_1_finished = max(timeline.marked(i)[1] for i in first)
    batch_2_started, batch_2_ran = timeline.runs[1][1], timeline.runs[1][2]
    # the overlap: batch 2's run started before batch 1's jobs were all marked
    assert batch_2_started < batch_1_finished
    # one batch finishing at a time, in claim order
    assert [i for i, _, _ in timeline.marks] == first + second
    assert min(timeline.marked(i)[0] for i in second) >= batch_1_finished

    # heartbeats: batch 1's last job kept alive by the finisher between marks; batch 2's by the loop while it
    # waited for the finisher (no gap of many renewal intervals between its run's end and its marks)
    assert any(thread.startswith("editserve-finisher")
               for thread, _ in timeline.renewed(first[1], timeline.marked(first[0])[1], timeline.marked(first[1])[0]))
    for edit_id in second:
        times = [batch_2_ran, *(at for _, at in timeline.renewed(edit_id, batch_2_ran, batch_1_finished)),
                 batch_1_finished]
        assert max(b - a for a, b in zip(times, times[1:])) < SLOW_MARK_SECONDS, (edit_id, times)
        assert any(thread == "worker-loop" for thread, _ in timeline.renewed(edit_id, batch_2_ran, batch_1_finished))

    time.sleep(0.2)
    events.close()
    assert [events.count(i, "succeeded") for i in ids] == [1] * 4
    assert all(store.get(i).metrics.attempts == 1 for i in ids)
    assert_rq_clean(conn)


def test_a_batch_with_no_batch_after_it_is_finished_at_once(make_worker):
    """The loop hands a ran batch over when it starts the next one — or at once when no job is waiting."""
    worker = make_worker()
    edit_id = submit(worker.store, p2p_payload())
    loop = run_loop(worker)
    try:
        wait_until(lambda: edit_field(worker.connection, edit_id, "status") == "succeeded", 30, what="the lone edit")
        assert loop.is_alive()  # finished while the loop idles, not by the shutdown's drain
    finally:
        worker.stop_requested = True
        loop.join(30)
    assert_rq_clean(worker.connection)


def test_an_abort_requeues_the_running_batch_while_the_previous_one_is_finished(make_worker, monkeypatch):
    worker = make_worker(max_batch_size=2, heartbeat_interval_seconds=HEARTBEAT_INTERVAL)
    store, conn = worker.store, worker.connection
    ids = [submit(store, p2p_payload(seed=s)) for s in range(4)]

    def abort_batch_2(index: int) -> None:
        if index == 1:  # as a second signal would: batch 2's jobs stop at their next step
            worker.stop_requested = worker.abort_requested = True

    timeline = Timeline(worker, monkeypatch, on_run=abort_batch_2)
    loop = run_loop(worker)
    loop.join(60)
    assert not loop.is_alive()
    first, second = timeline.batch(0), timeline.batch(1)
    assert [store.get(i).status for i in first] == [EditStatus.succeeded] * 2  # already ran: finished normally
    queue = edit_field(conn, second[0], "queue")
    assert sorted(m.decode() for m in conn.lrange(f"rq:queue:{queue}", 0, -1)) == sorted(second)
    for edit_id in second:
        assert edit_field(conn, edit_id, "status") == "queued"
        assert "aborted" in edit_field(conn, edit_id, "requeue_reason")
    assert_rq_clean(conn)


def test_a_crash_while_finishing_one_job_fails_that_job_alone(make_worker, monkeypatch):
    worker = make_worker()
    store, conn, bridge = worker.store, worker.connection, worker.bridge
    mark_crash, rq_crash, fine = (submit(store, p2p_payload(seed=s)) for s in (1, 2, 3))
    mark, succeed = store.mark_succeeded, bridge.succeed

    def crashing_mark(edit_id, **kwargs):
        if edit_id == mark_crash:
            raise RuntimeError("bug in mark_succeeded")
        return mark(edit_id, **kwargs)

    def crashing_succeed(job, *args):
        if job.id == rq_crash:
            raise RuntimeError("bug in RQ bookkeeping")
        return succeed(job, *args)

    monkeypatch.setattr(store, "mark_succeeded", crashing_mark)
    monkeypatch.setattr(bridge, "succeed", crashing_succeed)
    report = worker.run_once(5.0)
    assert report.outcomes == {mark_crash: "failed", rq_crash: "succeeded", fine: "succeeded"}

    crashed = store.get(mark_crash)
    assert crashed.status is EditStatus.failed and crashed.error.type == "worker_error"
    assert "bug in mark_succeeded" in crashed.error.message
    assert Job.fetch(mark_crash, connection=conn).get_status() == JobStatus.FAILED
    # the edit was already succeeded when RQ's bookkeeping crashed: it stays so, and its RQ job is settled to match
    assert store.get(rq_crash).status is EditStatus.succeeded and len(store.get(rq_crash).results) == 2
    assert Job.fetch(rq_crash, connection=conn).get_status() == JobStatus.FINISHED
    assert store.get(fine).status is EditStatus.succeeded
    assert Job.fetch(fine, connection=conn).get_status() == JobStatus.FINISHED
    assert_rq_clean(conn)


def test_a_worker_killed_between_its_uploads_and_its_marks_reruns_the_job_with_one_outcome(make_worker, s3_server):
    dead, rescuer = make_worker(), make_worker()
    store, conn = dead.store, dead.connection
    ids = [submit(store, p2p_payload(seed=s)) for s in (1, 2)]
    events = EventCounter(conn)

    processor = dead.processor
    ran = processor.run(processor.start(dead.gatherer.gather(5.0)))
    processor.start_uploads(ran)  # the run is over and its uploads started ...
    for job in ran.jobs:
        job.upload.result(30)  # ... and done; then the worker "dies": nothing marked, heartbeats stop
    assert [edit_field(conn, i, "status") for i in ids] == ["processing"] * 2
    for key in conn.scan_iter("rq:wip:*"):  # its heartbeats expire
        for member in conn.zrange(key, 0, -1):
            conn.zadd(key, {member: 0})
    assert sorted(Reaper(conn, dead.settings, store).run_once().requeued) == sorted(ids)

    assert rescuer.run_once(5.0).outcomes == {i: "succeeded" for i in ids}
    # the dead worker coming back to finish after all changes nothing (guarded transitions, not its RQ job now)
    assert processor.finish(ran).outcomes == {i: "succeeded" for i in ids}

    wait_until(lambda: all(events.count(i, "succeeded") for i in ids), 5, what="succeeded events")
    time.sleep(0.2)
    events.close()
    assert [events.count(i, "succeeded") for i in ids] == [1, 1]
    s3 = s3_server.client()
    for edit_id in ids:
        edit = store.get(edit_id)
        assert edit.status is EditStatus.succeeded and edit.metrics.attempts == 2
        assert edit_field(conn, edit_id, "worker") == rescuer.name
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_server.bucket,
                                                           Prefix=f"edits/{edit_id}/").get("Contents", []))
        assert keys == [f"edits/{edit_id}/output-0-source.png", f"edits/{edit_id}/output-1-target-1.png"]
        assert Job.fetch(edit_id, connection=conn).get_status() == JobStatus.FINISHED
    assert_rq_clean(conn)
