"""The worker under hostile conditions, on a real Redis and S3 endpoint with the tiny models (issue 9):
a step longer than the heartbeat TTL is not run twice (item 5); canceled edits leave no key that never
expires (item 8, its canceled-job part); the queues a worker polls are bounded (item 9); a finished result
outlasts a storage outage longer than the storage client's retries (item 10)."""

from __future__ import annotations

import itertools
import json
import threading
import time
from urllib.parse import urlsplit

import pytest
import redis
from devtools.faultproxy import TcpProxy
from worker_support import EventCounter, edit_field, make_settings, p2p_payload, started_entries, submit, wait_until

from service.jobstore import JobStore
from service.storage import Storage
from worker.runtime.batching import QueueClaimer
from worker.runtime.reaper import Reaper
from worker.runtime.worker import EditWorker


class ReaperLoop:
    """Another worker's reaper, passing every 0.2 s: it re-runs any job whose heartbeat lapsed."""

    def __init__(self, conn: redis.Redis, settings):
        self.reaper = Reaper(conn, settings)
        self.requeued: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.requeued += self.reaper.run_once().requeued

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_step_longer_than_the_heartbeat_ttl_is_not_run_twice(redis_url, s3_server, worker_registry):
    """One denoising step of 7 s against a 5 s TTL, a reaper passing every 0.2 s: the heartbeat thread keeps the
    job alive, so the job runs once (the old code renewed only between steps and the reaper re-ran it)."""
    settings = make_settings(redis_url, s3_server, heartbeat_ttl_seconds=5, heartbeat_interval_seconds=0.5,
                             debug_step_delay_seconds=7.0, reaper_interval_seconds=0.2)
    conn = redis.Redis.from_url(redis_url)
    store = JobStore(conn, settings)
    edit_id = submit(store, p2p_payload(steps=1))
    worker = EditWorker(settings, ["tiny-sd"], "long-step", registry=worker_registry)
    worker.bridge.register()
    events = EventCounter(conn)
    reaper = ReaperLoop(conn, settings)
    try:
        report = worker.run_once(timeout=10)
    finally:
        reaper.stop()
        worker.finisher.close()
        worker.bridge.unregister()
    try:
        assert report is not None and report.outcomes == {edit_id: "succeeded"}, report
        assert reaper.requeued == []
        assert edit_field(conn, edit_id, "status") == "succeeded"
        assert edit_field(conn, edit_id, "attempts") == "1"
        wait_until(lambda: events.of(edit_id) == ["succeeded"], 5, what=lambda: str(events.seen))
    finally:
        events.close()


def test_a_hung_batch_stops_renewing_so_the_reaper_recovers_it(redis_url, s3_server, worker_registry):
    """The heartbeat thread renews only while the batch makes progress: with ``hung_batch_seconds`` shorter
    than the step, the heartbeats lapse and another worker's reaper re-runs the job (a hung GPU call)."""
    settings = make_settings(redis_url, s3_server, heartbeat_ttl_seconds=5, heartbeat_interval_seconds=0.5,
                             debug_step_delay_seconds=7.0, hung_batch_seconds=1.0, max_retries=2)
    conn = redis.Redis.from_url(redis_url)
    store = JobStore(conn, settings)
    edit_id = submit(store, p2p_payload(steps=1))
    worker = EditWorker(settings, ["tiny-sd"], "hung", registry=worker_registry)
    worker.bridge.register()
    reaper = ReaperLoop(conn, settings)
    try:
        worker.run_once(timeout=10)
    finally:
        reaper.stop()
        worker.finisher.close()
        worker.bridge.unregister()
    assert reaper.requeued == [edit_id]  # its heartbeats lapsed while the (simulated) GPU call hung


def test_a_finished_result_outlasts_a_storage_outage_longer_than_the_retry_budget(redis_url, s3_server, s3,
                                                                                  worker_registry):
    """S3 is unreachable for ~7 s, the storage client gives up after ~0.03 s and the TTL is 5 s: the result
    is kept and retried, the edit stays ``processing`` with live heartbeats, then succeeds once S3 is back."""
    target = urlsplit(s3_server.endpoint_url)
    proxy = TcpProxy(target.hostname, target.port)
    settings = make_settings(redis_url, s3_server, heartbeat_ttl_seconds=5, heartbeat_interval_seconds=0.5,
                             result_upload_window_seconds=60)
    settings.s3.endpoint_url = f"http://{proxy.address}"
    settings.s3.max_attempts = 2
    conn = redis.Redis.from_url(redis_url)
    store = JobStore(conn, settings)
    edit_id = submit(store, p2p_payload(steps=2))
    worker = EditWorker(settings, ["tiny-sd"], "outage", registry=worker_registry)
    worker.bridge.register()
    proxy.down()
    reports = []
    runner = threading.Thread(target=lambda: reports.append(worker.run_once(timeout=10)))
    runner.start()
    try:
        wait_until(lambda: edit_field(conn, edit_id, "status") == "processing", 30)
        outage_ends = time.monotonic() + 7
        while time.monotonic() < outage_ends:
            assert edit_field(conn, edit_id, "status") == "processing"
            scores = [conn.zscore(key, member) for key in conn.scan_iter("rq:wip:*")
                      for member in conn.zrange(key, 0, -1)]
            assert scores and min(scores) > time.time(), "a heartbeat lapsed during the outage"
            time.sleep(0.25)
        proxy.up()
        runner.join(60)
    finally:
        proxy.close()
        worker.finisher.close()
        worker.bridge.unregister()
    assert reports and reports[0] is not None and reports[0].outcomes == {edit_id: "succeeded"}, reports
    assert edit_field(conn, edit_id, "status") == "succeeded"
    assert started_entries(conn) == []
    key = json.loads(edit_field(conn, edit_id, "results"))[0]["key"]
    data = Storage(make_settings(redis_url, s3_server).s3).get_bytes(key)
    assert data.startswith(b"\x89PNG")


def test_a_result_is_failed_once_the_outage_outlasts_the_window(redis_url, s3_server, s3, worker_registry):
    target = urlsplit(s3_server.endpoint_url)
    proxy = TcpProxy(target.hostname, target.port)
    settings = make_settings(redis_url, s3_server, result_upload_window_seconds=1.0)
    settings.s3.endpoint_url = f"http://{proxy.address}"
    settings.s3.max_attempts = 1
    conn = redis.Redis.from_url(redis_url)
    edit_id = submit(JobStore(conn, settings), p2p_payload(steps=2))
    worker = EditWorker(settings, ["tiny-sd"], "outage-too-long", registry=worker_registry)
    worker.bridge.register()
    proxy.down()
    try:
        report = worker.run_once(timeout=10)
    finally:
        proxy.close()
        worker.finisher.close()
        worker.bridge.unregister()
    assert report.outcomes == {edit_id: "failed"}
    assert edit_field(conn, edit_id, "status") == "failed"


pytestmark = pytest.mark.timeout(120)


def _keys_without_ttl(conn: redis.Redis, pattern: str) -> list[bytes]:
    return [k for k in conn.scan_iter(pattern) if conn.ttl(k) == -1]


def test_canceled_edits_leave_no_rq_key_that_never_expires(redis_url, s3_server, worker_registry):
    """Item 8, its measured leak: queued edits canceled by their client, and a running one canceled mid-run.
    RQ gave a canceled job's hash no TTL and never cleaned its CanceledJobRegistry; here the queued ones leave
    nothing, the running one expires like a finished job, and the reaper empties the canceled registry."""
    settings = make_settings(redis_url, s3_server, result_ttl_seconds=60, debug_step_delay_seconds=0.3)
    conn = redis.Redis.from_url(redis_url)
    store = JobStore(conn, settings)
    queued = [submit(store, p2p_payload(steps=2, seed=i)) for i in range(20)]
    for edit_id in queued:
        store.request_cancel(edit_id, "tests")
    assert [edit_field(conn, i, "status") for i in queued] == ["canceled"] * 20
    assert not any(conn.exists(f"rq:job:{i}") for i in queued)
    assert [k for k in conn.scan_iter("rq:canceled:*") if conn.zcard(k)] == []

    running = submit(store, p2p_payload(steps=8))
    worker = EditWorker(settings, ["tiny-sd"], "cancel-mid-run", registry=worker_registry)
    worker.bridge.register()
    runner = threading.Thread(target=lambda: worker.run_once(timeout=10))
    runner.start()
    try:
        wait_until(lambda: edit_field(conn, running, "status") == "processing", 30)
        store.request_cancel(running, "tests")
        runner.join(60)
    finally:
        worker.finisher.close()
        worker.bridge.unregister()
    assert edit_field(conn, running, "status") == "canceled"
    assert 0 < conn.ttl(f"rq:job:{running}") <= 60
    entries = [(k, s) for k in conn.scan_iter("rq:canceled:*") for _, s in conn.zrange(k, 0, -1, withscores=True)]
    assert entries and all(score <= time.time() + 60 for _, score in entries)  # scored by expiry: reaped then

    # what RQ itself leaves (and this code left before): an entry scored with the time it was added, and a
    # job hash without TTL; the reaper's next pass removes the entry and gives the hash the result TTL
    from rq import Queue
    from rq.registry import CanceledJobRegistry

    (registry_key, _), = entries
    queue_name = registry_key.decode().removeprefix("rq:canceled:")
    legacy = Queue(queue_name, connection=conn).enqueue_call("builtins.print", job_id="legacycanceled")
    legacy.cancel()
    assert conn.ttl(legacy.key) == -1
    conn.zadd(registry_key, {running: time.time() - 1})  # as if it had expired
    Reaper(conn, settings).run_once()
    assert conn.zcard(registry_key) == 0
    assert _keys_without_ttl(conn, "rq:job:*") == []
    assert CanceledJobRegistry(queue_name, connection=conn).count == 0


def test_the_queues_a_worker_polls_are_bounded_whatever_clients_send(redis_url, s3_server, worker_registry):
    """Item 9: 24 different batch keys (sizes x steps) at 3 priorities make 3 queues for the model, not 72;
    the worker still batches only compatible jobs, gathering them out of the shared queue in order."""
    settings = make_settings(redis_url, s3_server, max_batch_size=8, max_batch_wait_ms=50)
    conn = redis.Redis.from_url(redis_url)
    store = JobStore(conn, settings)
    for i, (size, steps) in enumerate(itertools.product((64, 128, 192, 256), (1, 2, 3, 4, 5, 6))):
        submit(store, p2p_payload(size=size, steps=steps, priority=("high", "normal", "low")[i % 3]))
    edit_queues = [k for k in conn.scan_iter("rq:queue:edits.*") if not k.endswith(b":intermediate")]
    assert len(edit_queues) == 3, edit_queues
    assert len([m for m in conn.smembers("rq:queues") if m.startswith(b"rq:queue:edits.")]) == 3
    assert len(QueueClaimer(conn, ["tiny-sd"]).queue_names()) == 3

    conn.flushdb()
    # interleaved in one queue: A B A B A (A: 64 px 2 steps; B: 64 px 3 steps)
    a = [submit(store, p2p_payload(steps=2, seed=i)) for i in range(3)]
    b = [submit(store, p2p_payload(steps=3, seed=i)) for i in range(2)]
    order = [a[0], b[0], a[1], b[1], a[2]]
    queue = next(k for k in conn.scan_iter("rq:queue:edits.*") if not k.endswith(b":intermediate"))
    conn.delete(queue)
    conn.rpush(queue, *order)
    worker = EditWorker(settings, ["tiny-sd"], "bounded-queues", registry=worker_registry)
    worker.bridge.register()
    try:
        first = worker.run_once(timeout=10)
        second = worker.run_once(timeout=10)
    finally:
        worker.finisher.close()
        worker.bridge.unregister()
    assert set(first.outcomes) == set(a) and set(first.outcomes.values()) == {"succeeded"}
    assert set(second.outcomes) == set(b) and set(second.outcomes.values()) == {"succeeded"}
