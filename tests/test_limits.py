"""Per-tenant limits and fair share (service.limits) against a real Redis: rate, queued, global depth,
release on every terminal transition, held edits, the repair sweep, overrides by API and CLI."""

from __future__ import annotations

import threading

import pytest
import redis
from fastapi.testclient import TestClient
from gateway_support import make_settings, p2p_payload
from rq.job import Job

from editserve.contract import EditStatus, ErrorInfo, JobPayload
from service import metrics
from service.liveness import beat
from service.app import create_app
from service.jobstore import JobStore, new_edit_id
from service.keys import GLOBAL_QUEUED_KEY, edit_key, held_key, queued_key, released_key
from service.limits import LimitExceeded, TenantLimitOverrides, tenant_limits, write_overrides
from service.queues import discover, queue_names_by_priority, rq_queue_key

P2P = {"kind": "p2p", "source_prompt": "a cat riding a bike", "target_prompts": ["a dog riding a bike"], "steps": 4}
ADMIN = {"Authorization": "Bearer admin-secret-token"}


@pytest.fixture
def conn(redis_url):
    return redis.Redis.from_url(redis_url)


def store_with(redis_url, conn, **limits) -> JobStore:
    return JobStore(conn, make_settings(redis_url, limits=limits))


def create(js: JobStore, tenant: str = "default", **kw) -> str:
    edit, created = js.create(p2p_payload(new_edit_id(), tenant, **kw), webhook=None, idempotency_key=None)
    assert created
    return edit.id


def take_one(conn) -> str | None:
    """What a worker does before the GPU: take the first id of the highest-priority edit queue."""
    for name in queue_names_by_priority(discover(conn)):
        raw = conn.lpop(rq_queue_key(name))
        if raw:
            return raw.decode()
    return None


def in_rq_queue(conn, edit_id: str) -> bool:
    return any(conn.lpos(rq_queue_key(n), edit_id) is not None for n in queue_names_by_priority(discover(conn)))


def status(js: JobStore, edit_id: str) -> str:
    return js.get(edit_id).status.value


def counts(conn, tenant: str = "default") -> tuple[int, int, int]:
    held = sum(conn.llen(held_key(tenant, p)) for p in ("high", "normal", "low"))
    return conn.scard(queued_key(tenant)), conn.scard(released_key(tenant)), held


def rejections(reason: str) -> float:
    return metrics.rejections_total.labels(reason=reason)._value.get()


def gateway(redis_url, s3, **limits):
    app = create_app(make_settings(redis_url, s3, limits=limits, auth={"admin_token": "admin-secret-token"}),
                     prepare_bucket=False)
    return app, TestClient(app)


def key_for(app, tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {app.state.services.keys.create_key(tenant).key}"}


# ---------------------------------------------------------------------------------------------- rate limit

def test_rate_limit_is_429_with_retry_after_naming_the_limit(redis_url, s3):
    # 100 s per request: no refill can happen while the test runs, however loaded the box
    app, client = gateway(redis_url, s3, tenant_rps=0.01, tenant_burst=3)
    acme, globex = key_for(app, "acme"), key_for(app, "globex")
    before = rejections("rate_limited")
    assert [client.get("/v1/edits", headers=acme).status_code for _ in range(3)] == [200, 200, 200]
    refused = client.get("/v1/edits", headers=acme)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 100  # one request per 100 s
    error = refused.json()["error"]
    assert error["type"] == "rate_limited" and "tenant_rps" in error["message"] and "acme" in error["message"]
    assert client.post("/v1/edits", json=P2P, headers=acme).status_code == 429  # every /v1 route counts
    assert client.get("/v1/edits", headers=globex).status_code == 200  # one bucket per tenant
    assert client.get("/v1/admin/keys", headers=ADMIN).status_code == 200  # admin is not a tenant
    assert rejections("rate_limited") == before + 2
    assert 'editserve_rejections_total{reason="rate_limited"}' in client.get("/metrics").text


# Refill over time: tests/test_rate_limit_clock.py drives the limiter's clock instead of sleeping.


def test_overrides_by_admin_api_change_a_single_tenant(redis_url, s3):
    app, client = gateway(redis_url, s3, tenant_rps=0.1, tenant_burst=1)
    acme = key_for(app, "acme")
    put = client.put("/v1/admin/tenants/acme/limits", json={"rps": 0, "max_concurrent": 3}, headers=ADMIN)
    assert put.status_code == 200, put.text
    body = put.json()
    assert (body["rps"], body["burst"], body["max_concurrent"]) == (0, 1, 3)
    assert body["overrides"] == {"rps": 0, "burst": None, "max_queued": None, "max_concurrent": 3}
    assert all(client.get("/v1/edits", headers=acme).status_code == 200 for _ in range(5))  # 0 = unlimited
    got = client.get("/v1/admin/tenants/acme/limits", headers=ADMIN).json()
    assert got["max_concurrent"] == 3 and got["max_queued"] == app.state.services.settings.limits.tenant_max_queued
    assert client.put("/v1/admin/tenants/acme/limits", json={}, headers=ADMIN).json()["rps"] == 0.1  # back
    bad = client.put("/v1/admin/tenants/acme/limits", json={"rps": -1}, headers=ADMIN)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "rps"
    bad_name = client.get("/v1/admin/tenants/no%20spaces/limits", headers=ADMIN)
    assert bad_name.status_code == 422 and bad_name.json()["error"]["field"] == "tenant"
    assert client.get("/v1/admin/tenants/acme/limits", headers=acme).status_code == 401


# ---------------------------------------------------------------------------------------------- queue limits

def test_tenant_max_queued_is_429_and_frees_when_an_edit_leaves_the_queue(redis_url, s3, conn):
    app, client = gateway(redis_url, s3, tenant_max_queued=2)
    acme, globex = key_for(app, "acme"), key_for(app, "globex")
    first = client.post("/v1/edits", json=P2P, headers=acme).json()
    assert client.post("/v1/edits", json=P2P, headers=acme).status_code == 202
    before = rejections("tenant_queue_full")
    refused = client.post("/v1/edits", json=P2P, headers=acme)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "tenant_queue_full"
    assert "tenant_max_queued" in refused.json()["error"]["message"]
    assert rejections("tenant_queue_full") == before + 1
    assert client.post("/v1/edits", json=P2P, headers=globex).status_code == 202
    assert len(list(conn.scan_iter("editserve:edit:*"))) == 3 and len(list(conn.scan_iter("rq:job:*"))) == 3
    store = app.state.services.jobstore
    store.mark_processing(first["id"], batch_id="b", batch_size=1, worker="w")  # started: no longer queued
    assert client.post("/v1/edits", json=P2P, headers=acme).status_code == 202


def test_global_depth_is_503_and_counts_held_edits_of_every_tenant(redis_url, conn):
    js = store_with(redis_url, conn, max_queue_depth=3, tenant_max_concurrent=1)
    create(js, "acme")
    create(js, "acme")  # held: still counts
    create(js, "globex")
    with pytest.raises(LimitExceeded) as refused:
        create(js, "initech")
    assert (refused.value.status, refused.value.type, refused.value.limit) == (503, "queue_full", "max_queue_depth")
    assert refused.value.retry_after >= 1
    assert conn.scard(GLOBAL_QUEUED_KEY) == 3 and not list(conn.scan_iter("editserve:tenant:initech:edits"))
    assert "editserve_queued_edits 3.0" in metrics.render(conn)[0].decode()


def test_admission_is_atomic_under_concurrency(redis_url, conn):
    js = store_with(redis_url, conn, tenant_max_queued=5, tenant_max_concurrent=2)
    outcomes: list[str] = []
    barrier = threading.Barrier(16)

    def submit():
        barrier.wait()
        try:
            create(JobStore(redis.Redis.from_url(redis_url), js.settings))
            outcomes.append("created")
        except LimitExceeded as exc:
            outcomes.append(exc.type)

    threads = [threading.Thread(target=submit) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["created"] * 5 + ["tenant_queue_full"] * 11
    assert counts(conn) == (5, 2, 3)
    assert len(list(conn.scan_iter("rq:job:*"))) == 5, "a refused edit left its staged RQ job behind"


def test_idempotency_key_can_be_retried_after_a_refusal(redis_url, conn):
    js = store_with(redis_url, conn, tenant_max_queued=1)
    create(js)
    payload = p2p_payload(new_edit_id())
    with pytest.raises(LimitExceeded):
        js.create(payload, webhook=None, idempotency_key="retry-me")
    js.mark_canceled(js.list("default").data[0].id)
    edit, created = js.create(p2p_payload(new_edit_id()), webhook=None, idempotency_key="retry-me")
    assert created and edit.status is EditStatus.queued


# ---------------------------------------------------------------------------------------------- fair share

def run_fake_worker(conn, js: JobStore) -> list[str]:
    """Drain the edit queues one job at a time, each finishing before the next starts; tenants in start order."""
    started = []
    while (edit_id := take_one(conn)) is not None:
        assert js.mark_processing(edit_id, batch_id="b", batch_size=1, worker="fake")
        started.append(js.tenant_of(edit_id))
        js.mark_succeeded(edit_id, results=[], attention_maps=[], run_seconds=0.01)
    return started


@pytest.mark.parametrize("max_concurrent,b_starts_early", [(4, True), (1000, False)])
def test_a_burst_of_one_tenant_does_not_starve_another(redis_url, conn, max_concurrent, b_starts_early):
    js = store_with(redis_url, conn, tenant_max_concurrent=max_concurrent)
    for _ in range(30):
        create(js, "a")
    for _ in range(2):
        create(js, "b")
    started = run_fake_worker(conn, js)
    assert len(started) == 32, "an accepted edit was never released"
    a_starts = [i for i, t in enumerate(started) if t == "a"]
    b_starts = [i for i, t in enumerate(started) if t == "b"]
    # With fair share B runs before A's 10th edit; without it (a huge limit) B waits for all 30.
    assert (max(b_starts) < a_starts[9]) is b_starts_early, started
    assert counts(conn, "a") == counts(conn, "b") == (0, 0, 0) and conn.scard(GLOBAL_QUEUED_KEY) == 0


def test_held_edits_are_queued_positioned_cancellable_and_released_by_priority(redis_url, conn):
    js = store_with(redis_url, conn, tenant_max_concurrent=1)
    running = create(js)
    held = [create(js) for _ in range(3)]
    urgent = create(js, priority="high")
    edits = [js.get(i) for i in held]
    assert all(e.status is EditStatus.queued for e in edits)
    assert not any(in_rq_queue(conn, i) for i in held + [urgent])
    # Held: released when one of the tenant's edits ends, high priority first, then in submission order.
    assert js.get(urgent).queue_position == 1
    assert [e.queue_position for e in edits] == [3, 4, 5]
    canceled = js.request_cancel(held[0], "default")
    assert canceled.status is EditStatus.canceled and not conn.exists(Job.key_for(held[0]))  # nothing kept
    assert counts(conn) == (4, 1, 3)  # cancel of a held edit frees no slot
    assert [js.get(i).queue_position for i in held[1:]] == [3, 4]
    assert take_one(conn) == running
    js.mark_processing(running, batch_id="b", batch_size=1, worker="w")
    js.mark_succeeded(running, results=[], attention_maps=[], run_seconds=0.1)
    assert in_rq_queue(conn, urgent) and Job.fetch(urgent, connection=conn).get_status() == "queued"
    assert js.get(urgent).queue_position == 0 and js.get(held[1]).queue_position == 2


def test_the_edit_a_submit_returns_matches_a_fresh_read(redis_url, conn):
    """create() renders the new edit from what its one script wrote and reported (place in line, ETA
    statistics) instead of reading it back: that view must equal a GET right after, held edits included."""
    js = store_with(redis_url, conn, tenant_max_concurrent=2)
    first = create(js)
    assert take_one(conn) == first
    js.mark_processing(first, batch_id="b", batch_size=1, worker="w")
    js.mark_succeeded(first, results=[], attention_maps=[], run_seconds=0.4)  # gives the ETA statistics
    beat(conn, "w1", ["tiny-sd"], ttl=60)  # and a live worker serves the model
    made = []
    for priority in ("low", "normal", "high", "normal", "low", "high"):
        edit, created = js.create(p2p_payload(new_edit_id(), "default", priority=priority), webhook=None,
                                  idempotency_key=None)
        assert created
        made.append(edit)
        fresh = js.get(edit.id)
        assert (edit.queue_position, edit.eta_seconds) == (fresh.queue_position, fresh.eta_seconds), priority
        assert edit.model_dump(exclude={"queue_position", "eta_seconds"}) == fresh.model_dump(
            exclude={"queue_position", "eta_seconds"})
    assert all(e.eta_seconds is not None for e in made)
    # low, then normal (served before low) are released; high is held: one running edit ahead of it
    assert [e.queue_position for e in made[:3]] == [0, 0, 1]


def test_a_rate_limited_submit_writes_nothing(redis_url, s3, conn):
    _, client = gateway(redis_url, s3, tenant_rps=0.01, tenant_burst=1)
    assert client.post("/v1/edits", json=P2P).status_code == 202
    refused = client.post("/v1/edits", json=P2P, headers={"Idempotency-Key": "again"})
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limited"
    assert counts(conn) == (1, 1, 0) and conn.zcard("editserve:tenant:default:edits") == 1
    assert not conn.exists("editserve:idem:default:again")
    bad = client.post("/v1/edits", json={**P2P, "steps": 0})  # a refused request counts too: 429 first
    assert bad.status_code == 429


# ---------------------------------------------------------------------------------------------- release

def test_every_terminal_transition_releases_the_next_held_edit(redis_url, conn):
    js = store_with(redis_url, conn, tenant_max_concurrent=1)
    ids = [create(js) for _ in range(6)]
    assert [in_rq_queue(conn, i) for i in ids] == [True] + [False] * 5

    def next_released(expected: str) -> None:
        assert in_rq_queue(conn, expected) and counts(conn)[1] == 1

    take_one(conn)
    js.mark_processing(ids[0], batch_id="b", batch_size=1, worker="w")
    js.mark_succeeded(ids[0], results=[], attention_maps=[], run_seconds=0.1)  # succeeded
    next_released(ids[1])
    take_one(conn)
    js.mark_processing(ids[1], batch_id="b", batch_size=1, worker="w")
    js.mark_failed(ids[1], ErrorInfo(type="x", message="y"))  # failed while running
    next_released(ids[2])
    js.request_cancel(ids[2], "default")  # cancel of a released, still queued edit
    next_released(ids[3])
    take_one(conn)
    js.mark_processing(ids[3], batch_id="b", batch_size=1, worker="w")
    assert js.mark_requeued(ids[3], "worker died")  # a crash requeue keeps the slot
    js.reenqueue(ids[3])
    assert counts(conn)[1] == 1 and not in_rq_queue(conn, ids[4])
    js.mark_failed(ids[3], ErrorInfo(type="worker_crashed", message="gave up"))  # the reaper's failure
    next_released(ids[4])
    take_one(conn)
    js.mark_processing(ids[4], batch_id="b", batch_size=1, worker="w")
    js.request_cancel(ids[4], "default")  # cancel while running: flag only
    assert counts(conn)[1] == 1 and not in_rq_queue(conn, ids[5])
    js.mark_canceled(ids[4])  # the worker stops: canceled
    next_released(ids[5])
    js.mark_failed(ids[5], ErrorInfo(type="x", message="failed before it started"))
    assert counts(conn) == (0, 0, 0) and conn.scard(GLOBAL_QUEUED_KEY) == 0


def test_admission_writes_all_or_nothing(redis_url, conn):
    """One script writes the RQ job hash, the record and the claim: a refusal leaves none of them, an
    admitted edit's job hash is permanent and RQ reads it back as the edit's job."""
    js = store_with(redis_url, conn, tenant_max_queued=1)
    admitted = create(js)
    assert conn.ttl(Job.key_for(admitted)) == -1
    job = Job.fetch(admitted, connection=conn)
    assert job.get_status() == "queued" and job.func_name == "worker.runtime.execute.run_single"
    assert JobPayload.model_validate_json(job.args[0]).id == admitted
    refused_id = new_edit_id()
    with pytest.raises(LimitExceeded) as info:
        js.create(p2p_payload(refused_id, "default"), webhook=None, idempotency_key="k1")
    assert info.value.type == "tenant_queue_full"
    assert not conn.exists(Job.key_for(refused_id), edit_key(refused_id), "editserve:idem:default:k1")
    assert counts(conn) == (1, 1, 0)


def test_release_held_repairs_what_no_transition_saw(redis_url, conn):
    js = store_with(redis_url, conn, tenant_max_concurrent=1)
    first, second, third = create(js), create(js), create(js)
    # An older worker finishes `first` without the bookkeeping: its slot stays taken.
    conn.hset(edit_key(first), "status", "succeeded")
    assert not in_rq_queue(conn, second)
    assert js.release_held() == 1
    assert in_rq_queue(conn, second) and counts(conn) == (2, 1, 1)
    # An operator deletes a held edit's RQ job: it can never run, so the sweep fails it (and frees its place).
    conn.delete(Job.key_for(third))
    js.release_held()
    assert js.get(third).status is EditStatus.failed and js.get(third).error.type == "queue_entry_lost"
    assert counts(conn) == (1, 1, 0)
    assert js.release_held() == 0  # idempotent


def test_raising_a_tenant_limit_releases_held_edits_at_once(redis_url, conn):
    js = store_with(redis_url, conn, tenant_max_concurrent=1)
    ids = [create(js, "acme") for _ in range(4)]
    limits = write_overrides(conn, "acme", TenantLimitOverrides(max_concurrent=3), js.settings)
    assert (limits.max_concurrent, limits.released, limits.held, limits.queued) == (3, 3, 1, 4)
    assert [in_rq_queue(conn, i) for i in ids] == [True, True, True, False]
    assert tenant_limits(conn, "acme", js.settings).overrides.max_concurrent == 3


def test_admin_cli_sets_and_shows_limits(redis_url, conn, monkeypatch, capsys):
    from service.admin import main

    monkeypatch.setenv("EDITSERVE_REDIS_URL", redis_url)

    def cli(*args) -> tuple[int, str]:
        code = main(list(args))
        return code, capsys.readouterr().out

    code, out = cli("set-limits", "--tenant", "acme", "--rps", "2.5", "--max-concurrent", "2")
    assert code == 0 and '"rps": 2.5' in out and '"max_concurrent": 2' in out
    assert conn.hget("editserve:tenant:acme", "limit_max_concurrent") == b"2"
    assert '"burst": 100' in cli("show-limits", "--tenant", "acme")[1]
    assert cli("set-limits", "--tenant", "acme", "--burst", "0")[0] == 2
    assert cli("show-limits", "--tenant", "no spaces")[0] == 2
    assert cli("release-held") == (0, "released 0\n")


# ---------------------------------------------------------------------------------------------- precheck

def test_precheck_refuses_at_the_limits_before_anything_is_stored(redis_url, conn):
    from service.limits import Accounting
    from service.keys import tenant_key

    settings = make_settings(redis_url, limits={"max_queue_depth": 3, "tenant_max_queued": 2,
                                                "queue_full_retry_after_seconds": 7})
    acc = Accounting(conn, settings)
    acc.precheck("t1")  # empty: nothing to refuse
    conn.sadd(queued_key("t1"), "e1")
    conn.sadd(GLOBAL_QUEUED_KEY, "e1", "e2")
    acc.precheck("t1")  # 1 of 2 queued for the tenant, 2 of 3 for the service
    conn.sadd(queued_key("t1"), "e2")
    with pytest.raises(LimitExceeded) as err:
        acc.precheck("t1")
    e = err.value
    assert (e.status, e.type, e.limit, e.retry_after) == (429, "tenant_queue_full", "tenant_max_queued", 7)
    assert e.message == ("tenant 't1' already has 2 queued edits, its limit (tenant_max_queued 2); "
                         "retry when some have started")
    conn.hset(tenant_key("t1"), "limit_max_queued", "3.0")  # a tenant's override, as the API writes it
    acc.precheck("t1")
    conn.sadd(GLOBAL_QUEUED_KEY, "e3")
    with pytest.raises(LimitExceeded) as err:
        acc.precheck("t2")
    e = err.value
    assert (e.status, e.type, e.limit, e.retry_after) == (503, "queue_full", "max_queue_depth", 7)
    assert e.message == "the service already holds 3 queued edits, its limit (max_queue_depth 3); retry later"
    conn.srem(GLOBAL_QUEUED_KEY, "e3")
    conn.hset(tenant_key("t1"), "limit_max_queued", "0")  # an override of 0 refuses every edit
    with pytest.raises(LimitExceeded):
        acc.precheck("t1")


def test_the_async_rate_check_loads_its_script_on_a_miss_and_counts(redis_url, conn):
    import asyncio

    import redis.asyncio as aioredis

    from service.limits import RateLimiter

    limiter = RateLimiter(conn, make_settings(redis_url, limits={"tenant_rps": 0.001, "tenant_burst": 2}))
    conn.script_flush()  # the gateway's asyncio client meets a Redis that never saw the script

    async def run():
        aconn = aioredis.Redis.from_url(redis_url)
        try:
            await limiter.check_async(aconn, "t1")
            await limiter.check_async(aconn, "t1")
            with pytest.raises(LimitExceeded) as err:
                await limiter.check_async(aconn, "t1")
            return err.value
        finally:
            await aconn.aclose()

    refused = asyncio.run(run())
    assert refused.status == 429 and refused.limit == "tenant_rps"
    assert refused.message.startswith("tenant 't1' may make 0.001 requests/s with bursts of 2")
    assert conn.exists(*RateLimiter.keys("t1")) >= 1  # the bucket is the tenant's own key


def test_tenant_limits_read_every_override(redis_url, conn):
    settings = make_settings(redis_url, limits={"tenant_rps": 5, "tenant_burst": 10, "tenant_max_queued": 100,
                                                "tenant_max_concurrent": 4})
    limits = write_overrides(conn, "t1", TenantLimitOverrides(rps=2.5, burst=3, max_queued=7, max_concurrent=2),
                             settings)
    assert (limits.rps, limits.burst, limits.max_queued, limits.max_concurrent) == (2.5, 3, 7, 2)
    fresh = tenant_limits(conn, "t1", settings)
    assert (fresh.rps, fresh.burst, fresh.max_queued, fresh.max_concurrent) == (2.5, 3, 7, 2)
    assert fresh.overrides == TenantLimitOverrides(rps=2.5, burst=3, max_queued=7, max_concurrent=2)
    other = tenant_limits(conn, "t2", settings)
    assert (other.rps, other.burst, other.max_queued, other.max_concurrent) == (5, 10, 100, 4)


def test_the_sweep_drops_ids_that_are_no_longer_queued_from_the_global_set(redis_url, conn):
    from service.limits import Accounting

    conn.sadd(GLOBAL_QUEUED_KEY, "ghost-1", "ghost-2")  # no edit records: nothing queued under these ids
    Accounting(conn, make_settings(redis_url)).sweep()
    assert conn.scard(GLOBAL_QUEUED_KEY) == 0
