"""The webhook sender across Redis outages: the real process (``python -m service.webhooks``) against a real
redis-server with AOF (``devtools.devstack.PersistentRedis``) that is killed and restarted on the same port,
and a loopback receiver. Plus the pieces that make delivery at-least-once without double sends: the
``:done`` mark, ``requeue_job`` and ``recover_stranded``, against the session's Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_lib
from rq import Queue
from rq.registry import ScheduledJobRegistry
from test_webhooks_delivery import (  # noqa: F401 (receiver, redis: fixtures)
    Receiver,
    Reply,
    delivery,
    make_edit,
    make_settings,
    receiver,
    redis,
    state,
    use_settings,
)

from editserve.contract import EditStatus
from editserve.webhooks import verify
from service.webhooks import delivery as wh_delivery
from service.webhooks import emit as wh_emit
from service.webhooks import events as wh_events
from service.webhooks import sender as wh_sender
from devtools.devstack import start_persistent_redis

REPO = Path(__file__).resolve().parent.parent


def wait_for(what: str, predicate, timeout: float = 8.0, process: subprocess.Popen | None = None, log=None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"the sender exited ({process.returncode}) while waiting for {what}:\n{log() if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{log() if log else ''}")
        time.sleep(0.03)


class SenderProcess:
    def __init__(self, redis_url: str, log_path: Path, **env):
        self.log_path = log_path
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "EDITSERVE_REDIS_URL": redis_url,
                    "EDITSERVE_WEBHOOKS__ALLOW_HOSTS": '["127.0.0.1"]', "EDITSERVE_WEBHOOKS__JITTER_RATIO": "0",
                    "EDITSERVE_WEBHOOKS__METRICS_PORT": "0", **env}
        with log_path.open("wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "service.webhooks"], cwd=REPO, env=full_env,
                                            stdout=out, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count(self, text: str) -> int:
        return self.log().count(text)

    def wait_log(self, text: str, count: int, timeout: float = 8.0) -> None:
        wait_for(f"{count}× {text!r} in the sender's log", lambda: self.count(text) >= count, timeout,
                 self.process, self.log)

    def wait(self, what: str, predicate, timeout: float = 8.0):
        return wait_for(what, predicate, timeout, self.process, self.log)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


OUTAGE, BACK = "Redis unavailable", "Redis answers again"


def test_sender_survives_redis_restarts_and_delivers_what_was_pending(tmp_path):
    server = start_persistent_redis(tmp_path / "redis")
    hooks = Receiver()
    sender = SenderProcess(server.url, tmp_path / "sender.log", EDITSERVE_WEBHOOKS__BACKOFF_SECONDS="[1.0]",
                           EDITSERVE_WEBHOOKS__MAX_ATTEMPTS="5", EDITSERVE_WEBHOOKS__TIMEOUT_SECONDS="5")
    settings = make_settings(server.url, backoff_seconds=[1.0], max_attempts=5)
    client = redis_lib.Redis.from_url(server.url)

    def emit(edit_id: str, event: str = "completed") -> None:
        status = EditStatus.succeeded if event == "completed" else EditStatus.processing
        wh_emit.emit(client, make_edit(edit_id, hooks.url(f"/{edit_id}"), status=status), event, "t", settings=settings)

    def delivered(edit_id: str) -> bool:
        return state(client, edit_id).get("delivered") == "1"

    queue = Queue(wh_events.QUEUE_NAME, connection=client)

    def acknowledged() -> bool:
        """Nothing queued, taken or running: RQ has recorded the end of every job."""
        return (queue.count == 0 and client.llen(queue.intermediate_queue_key) == 0
                and client.zcard(queue.started_job_registry.key) == 0)

    def requests(edit_id: str) -> list:
        return [r for r in hooks.requests if r.path == f"/{edit_id}"]

    def outage(*, during=None) -> None:
        """Kill Redis, wait until the sender has noticed, start it again on the same port and data."""
        seen = sender.count(OUTAGE)
        server.stop(signal.SIGKILL)
        sender.wait_log(OUTAGE, seen + 1)
        if during is not None:
            during()
        server.start()
        sender.wait_log(BACK, seen + 1)

    try:
        # 0. up and delivering
        emit("ed0", "started")
        sender.wait("the first delivery", lambda: delivered("ed0") and acknowledged())

        # 1. Redis restarts while the sender idles on the queue; it carries on.
        outage(during=lambda: time.sleep(0.3))  # a few backoff rounds against a closed port
        emit("ed1")
        sender.wait("a delivery after the restart", lambda: delivered("ed1"))

        # 2. Redis dies while an attempt is in flight: the POST gets its 200 but the outcome cannot be recorded.
        #    The attempt is queued again once Redis is back and repeated with the same webhook-id.
        hooks.script = [Reply(200, delay=0.8)]
        emit("ed2")
        sender.wait("the in-flight POST", lambda: requests("ed2"))
        outage()
        sender.wait("the interrupted delivery", lambda: delivered("ed2"))

        # 3. Redis dies while a retry waits in the schedule (first attempt 503, retry 1 s later) and stays down
        #    until the retry is due.
        sender.wait("ed2 acknowledged", acknowledged)
        hooks.script = [Reply(503)]
        emit("ed3")
        sender.wait("the first attempt's outcome", lambda: state(client, "ed3").get("attempts") == "1")
        first_at = requests("ed3")[0].at
        outage(during=lambda: time.sleep(max(0.0, first_at + 1.2 - time.monotonic())))
        sender.wait("the scheduled retry", lambda: delivered("ed3") and acknowledged())
        assert sender.process.poll() is None

        # 4. SIGTERM while Redis is down: the sender stops promptly (and cleanly).
        server.stop(signal.SIGKILL)
        sender.wait_log(OUTAGE, 4)
        sender.process.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert sender.process.wait(5) == 0, sender.log()
        assert time.monotonic() - t0 < 2.0
    finally:
        sender.kill()
        server.stop(signal.SIGKILL)
        hooks.close()

    log = sender.log()
    assert log.count(OUTAGE) == 4 and log.count(BACK) == 3, log  # once per outage, not once per retry
    assert "Traceback" not in log, log
    for edit_id in ("ed0", "ed1", "ed2", "ed3"):
        got = requests(edit_id)
        event = "started" if edit_id == "ed0" else "completed"
        assert {r.headers["webhook-id"] for r in got} == {f"msg_{edit_id}_{event}"}
        for request in got:
            verify(settings.webhooks.secret, request.headers, request.body)  # each attempt freshly signed
    assert [len(requests(e)) for e in ("ed0", "ed1", "ed2", "ed3")] == [1, 1, 2, 2]
    # ed2: sent twice (at-least-once), recorded once; ed3: one failed attempt, one delivered
    assert requests("ed2")[0].body == requests("ed2")[1].body
    server.start()
    try:
        s2, s3 = state(client, "ed2"), state(client, "ed3")
        assert (s2["delivered"], s2["pending"], s2["attempts"], s2.get("failed")) == ("1", "0", "1", None)
        assert (s3["delivered"], s3["pending"], s3["attempts"], s3.get("failed")) == ("1", "0", "2", None)
        assert acknowledged()
        assert ScheduledJobRegistry(wh_events.QUEUE_NAME, connection=client).count == 0
    finally:
        server.stop(signal.SIGKILL)


def test_a_second_signal_stops_at_once_and_requeues_the_attempt(redis, redis_url, receiver, tmp_path):
    """Cold stop mid-POST: RQ alone would file the job as failed (never retried); the sender requeues it."""
    receiver.script = [Reply(200, delay=3.0)]
    receiver.server.handle_error = lambda request, address: None  # its late reply hits a closed socket
    sender = SenderProcess(redis_url, tmp_path / "sender.log")
    try:
        settings = make_settings(redis_url)
        wh_emit.emit(redis, make_edit("ed1", receiver.url(), status=EditStatus.succeeded), "completed", "t",
                settings=settings)
        sender.wait("the POST", lambda: receiver.requests)
        sender.process.send_signal(signal.SIGTERM)
        sender.wait_log("stopping after the attempt in progress", 1)
        sender.process.send_signal(signal.SIGTERM)
        assert sender.process.wait(2) == 1, sender.log()
    finally:
        sender.kill()
    queue = Queue(wh_events.QUEUE_NAME, connection=redis)
    assert queue.count == 1 and queue.failed_job_registry.count == 0 and queue.started_job_registry.count == 0
    assert state(redis).get("pending") == "1" and "delivered" not in state(redis)

    again = SenderProcess(redis_url, tmp_path / "again.log")
    try:
        again.wait("the repeated delivery", lambda: state(redis).get("delivered") == "1")
    finally:
        again.process.send_signal(signal.SIGTERM)
        assert again.process.wait(5) == 0
    assert [r.headers["webhook-id"] for r in receiver.requests] == ["msg_ed1_completed"] * 2


# ---------------------------------------------------------------------------------------------- the pieces

def test_a_job_that_recorded_its_attempt_sends_nothing_when_run_again(redis, redis_url, receiver):
    """A job requeued after its outcome was committed (e.g. Redis died during RQ's acknowledgement)."""
    settings = make_settings(redis_url, max_attempts=3)
    deliverer = wh_delivery.Deliverer(settings, redis)
    receiver.script = [Reply(500)]
    first = deliverer.run(delivery(receiver.url()), job_id="job-1")
    assert first.outcome is wh_events.DeliveryOutcome.retrying
    again = deliverer.run(delivery(receiver.url()), job_id="job-1")
    assert again.outcome is wh_events.DeliveryOutcome.retrying and again.status_code == 500
    assert len(receiver.requests) == 1
    assert ScheduledJobRegistry(wh_events.QUEUE_NAME, connection=redis).count == 1  # one next attempt, not two
    assert state(redis)["attempts"] == "1"

    ok = deliverer.run(delivery(receiver.url(), attempt=2), job_id="job-2")
    assert ok.outcome is wh_events.DeliveryOutcome.delivered
    assert deliverer.run(delivery(receiver.url(), attempt=2), job_id="job-2").outcome is wh_events.DeliveryOutcome.delivered
    assert len(receiver.requests) == 2 and state(redis)["delivered"] == "1"
    done = {k.decode(): json.loads(v) for k, v in redis.hgetall(wh_events.done_key("ed1")).items()}
    assert done["job-1"]["outcome"] == "retrying" and done["job-2"] == {
        "outcome": "delivered", "status": 200, "error": None, "on_edit": True}
    assert 0 < redis.ttl(wh_events.done_key("ed1")) <= settings.webhooks.state_ttl_seconds


def test_an_edit_mirror_missed_in_an_outage_is_completed_by_the_rerun(redis, redis_url, receiver):
    settings = make_settings(redis_url)
    redis.hset("editserve:edit:ed1", mapping={"tenant": "default", "status": "succeeded"})
    deliverer = wh_delivery.Deliverer(settings, redis)
    # as left by a run whose attempt was recorded but whose edit mirror was cut off
    redis.hset(wh_events.done_key("ed1"), "job-1", json.dumps({"outcome": "delivered", "status": 200, "error": None,
                                                        "on_edit": False}))
    assert deliverer.run(delivery(receiver.url()), job_id="job-1").outcome is wh_events.DeliveryOutcome.delivered
    assert receiver.requests == [] and redis.hget("editserve:edit:ed1", "webhook_delivered") == b"1"
    deliverer.run(delivery(receiver.url()), job_id="job-1")
    assert redis.hget("editserve:edit:ed1", "webhook_delivered") == b"1"  # mirrored once


def _take(redis) -> tuple:
    """What a sender does before running a job: take it (→ :intermediate) and start it (→ StartedJobRegistry)."""
    from rq import SimpleWorker

    queue = Queue(wh_events.QUEUE_NAME, connection=redis)
    job, _ = Queue.dequeue_any([queue], None, connection=redis)
    worker = SimpleWorker([queue], connection=redis, prepare_for_work=False)
    execution = worker.prepare_execution(job)
    return queue, job, execution


def test_recover_stranded_requeues_what_a_dead_sender_left(redis, redis_url, receiver, monkeypatch):
    settings = make_settings(redis_url)
    use_settings(monkeypatch, settings)
    wh_events.enqueue_delivery(redis, delivery(receiver.url(), "ed1"), settings.webhooks)
    wh_events.enqueue_delivery(redis, delivery(receiver.url(), "ed2"), settings.webhooks)
    queue, started_job, execution = _take(redis)  # started, then its sender was SIGKILLed
    claimed, _ = Queue.dequeue_any([queue], None, connection=redis)  # taken, never started
    assert queue.count == 0

    assert wh_sender.recover_stranded(redis) == []  # nothing expired yet; the claim is only first seen
    later = time.time() + 10_000
    assert wh_sender.recover_stranded(redis, now=later, grace_seconds=60) == [started_job.id, claimed.id]
    assert wh_sender.recover_stranded(redis, now=later, grace_seconds=60) == []
    assert queue.get_job_ids() == [claimed.id, started_job.id]
    assert queue.started_job_registry.count == 0 and redis.llen(queue.intermediate_queue_key) == 0
    assert not redis.exists(execution.key)
    assert queue.fetch_job(started_job.id).get_status() == "queued"

    from rq import SimpleWorker

    SimpleWorker([queue], connection=redis).work(burst=True)
    assert sorted(r.headers["webhook-id"] for r in receiver.requests) == ["msg_ed1_completed", "msg_ed2_completed"]


def test_requeue_job_pushes_once_and_never_an_acknowledged_job(redis, redis_url, receiver):
    settings = make_settings(redis_url)
    wh_events.enqueue_delivery(redis, delivery(receiver.url()), settings.webhooks)
    queue, job, execution = _take(redis)
    redis.lrem(queue.intermediate_queue_key, 0, job.id)  # as RQ's prepare_job_execution does
    entries = [execution.composite_key]
    assert wh_sender.requeue_job(redis, job.id, entries) is True  # e.g. the interrupted sender itself
    assert wh_sender.requeue_job(redis, job.id, entries) is False  # e.g. another sender's sweep, a moment later
    assert queue.get_job_ids() == [job.id]
    assert wh_sender.requeue_job(redis, "no-such-job") is False and queue.count == 1


def test_backoff_doubles_to_the_cap_with_jitter():
    backoff = wh_sender.Backoff(first=0.1, cap=5.0, rand=lambda: 1.0)
    assert [round(backoff.next(), 3) for _ in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    backoff.reset()
    assert wh_sender.Backoff(rand=lambda: 0.0).next() == pytest.approx(0.05)  # never below half the step
    assert backoff.next() == pytest.approx(0.1)
