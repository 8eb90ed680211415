"""The batching worker in-process: one batch per batch key, failures and cancels confined to their job,
results in S3, RQ bookkeeping clean, metrics served. Real Redis, real S3 (SeaweedFS), tiny models."""

from __future__ import annotations

import io
import json
import threading

import httpx
from prometheus_client.parser import text_string_to_metric_families
from PIL import Image
from rq.job import Job, JobStatus
from worker_support import (
    TENANT,
    edit_field,
    intermediate_entries,
    ip2p_payload,
    p2p_payload,
    started_entries,
    submit,
    wait_until,
)

from editserve.contract import EditStatus, Sweep
from devtools.devstack import free_port
from service.keys import edit_key
from worker.editing.batch import BatchForwardError
from worker.editing.jobs import JobResult, P2PJobSpec
from worker.runtime.processing import run_with_split


def assert_rq_clean(connection):
    assert started_entries(connection) == []
    assert intermediate_entries(connection) == []


def test_compatible_jobs_share_one_batch_and_results_are_downloadable(make_worker):
    worker = make_worker()
    store, storage = worker.store, worker.storage
    sweep = Sweep(image_guidance=[1.0, 1.5], seeds=[1, 2])
    batch_ids = [submit(store, ip2p_payload(storage)),
                 submit(store, ip2p_payload(storage, sweep=sweep, seeds=[1, 2, 1, 2])),
                 submit(store, ip2p_payload(storage))]
    other = submit(store, p2p_payload(attention_maps=True))

    reports = [worker.run_once(5.0), worker.run_once(5.0)]
    assert worker.run_once(0.1) is None
    by_size = {r.size: r for r in reports}
    assert set(by_size) == {1, 3}
    assert set(by_size[3].outcomes) == set(batch_ids) and set(by_size[1].outcomes) == {other}

    edits = [store.get(i) for i in batch_ids]
    assert {e.status for e in edits} == {EditStatus.succeeded}
    assert len({e.metrics.batch_id for e in edits}) == 1 and edits[0].metrics.batch_id == by_size[3].batch_id
    assert all(e.metrics.batch_size == 3 and e.metrics.attempts == 1 for e in edits)
    lone = store.get(other)
    assert lone.status is EditStatus.succeeded and lone.metrics.batch_size == 1
    assert lone.metrics.batch_id != edits[0].metrics.batch_id

    swept = edits[1]
    assert [(r.image_guidance, r.seed) for r in swept.results] == [(1.0, 1), (1.0, 2), (1.5, 1), (1.5, 2)]
    for edit in [*edits, lone]:
        for result in edit.results:
            response = httpx.get(result.url, timeout=10)
            assert response.status_code == 200
            assert Image.open(io.BytesIO(response.content)).size == (64, 64)
    assert len(lone.results) == 2 and [m.prompt_index for m in lone.attention_maps] == [0, 1]
    array = httpx.get(lone.attention_maps[0].array_url, timeout=10)
    assert array.status_code == 200 and array.content[:6] == b"\x93NUMPY"

    assert_rq_clean(worker.connection)
    for edit_id in [*batch_ids, other]:
        job = Job.fetch(edit_id, connection=worker.connection)
        assert job.get_status() == JobStatus.FINISHED
        assert job.latest_result().return_value["outputs"] >= 1


def test_invalid_payload_and_unknown_word_fail_alone(make_worker):
    worker = make_worker()
    store, conn = worker.store, worker.connection
    good = [submit(store, p2p_payload()), submit(store, p2p_payload(seed=8))]
    unknown_word = submit(store, p2p_payload(edit="reweight", reweight={"zebra": 2.0}))
    corrupt = submit(store, p2p_payload())
    raw = json.loads(conn.hget(edit_key(corrupt), "payload"))
    raw["request"]["guidance_scale"] = 99  # outside the contract's range
    conn.hset(edit_key(corrupt), "payload", json.dumps(raw))

    report = worker.run_once(5.0)
    assert report.size == 4
    assert [store.get(i).status for i in good] == [EditStatus.succeeded] * 2
    word = store.get(unknown_word)
    assert word.status is EditStatus.failed and word.error.field == "reweight"
    assert word.error.type == "validation_error" and "zebra" in word.error.message
    bad = store.get(corrupt)
    assert bad.status is EditStatus.failed and bad.error.type == "invalid_payload"
    assert "guidance_scale" in bad.error.field
    assert Job.fetch(corrupt, connection=conn).get_status() == JobStatus.FAILED
    assert_rq_clean(conn)


def test_cancel_mid_run_stops_only_that_job(make_worker):
    worker = make_worker(debug_step_delay_seconds=0.2, cancel_check_interval_seconds=0.0)
    store, conn = worker.store, worker.connection
    ids = [submit(store, p2p_payload(steps=6, seed=s)) for s in (1, 2, 3)]
    victim = ids[1]

    others_when_canceled: list = []

    def cancel_when_running():
        wait_until(lambda: int(edit_field(conn, victim, "progress_step") or 0) >= 1, 30, what="progress")
        store.request_cancel(victim, TENANT)
        wait_until(lambda: edit_field(conn, victim, "status") == "canceled", 10, interval=0.01, what="canceled")
        others_when_canceled.extend(edit_field(conn, i, "status") for i in (ids[0], ids[2]))

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    report = worker.run_once(5.0)
    canceller.join(5)
    assert report.size == 3 and report.outcomes[victim] == "canceled"
    # the victim's status did not wait for the end of its batch: its batch mates were still running
    assert others_when_canceled == ["processing", "processing"]
    canceled = store.get(victim)
    assert canceled.status is EditStatus.canceled and canceled.results == []
    assert int(edit_field(conn, victim, "progress_step")) < 6
    assert [store.get(i).status for i in (ids[0], ids[2])] == [EditStatus.succeeded] * 2
    assert Job.fetch(victim, connection=conn).get_status() == JobStatus.CANCELED
    assert_rq_clean(conn)


def test_priority_order_and_same_key_drain_across_priorities(make_worker):
    worker = make_worker()
    store = worker.store
    low_other_key = submit(store, p2p_payload(steps=5, priority="low"))
    low_same = submit(store, p2p_payload(priority="low"))
    high = submit(store, p2p_payload(priority="high"))
    first = worker.run_once(5.0)
    assert set(first.outcomes) == {high, low_same}  # high first; its key's low queue drained too
    second = worker.run_once(5.0)
    assert set(second.outcomes) == {low_other_key}


def test_metrics_port_serves_worker_histograms(make_worker):
    worker = make_worker(metrics_port=free_port())
    port = worker.start_metrics_server()
    for seed in (1, 2):
        submit(worker.store, p2p_payload(seed=seed, steps=5))
    assert worker.run_once(5.0).size == 2
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for name in ("editserve_queue_wait_seconds_count", "editserve_job_duration_seconds_count",
                 "editserve_batch_size_count", "editserve_denoise_step_seconds_count"):
        value = [line for line in body.splitlines() if line.startswith(name)]
        assert value and float(value[0].split()[-1]) > 0, name
    samples = {(s.name, tuple(sorted(s.labels.items()))) for f in text_string_to_metric_families(body)
               for s in f.samples}
    labels = (("kind", "p2p"), ("model", "tiny-sd"))
    assert ("editserve_jobs_completed_total", (*labels, ("status", "succeeded"))) in samples
    assert ("editserve_queue_wait_seconds_count", labels) in samples
    assert ("editserve_job_duration_seconds_count", labels) in samples
    assert "editserve_jobs_in_progress" in body
    assert ("editserve_batch_size_bucket", (("le", "2.0"), ("model", "tiny-sd"))) in samples


class FlakyRunner:
    """Fails the whole batched call whenever the poisoned job is in it (as a bad job or OOM would)."""

    def __init__(self, poison: str):
        self.poison = poison
        self.calls: list[list[str]] = []

    def run(self, specs, on_step=None):
        ids = [s.job_id for s in specs]
        self.calls.append(ids)
        if self.poison in ids and len(ids) > 2:
            raise RuntimeError("CUDA out of memory")
        if self.poison in ids:
            return [JobResult(job_id=i, error=BatchForwardError("forward failed")) for i in ids]
        return [JobResult(job_id=i, images=[object()]) for i in ids]


def test_a_failed_batch_call_is_retried_in_halves():
    specs = [P2PJobSpec(job_id=f"j{i}", source_prompt="a", target_prompts=["b"], seed=i) for i in range(5)]
    runner = FlakyRunner(poison="j3")
    results = run_with_split(runner, specs, None)
    assert [results[s.job_id].ok for s in specs] == [True, True, True, False, True]
    assert isinstance(results["j3"].error, BatchForwardError)
    assert runner.calls[0] == ["j0", "j1", "j2", "j3", "j4"] and ["j3"] in runner.calls


def test_presumed_dead_worker_that_finishes_completes_the_edit_once(make_worker):
    """Reaped mid-run (heartbeat 'expired'), requeued — then the worker finishes after all: its results win,
    the requeued RQ job is withdrawn by the JobStore, and nobody runs the edit a second time."""
    from worker.runtime.reaper import Reaper

    worker = make_worker(debug_step_delay_seconds=0.2)
    store, conn = worker.store, worker.connection
    edit_id = submit(store, p2p_payload(steps=6))

    def reap_mid_run():
        wait_until(lambda: int(edit_field(conn, edit_id, "progress_step") or 0) >= 1, 30, what="progress")
        for key in conn.scan_iter("rq:wip:*"):
            for member in conn.zrange(key, 0, -1):
                conn.zadd(key, {member: 0})
        assert Reaper(conn, worker.settings, store).run_once().requeued == [edit_id]

    reaper_thread = threading.Thread(target=reap_mid_run)
    reaper_thread.start()
    report = worker.run_once(5.0)
    reaper_thread.join(10)
    assert report.outcomes[edit_id] == "succeeded"
    edit = store.get(edit_id)
    assert edit.status is EditStatus.succeeded and len(edit.results) == 2
    assert worker.run_once(0.3) is None  # the requeued copy is gone
    assert not conn.exists(Job.key_for(edit_id))  # the withdrawn copy leaves no RQ job behind (issue 9, item 8)
    assert_rq_clean(conn)
