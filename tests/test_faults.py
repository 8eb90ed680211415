"""Fault injection with real processes: Redis restarts (AOF), S3 outages during uploads, a job's worker killed
twice. Each test checks what a client sees through the API — one terminal state, no partial results.

What the other suites already cover and this one does not repeat: one SIGKILL mid-batch → success on the
second attempt (test_worker_process, test_e2e); the reaper's retry limit with simulated crashes
(test_worker_reaper); Storage retrying against a dead endpoint in-process (test_storage).
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import httpx
import pytest
import redis
from rq.job import Job, JobStatus

from editserve import Client, EditStatus
from service.config import S3Settings, Settings, WorkerSettings
from devtools.devstack import LocalStack, start_persistent_redis
from devtools.faultproxy import HttpFaultProxy
from service.jobstore import JobStore
from service.keys import edit_key
from worker_support import EventCounter, wait_until

pytestmark = pytest.mark.e2e
SIZE, STEPS = 64, 4
FAST = {"EDITSERVE_WORKER__HEARTBEAT_TTL_SECONDS": "5", "EDITSERVE_WORKER__REAPER_INTERVAL_SECONDS": "1",
        "EDITSERVE_WORKER__TORCH_THREADS": "1", "EDITSERVE_WORKER__MAX_BATCH_WAIT_MS": "50"}


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def aof_redis():
    server = start_persistent_redis()
    yield server
    server.stop(signal.SIGKILL)
    shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(aof_redis, s3_server, tiny_models):
    """A gateway on a private AOF Redis; each test starts the workers it needs."""
    s = LocalStack(redis_url=aof_redis.url, s3=s3_server, models_dir=tiny_models["tiny-sd"].parent,
                   extra_env={"EDITSERVE_WORKER__METRICS_PORT": "0"})
    s.start_gateway()
    yield s
    s.stop(timeout=10)


@pytest.fixture
def conn(aof_redis, stack):
    c = redis.Redis.from_url(aof_redis.url)
    c.flushdb()
    yield c
    for name in [n for n in stack.processes if n != "gateway"]:  # every worker a test started
        proc = stack.processes[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)
        stack.stop(name, sig=signal.SIGKILL, timeout=10)
        del stack.processes[name]


@pytest.fixture
def client(stack):
    with Client(stack.base_url, timeout=30, retries=4) as c:
        yield c


# ------------------------------------------------------------------------------------------------ helpers

def submit(client: Client, seed: int, steps: int = STEPS):
    return client.submit_p2p("a photo of a cat", ["a photo of a dog"], edit="replace", steps=steps, height=SIZE,
                             width=SIZE, seed=seed)


def start_worker(stack: LocalStack, name: str, **env: str):
    proc = stack.start_worker(name, models="tiny-sd", env={**FAST, **env})
    return proc


def wait_started(stack: LocalStack, *names: str, timeout: float = 120) -> None:
    def up_or_dead(name: str) -> bool:
        return ('"event":"worker_started"' in stack.log(name).read_text(errors="replace")
                or stack.processes[name].poll() is not None)

    for name in names:
        wait_until(lambda n=name: up_or_dead(n), timeout, what=f"{name} start")
        assert stack.processes[name].poll() is None, stack.log(name).read_text()[-3000:]


def field(conn: redis.Redis, edit_id: str, name: str) -> str | None:
    raw = conn.hget(edit_key(edit_id), name)
    return raw.decode() if raw is not None else None


def running_attempt(conn: redis.Redis, edit_id: str, attempt: int) -> bool:
    """The edit is processing its ``attempt``-th attempt and has made at least one denoising step."""
    return (field(conn, edit_id, "status") == "processing" and field(conn, edit_id, "attempts") == str(attempt)
            and int(field(conn, edit_id, "progress_step") or 0) >= 1)


def rq_settles(conn: redis.Redis, edit_id: str, status: JobStatus) -> None:
    """The RQ job reaches ``status``: the worker writes the edit's terminal status first, RQ's own finish
    bookkeeping a few milliseconds later (by design: a crash in between leaves only a stale entry)."""
    wait_until(lambda: Job.fetch(edit_id, connection=conn).get_status() == status, 10,
               what=f"RQ job {edit_id} → {status}")


def sigkill(stack: LocalStack, name: str) -> None:
    proc = stack.processes[name]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


# ------------------------------------------------------------------------------------------------ (a) Redis

def test_accepted_jobs_survive_a_redis_crash_with_aof(stack, aof_redis, conn, client):
    edits = [submit(client, seed) for seed in (1, 2, 3)]
    assert {e.status for e in edits} == {EditStatus.queued}
    queue = field(conn, edits[0].id, "queue")
    assert conn.llen(f"rq:queue:{queue}") == 3

    aof_redis.restart(signal.SIGKILL)  # a crash, not a clean shutdown: only the AOF brings them back

    assert sorted(m.decode() for m in conn.lrange(f"rq:queue:{queue}", 0, -1)) == sorted(e.id for e in edits)
    assert {client.get(e.id).status for e in edits} == {EditStatus.queued}  # the gateway reconnected
    start_worker(stack, "after-crash")
    done = [client.wait(e.id, timeout=120, progress=False) for e in edits]
    assert {d.status for d in done} == {EditStatus.succeeded}
    assert {d.metrics.attempts for d in done} == {1}
    assert all(len(d.results) == 2 for d in done)
    for e in edits:
        rq_settles(conn, e.id, JobStatus.FINISHED)


# ------------------------------------------------------------------------------------------------ (b) S3

@pytest.fixture
def s3_proxy(s3_server):
    proxy = HttpFaultProxy(s3_server.endpoint_url)
    yield proxy
    proxy.close()


def object_keys(s3_server, edit_id: str) -> list[str]:
    listing = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=f"edits/{edit_id}/")
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_s3_outage_uploads_retry_with_backoff_then_fail_cleanly_or_succeed_within_the_window(
        stack, s3_server, s3_proxy, conn, client):
    events = EventCounter(redis.Redis.from_url(stack.redis_url))
    start_worker(stack, "uploader", EDITSERVE_S3__ENDPOINT_URL=s3_proxy.url, EDITSERVE_S3__MAX_ATTEMPTS="3",
                 EDITSERVE_WORKER__RESULT_UPLOAD_WINDOW_SECONDS="0")  # the storage client's retries alone here
    wait_started(stack, "uploader")

    # 1. S3 unreachable for longer than the retry window: output-1 never gets through
    s3_proxy.fault = lambda method, path, n: ("drop" if method == "PUT"
                                              and path.split("?")[0].endswith("/output-1-target-1.png") else None)
    doomed = submit(client, seed=1)
    final = wait_until(lambda: (e := client.get(doomed.id)).status.terminal and e, 90, what="the doomed edit to end")
    assert final.status is EditStatus.failed
    assert final.error.type == "storage_error"
    assert "output-1-target-1.png" in final.error.message and "after 3 attempt" in final.error.message
    assert final.results == [] and final.attention_maps == []  # no result URLs, partial or not
    attempts = s3_proxy.requests("PUT", f"{doomed.id}/output-1-target-1.png")
    assert [outcome for _, outcome in attempts] == ["dropped"] * 3
    # botocore's standard retry mode made the 3 attempts (its backoff is jittered: no timing to assert)
    # what did reach S3 (output-0) is referenced nowhere: the record holds no results at all
    assert json.loads(field(conn, doomed.id, "results") or "[]") == []
    assert set(object_keys(s3_server, doomed.id)) <= {f"edits/{doomed.id}/output-0-source.png"}
    rq_settles(conn, doomed.id, JobStatus.FAILED)

    # 2. an outage shorter than the retry window: the first two PUTs die, the third goes through
    first = len(s3_proxy.log)
    s3_proxy.fault = lambda method, path, n: "drop" if method == "PUT" and n < first + 2 else None
    lucky = submit(client, seed=2)
    done = client.wait(lucky.id, timeout=90, progress=False)
    assert done.status is EditStatus.succeeded and len(done.results) == 2
    assert [o for _, o in s3_proxy.requests("PUT", f"{lucky.id}/output-0-source.png")] == ["dropped", "dropped", "200"]
    for result in done.results:
        image = httpx.get(result.url, timeout=10)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert object_keys(s3_server, lucky.id) == [f"edits/{lucky.id}/output-0-source.png",
                                                f"edits/{lucky.id}/output-1-target-1.png"]

    events.close()
    assert events.of(doomed.id) == ["failed"] and events.of(lucky.id) == ["succeeded"]


# ------------------------------------------------------------------------------------------------ (c) SIGKILL

def kill_while_running(stack, conn, edit_id: str, name: str, attempt: int) -> None:
    wait_until(lambda: running_attempt(conn, edit_id, attempt), 90,
               what=lambda: f"attempt {attempt} on {name}; log:\n{stack.log(name).read_text()[-2000:]}")
    assert field(conn, edit_id, "worker").startswith(name)
    sigkill(stack, name)


def test_worker_killed_twice_the_job_succeeds_on_its_third_attempt(stack, conn, client):
    """max_retries 2: two crashes are tolerated. Spare workers wait frozen (SIGSTOP), models loaded, so each
    hand-over measures detection (heartbeat TTL 5 s), not start-up."""
    names = ["first", "second", "third"]
    for name in names:
        start_worker(stack, name, EDITSERVE_WORKER__MAX_RETRIES="2", EDITSERVE_WORKER__DEBUG_STEP_DELAY_SECONDS="0.3")
    wait_started(stack, *names)
    for name in names[1:]:
        os.killpg(stack.processes[name].pid, signal.SIGSTOP)
    events = EventCounter(redis.Redis.from_url(stack.redis_url))
    edit = submit(client, seed=7, steps=8)

    kill_while_running(stack, conn, edit.id, "first", attempt=1)
    os.killpg(stack.processes["second"].pid, signal.SIGCONT)
    kill_while_running(stack, conn, edit.id, "second", attempt=2)
    os.killpg(stack.processes["third"].pid, signal.SIGCONT)
    done = client.wait(edit.id, timeout=90, progress=False)

    assert done.status is EditStatus.succeeded and done.metrics.attempts == 3 and len(done.results) == 2
    assert field(conn, edit.id, "worker").startswith("third")
    assert "second" in field(conn, edit.id, "requeue_reason")
    events.close()
    assert events.of(edit.id) == ["succeeded"]  # exactly one terminal state
    rq_settles(conn, edit.id, JobStatus.FINISHED)


def test_worker_killed_until_retries_are_exhausted_fails_with_worker_crashed(stack, aof_redis, conn, client,
                                                                              s3_server):
    """max_retries 1: the second crash is the last; the reaper fails the edit with a clear error."""
    names = ["doomed-1", "doomed-2"]
    for name in names:
        start_worker(stack, name, EDITSERVE_WORKER__MAX_RETRIES="1", EDITSERVE_WORKER__DEBUG_STEP_DELAY_SECONDS="0.3")
    wait_started(stack, *names)
    os.killpg(stack.processes["doomed-2"].pid, signal.SIGSTOP)
    events = EventCounter(redis.Redis.from_url(stack.redis_url))
    edit = submit(client, seed=8, steps=8)

    kill_while_running(stack, conn, edit.id, "doomed-1", attempt=1)
    os.killpg(stack.processes["doomed-2"].pid, signal.SIGCONT)
    kill_while_running(stack, conn, edit.id, "doomed-2", attempt=2)

    # no worker is left: a reaper pass (here in-process, same settings) finds the expired heartbeat
    from worker.runtime.reaper import Reaper

    s3 = S3Settings(endpoint_url=s3_server.endpoint_url, access_key_id=s3_server.access_key,
                    secret_access_key=s3_server.secret_key, bucket=s3_server.bucket)
    settings = Settings(redis_url=aof_redis.url, s3=s3, worker=WorkerSettings(max_retries=1, heartbeat_ttl_seconds=5))
    reaper = Reaper(conn, settings, JobStore(conn, settings))
    wait_until(lambda: reaper.run_once().failed == [edit.id], 30, what="the reaper to give up", interval=0.5)

    final = client.get(edit.id)
    assert final.status is EditStatus.failed and final.metrics.attempts == 2
    assert final.error.type == "worker_crashed"
    assert "crashed 2 times" in final.error.message and "doomed-2" in final.error.message
    assert final.results == []
    assert reaper.run_once().failed == []  # settled: a second pass changes nothing
    events.close()
    assert events.of(edit.id) == ["failed"]
    assert Job.fetch(edit.id, connection=conn).get_status() == JobStatus.FAILED
    assert conn.llen(f"rq:queue:{field(conn, edit.id, 'queue')}") == 0
