"""JobStore behaviours its callers rely on that tests/test_jobstore.py leaves open (found by mutation testing):
the async submit path, previews and progress detail, the repair pass, the re-enqueued RQ job, ETA statistics,
record lifetimes, the parameters shown, and the errors callers see."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
import redis
import redis.asyncio
from gateway_support import conn, js, make_settings, p2p_payload  # noqa: F401  (conn, js: fixtures)
from rq import Queue
from rq.job import Job

from editserve.contract import (
    BatchKey,
    EditStatus,
    ErrorInfo,
    InversionProgress,
    InversionRequest,
    IP2PEditRequest,
    JobPayload,
    Sweep,
    WebhookSpec,
)
from service.jobstore import (
    JOB_FUNCTION,
    EditConflict,
    EditNotFound,
    IdempotencyConflict,
    JobStore,
    build_params,
    new_edit_id,
    request_fingerprint,
)
from service import jobstore, metrics
from service.keys import eta_stats_keys, events_channel, idem_key, tenant_index_key
from service.queues import BATCH_TAG_FIELD, batch_tag
from service.limits import LimitExceeded
from service.liveness import beat
from service.throughput import recent

CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def create(js: JobStore, tenant: str = "default", **kw):
    edit, created = js.create(p2p_payload(new_edit_id(), tenant, **kw), webhook=None, idempotency_key=None)
    assert created
    return edit


def processing(js: JobStore, **kw):
    edit = create(js, **kw)
    assert js.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w")
    return edit


def test_edit_id_carries_its_creation_millisecond():
    """Listings and cursors order by id within a millisecond: the id's top 48 bits are the creation time."""
    before = int(time.time() * 1000)
    edit_id = new_edit_id()
    after = int(time.time() * 1000)
    value = 0
    for char in edit_id:
        value = value * 32 + CROCKFORD.index(char)
    assert before <= value >> 80 <= after + 1


# ---------------------------------------------------------------------------------------------- errors callers see

def test_not_found_errors_name_the_edit(js):
    with pytest.raises(EditNotFound) as cancel:
        js.request_cancel("missing", "default")
    with pytest.raises(EditNotFound) as load:
        js.load_payload("missing")
    assert cancel.value.args == load.value.args == ("missing",)
    assert js.tenant_of("missing") is None
    assert js.is_cancel_requested("missing") is True  # a worker holding a vanished record stops


def test_cancel_of_a_queued_edit_completes_it_and_a_repeat_returns_it(js):
    edit = create(js)
    canceled = js.request_cancel(edit.id, "default")
    assert canceled.status is EditStatus.canceled and canceled.completed_at is not None
    again = js.request_cancel(edit.id, "default")
    assert again is not None and again.status is EditStatus.canceled and again.revision == canceled.revision


def test_every_way_to_cancel_stamps_completed_at(js):
    flagged, running, failing = processing(js), processing(js), processing(js)
    js.request_cancel(flagged.id, "default")
    assert js.mark_requeued(flagged.id, "worker died") is False  # cancel asked: canceled, not requeued
    js.mark_canceled(running.id)
    js.mark_failed(failing.id, ErrorInfo(type="x", message="y"))
    assert js.get(failing.id).completed_at is not None
    for edit_id in (flagged.id, running.id):
        edit = js.get(edit_id)
        assert edit.status is EditStatus.canceled and edit.completed_at is not None


def test_cancel_of_a_finished_edit_says_what_can_be_canceled(js):
    edit = processing(js)
    js.mark_succeeded(edit.id, results=[], attention_maps=[], run_seconds=1.0)
    with pytest.raises(EditConflict, match="already succeeded; only queued or processing edits can be canceled"):
        js.request_cancel(edit.id, "default")


def test_an_idempotency_key_reused_with_another_body_says_so(js):
    js.create(p2p_payload(new_edit_id()), webhook=None, idempotency_key="k")
    with pytest.raises(IdempotencyConflict) as conflict:
        js.create(p2p_payload(new_edit_id(), target="a fox on a mat"), webhook=None, idempotency_key="k")
    assert str(conflict.value) == ("this Idempotency-Key was already used with a different request body; "
                                   "use a new key for a different request")


def test_webhook_last_error_is_cut_to_500_characters(js):
    edit, _ = js.create(p2p_payload(new_edit_id()), webhook=WebhookSpec(url="https://example.com/h"),
                        idempotency_key=None)
    js.record_webhook_delivery(edit.id, ok=False, error="x" * 800)
    js.record_webhook_delivery(edit.id, ok=False)
    state = js.get(edit.id).webhook
    assert (state.failed, state.last_error) == (2, "x" * 500)


# ---------------------------------------------------------------------------------------------- async submit path

def test_create_async_records_replays_and_rate_limits(conn, redis_url):
    """The JSON submit path: created once, a replay returns the first edit, and only ``rate_limit`` counts."""
    js = JobStore(conn, make_settings(redis_url, limits={"tenant_rps": 0.001, "tenant_burst": 1}))

    async def scenario():
        aio = redis.asyncio.Redis.from_url(redis_url)
        try:
            first_payload = p2p_payload(new_edit_id())
            first, created = await js.create_async(aio, first_payload, webhook=WebhookSpec(url="https://e.com/h"),
                                                   idempotency_key="k1", fingerprint="same-body",
                                                   rate_limit=True)
            assert created and first.id == first_payload.id and first.status is EditStatus.queued
            assert first.webhook.url == "https://e.com/h" and first.revision == 1
            assert js.get(first.id).id == first.id
            other_body = p2p_payload(new_edit_id(), target="a fox on a mat")  # same fingerprint: a replay
            again, created_again = await js.create_async(aio, other_body, webhook=None, idempotency_key="k1",
                                                         fingerprint="same-body")
            assert not created_again and again.id == first.id
            # counted only when asked: this submit is over the 1-request burst, the next one is refused
            _, created_third = await js.create_async(aio, p2p_payload(new_edit_id()), webhook=None,
                                                     idempotency_key=None)
            assert created_third
            with pytest.raises(LimitExceeded):
                await js.create_async(aio, p2p_payload(new_edit_id()), webhook=None, idempotency_key=None,
                                      rate_limit=True)
        finally:
            await aio.aclose()

    asyncio.run(scenario())


def test_sync_create_counts_the_rate_only_when_asked(conn, redis_url):
    js = JobStore(conn, make_settings(redis_url, limits={"tenant_rps": 0.001, "tenant_burst": 1}))
    assert js.create(p2p_payload(new_edit_id()), webhook=None, idempotency_key=None, rate_limit=True)[1]
    assert js.create(p2p_payload(new_edit_id()), webhook=None, idempotency_key=None)[1]  # over the burst: not counted
    with pytest.raises(LimitExceeded):
        js.create(p2p_payload(new_edit_id()), webhook=None, idempotency_key=None, rate_limit=True)


# ---------------------------------------------------------------------------------------------- worker side

def test_a_preview_shows_on_a_processing_edit_and_is_published(js, conn):
    edit = processing(js)
    pubsub = conn.pubsub()
    pubsub.subscribe(events_channel(edit.id))
    assert pubsub.get_message(timeout=10)["type"] == "subscribe"
    before = js.get(edit.id).revision
    js.set_preview(edit.id, 3, 10, f"edits/{edit.id}/preview.png")
    shown = js.get(edit.id)
    assert (shown.preview.step, shown.preview.total) == (3, 10) and "preview.png" in shown.preview.url
    assert shown.revision == before + 1
    message = pubsub.get_message(timeout=10)
    assert message is not None and json.loads(message["data"])["preview"]["step"] == 3
    pubsub.close()


def inversion_payload() -> JobPayload:
    key = BatchKey(model="tiny-sd", kind="inversion", height=128, width=128, steps=10, scheduler="ddim")
    return JobPayload(id=new_edit_id(), tenant="default", request=InversionRequest(caption="a cat", steps=10),
                      batch_key=key, seeds=[], created_at=datetime.now(UTC))


def test_progress_detail_of_a_processing_inversion_is_shown(js):
    payload = inversion_payload()
    js.create(payload, webhook=None, idempotency_key=None)
    assert js.mark_processing(payload.id, batch_id="b", batch_size=1, worker="w")
    detail = InversionProgress(phase="null-text", step=4, total=10, inner_iterations=3, inner_total=10)
    js.set_progress_detail(payload.id, detail.model_dump_json())
    assert js.view.get_inversion(payload.id).progress == detail


def test_progress_publishing_is_throttled_but_first_and_last_steps_always_go_out(conn, redis_url):
    """Webhook/SSE consumers get the start and the end of a run even when updates come faster than the interval,
    and every step when the interval is 0."""
    published = {}
    for interval in (1e9, 0.0):
        events = published[interval] = []
        js = JobStore(conn, make_settings(redis_url, worker={"progress_min_interval_seconds": interval}), listeners=[
            lambda r, edit, event, tenant, events=events: events.append((event, edit.progress and edit.progress.step))])
        edit = processing(js)
        for step in range(1, 11):
            js.set_progress(edit.id, step, 10)
    assert published[1e9] == [("started", None), ("progress", 1), ("progress", 10)]
    assert published[0.0] == [("started", None)] + [("progress", step) for step in range(1, 11)]


def test_a_failing_publish_does_not_fail_the_transition(js, monkeypatch):
    told = []
    js.add_listener(lambda r, edit, event, tenant: told.append(event))
    edit = create(js)

    def broken(*args, **kwargs):
        raise redis.ConnectionError("pub/sub down")

    monkeypatch.setattr(js.redis, "publish", broken)
    assert js.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w")
    assert told == ["started"] and js.get(edit.id).status is EditStatus.processing


def test_reenqueue_puts_the_same_job_back_on_its_queue(js, conn):
    """The re-enqueued job is the one a worker runs: same function, payload, limits, at the front by default."""
    first, second = create(js, priority="low"), create(js, priority="low")
    first_payload_key = js.load_payload(first.id).batch_key
    queue = Queue(Job.fetch(first.id, connection=conn).origin, connection=conn)
    conn.lrem(queue.key, 0, first.id)  # a worker took it
    js.mark_processing(first.id, batch_id="b", batch_size=1, worker="w")
    assert js.mark_requeued(first.id, "worker died")
    assert conn.ttl(f"editserve:edit:{first.id}") == -1  # only terminal records expire
    assert conn.hmget(f"editserve:edit:{first.id}", "worker", "batch_id", "batch_size") == [None] * 3  # reaper's view
    conn.hdel(Job.key_for(first.id), BATCH_TAG_FIELD)  # an older record's job: the tag is written again
    js.reenqueue(first.id)
    assert queue.get_job_ids() == [first.id, second.id]
    assert conn.hget(Job.key_for(first.id), BATCH_TAG_FIELD).decode() == batch_tag(first_payload_key)
    job = Job.fetch(first.id, connection=conn)
    settings = js.settings.worker
    assert job.origin == queue.name and job.func_name == JOB_FUNCTION
    assert job.args == (js.redis.hget(f"editserve:edit:{first.id}", "payload").decode(),)
    assert (job.timeout, job.result_ttl, job.failure_ttl) == (
        settings.job_timeout_seconds, settings.result_ttl_seconds, settings.result_ttl_seconds)
    assert job.description == f"edit {first.id}"
    conn.lrem(queue.key, 0, first.id)
    js.mark_processing(first.id, batch_id="b", batch_size=1, worker="w")
    assert js.mark_requeued(first.id, "worker died again")
    js.reenqueue(first.id, at_front=False)
    assert queue.get_job_ids() == [second.id, first.id]


def test_a_requeued_edit_waits_from_its_requeue_and_forgets_its_last_attempt(js, monkeypatch):
    """Queue wait counts from the requeue, not the first submit; the failed attempt's progress detail is gone."""
    import service.jobstore as jobstore_module

    clock = [1_000_000.0]
    monkeypatch.setattr(jobstore_module, "_now", lambda: clock[0])
    payload = inversion_payload()
    js.create(payload, webhook=None, idempotency_key=None)
    clock[0] += 10
    js.mark_processing(payload.id, batch_id="b", batch_size=1, worker="w")
    js.set_progress_detail(payload.id, InversionProgress(phase="ddim", step=2, total=10).model_dump_json())
    clock[0] += 100
    told = []
    js.add_listener(lambda r, edit, event, tenant: told.append(event))
    assert js.mark_requeued(payload.id, "worker died")
    assert told == []  # no webhook: a requeue is neither a start nor a completion
    assert js.get(payload.id).completed_at is None
    assert js.view.get_inversion(payload.id).progress is None
    clock[0] += 5
    js.mark_processing(payload.id, batch_id="b2", batch_size=1, worker="w2")
    assert js.get(payload.id).metrics.queue_wait_seconds == 5.0


def test_reenqueue_only_puts_back_a_queued_edit(js, conn):
    """A late reaper re-enqueueing a running or finished edit must not hand its job to a second worker."""
    edit = create(js)
    queue = Queue(Job.fetch(edit.id, connection=conn).origin, connection=conn)
    conn.lrem(queue.key, 0, edit.id)  # a worker took it
    js.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w")
    js.reenqueue(edit.id)
    js.mark_succeeded(edit.id, results=[], attention_maps=[], run_seconds=1.0)
    js.reenqueue(edit.id)
    js.reenqueue("missing")
    assert queue.get_job_ids() == []


def test_finished_edits_feed_eta_and_throughput(js, conn):
    """A succeeded run's seconds per step and per job become the next edits' ETA; /v1/models counts its work."""
    beat(conn, "w1", ["tiny-sd"], ttl=60)
    done = create(js)
    js.mark_processing(done.id, batch_id="b", batch_size=2, worker="w1")
    results = [{"index": i, "label": "x", "key": f"edits/{done.id}/output-{i}.png", "width": 128, "height": 128}
               for i in range(3)]
    assert js.mark_succeeded(done.id, results=results, attention_maps=[], run_seconds=4.0) is True
    assert js.mark_succeeded(done.id, results=results, attention_maps=[], run_seconds=4.0) is False
    running = processing(js)
    assert js.get(running.id).eta_seconds == 4.0  # 10 steps x 0.4 s, nothing run yet
    queued = js.get(create(js).id)
    assert queued.queue_position >= 1
    assert queued.eta_seconds == round(4.0 + queued.queue_position * 2.0, 2)  # + jobs ahead at 4 s / batch of 2
    assert create(js).eta_seconds is not None  # the submit response already has it
    stats_ttl = js.settings.retention.stats_ttl_seconds
    for key in eta_stats_keys("tiny-sd", "p2p", 128, 128, 10, "ddim"):
        assert stats_ttl - 60 <= conn.ttl(key) <= stats_ttl
    longer = js.get(create(js, steps=20).id)  # another step count: per-step figures scale
    assert longer.eta_seconds == round(20 * 0.4 + longer.queue_position * 20 * 0.2, 2)
    throughput = recent(conn, ["tiny-sd"], 60)["tiny-sd"]
    assert (throughput.edits, throughput.images, throughput.steps) == (1, 3, 10)


def test_a_single_job_batch_counts_its_whole_run_per_job(js, conn):
    beat(conn, "w1", ["tiny-sd"], ttl=60)
    done = processing(js)  # batch_size 1
    js.mark_succeeded(done.id, results=[], attention_maps=[], run_seconds=3.0)
    queued = js.get(create(js).id)
    assert queued.eta_seconds == round(3.0 + queued.queue_position * 3.0, 2)


def test_a_succeeded_inversion_shows_its_stored_objects(js):
    payload = inversion_payload()
    js.create(payload, webhook=None, idempotency_key=None)
    js.mark_processing(payload.id, batch_id="b", batch_size=1, worker="w")
    stored = {"arrays_key": f"edits/{payload.id}/inversion.safetensors",
              "reconstruction_key": f"edits/{payload.id}/reconstruction.png", "reconstruction_error": 0.125}
    assert js.mark_succeeded(payload.id, results=[], attention_maps=[], run_seconds=1.0, inversion=stored)
    inversion = js.view.get_inversion(payload.id)
    assert inversion.reconstruction_error == 0.125
    assert "inversion.safetensors" in inversion.result.arrays_url
    assert "reconstruction.png" in inversion.result.reconstruction_url


def test_terminal_records_live_as_long_as_the_images(js, conn, redis_url):
    edit = processing(js)
    js.mark_failed(edit.id, ErrorInfo(type="x", message="y"))
    days = js.settings.s3.retention_days
    assert days * 86400 - 60 <= conn.ttl(f"editserve:edit:{edit.id}") <= days * 86400
    short = JobStore(conn, make_settings(redis_url, retention={"record_ttl_seconds": 900}))
    other = create(short)
    short.mark_canceled(other.id)
    assert 840 <= conn.ttl(f"editserve:edit:{other.id}") <= 900


# ---------------------------------------------------------------------------------------------- repair pass

def test_release_held_fails_an_edit_whose_queue_entry_was_deleted(conn, redis_url):
    js = JobStore(conn, make_settings(redis_url, limits={"tenant_max_concurrent": 1}))
    first, held, lost = create(js), create(js), create(js)
    conn.hset(f"editserve:edit:{first.id}", "status", "succeeded")  # finished without the bookkeeping
    conn.delete(Job.key_for(lost.id))
    assert js.release_held() == 1
    assert js.get(held.id).status is EditStatus.queued
    failed = js.get(lost.id)
    assert failed.status is EditStatus.failed and failed.error.type == "queue_entry_lost"
    assert "submit it again" in failed.error.message


# ---------------------------------------------------------------------------------------------- params shown

def test_fingerprint_ignores_the_per_edit_image_key():
    """The image's content is hashed by the gateway (``extra``); the key differs per edit id and must not count."""
    key = BatchKey(model="tiny-ip2p", kind="ip2p", height=64, width=64, steps=4, scheduler="ddim")

    def payload(edit_id: str, instruction: str = "snow") -> JobPayload:
        request = IP2PEditRequest(instruction=instruction, image=f"edits/{edit_id}/input.png")
        return JobPayload(id=edit_id, tenant="t", request=request, batch_key=key, seeds=[1],
                          created_at=datetime.now(UTC))

    assert request_fingerprint(payload("a")) == request_fingerprint(payload("b"))
    assert request_fingerprint(payload("a")) != request_fingerprint(payload("a", "rain"))
    assert request_fingerprint(payload("a"), "img1") != request_fingerprint(payload("a"), "img2")


def test_params_of_a_p2p_edit_show_the_resolved_shape_seed_and_inversion():
    payload = p2p_payload("e1", steps=12)
    payload = payload.model_copy(update={"seeds": [5, 6], "inversion_id": "inv1"})
    params = build_params(payload)
    assert {k: params[k] for k in ("model", "steps", "scheduler", "height", "width", "seeds", "seed",
                                   "inversion_id")} == {
        "model": "tiny-sd", "steps": 12, "scheduler": "ddim", "height": 128, "width": 128, "seeds": [5, 6],
        "seed": 5, "inversion_id": "inv1"}
    assert not {"image", "webhook", "metadata", "kind"} & params.keys()


def test_params_of_an_inversion_have_no_seeds_or_priority():
    params = build_params(inversion_payload())
    assert "seeds" not in params and "priority" not in params and params["caption"] == "a cat"


def test_params_of_an_ip2p_sweep_list_every_cell():
    request = IP2PEditRequest(instruction="snow", sweep=Sweep(image_guidance=[1.0, 2.0], text_guidance=[5.0]))
    key = BatchKey(model="tiny-ip2p", kind="ip2p", height=64, width=64, steps=4, scheduler="ddim")
    payload = JobPayload(id="e3", tenant="t", request=request, batch_key=key, seeds=[11, 12],
                         created_at=datetime.now(UTC))
    params = build_params(payload)
    assert params["cells"] == [{"index": 0, "image_guidance": 1.0, "text_guidance": 5.0, "seed": 11},
                               {"index": 1, "image_guidance": 2.0, "text_guidance": 5.0, "seed": 12}]
    assert params["seeds"] == [11, 12]


def test_params_of_an_ip2p_edit_show_the_batch_keys_non_square_shape():
    """An IP2P request has no height or width (the input image's resize decides them): only the batch key
    knows, and a swap would show a 96×64 edit as 64×96."""
    key = BatchKey(model="tiny-ip2p", kind="ip2p", height=96, width=64, steps=4, scheduler="ddim")
    payload = JobPayload(id="e4", tenant="t", request=IP2PEditRequest(instruction="snow"), batch_key=key,
                         seeds=[3], created_at=datetime.now(UTC))
    params = build_params(payload)
    assert (params["height"], params["width"]) == (96, 64)


# ---------------------------------------------------------------------------------------------- create, start, metrics

def sample(metric, suffix: str, **labels) -> float:
    """A metric's current value as /metrics shows it (0 before the first observation)."""
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith(suffix) and s.labels == labels:
                return s.value
    return 0.0


def test_create_writes_the_job_a_worker_runs_and_the_claim_for_a_day(js, conn):
    payload = p2p_payload(new_edit_id(), priority="high")
    edit, _ = js.create(payload, webhook=None, idempotency_key="day")
    job = Job.fetch(edit.id, connection=conn)
    settings = js.settings.worker
    assert (job.result_ttl, job.failure_ttl, job.description) == (
        settings.result_ttl_seconds, settings.result_ttl_seconds, f"edit {edit.id}")
    assert conn.hget(job.key, BATCH_TAG_FIELD).decode() == batch_tag(payload.batch_key)
    assert abs((edit.created_at - payload.created_at).total_seconds()) < 0.001
    assert edit.params["priority"] == "high" and edit.kind == "p2p" and edit.model == "tiny-sd"
    ttl = js.settings.retention.idempotency_ttl_seconds
    assert ttl - 60 <= conn.ttl(idem_key("default", "day")) <= ttl


def test_start_records_worker_wait_and_first_start(js, conn):
    """The reaper reads ``worker``; a retried edit keeps its first ``started_at`` and shows its queue wait."""
    edit = create(js)
    assert js.mark_processing(edit.id, batch_id="b1", batch_size=2, worker="w1")
    started = js.get(edit.id)
    assert started.metrics.queue_wait_seconds is not None and started.metrics.queue_wait_seconds >= 0
    assert conn.hget(f"editserve:edit:{edit.id}", "worker") == b"w1"
    assert js.mark_requeued(edit.id, "worker died")
    assert js.mark_processing(edit.id, batch_id="b2", batch_size=1, worker="w2")
    again = js.get(edit.id)
    assert again.started_at == started.started_at and again.metrics.batch_id == "b2"
    assert conn.hget(f"editserve:edit:{edit.id}", "worker") == b"w2"


def test_lifecycle_metrics_are_labelled_by_model_and_kind(js):
    labels = {"model": "tiny-sd", "kind": "p2p"}
    submitted = sample(metrics.jobs_submitted_total, "_total", **labels)
    waits = sample(metrics.queue_wait_seconds, "_count", **labels)
    runs = sample(metrics.job_duration_seconds, "_count", **labels)
    run_sum = sample(metrics.job_duration_seconds, "_sum", **labels)
    done = sample(metrics.jobs_completed_total, "_total", status="succeeded", **labels)
    canceled = sample(metrics.jobs_completed_total, "_total", status="canceled", **labels)
    running = metrics.jobs_in_progress._value.get()
    edit = processing(js)
    assert metrics.jobs_in_progress._value.get() == running + 1
    js.mark_succeeded(edit.id, results=[], attention_maps=[], run_seconds=2.5)
    assert metrics.jobs_in_progress._value.get() == running  # a finished edit no longer counts as running
    requeued = processing(js)
    assert js.mark_requeued(requeued.id, "worker stopping")
    js.mark_canceled(requeued.id)  # canceled while queued again: it was not running here any more
    assert metrics.jobs_in_progress._value.get() == running
    js.request_cancel(create(js).id, "default")
    assert sample(metrics.jobs_submitted_total, "_total", **labels) == submitted + 3
    assert sample(metrics.queue_wait_seconds, "_count", **labels) == waits + 2
    assert sample(metrics.job_duration_seconds, "_count", **labels) == runs + 1
    assert sample(metrics.job_duration_seconds, "_sum", **labels) == run_sum + 2.5
    assert sample(metrics.jobs_completed_total, "_total", status="succeeded", **labels) == done + 1
    assert sample(metrics.jobs_completed_total, "_total", status="canceled", **labels) == canceled + 2


def test_the_tenant_listing_is_scored_by_creation_millisecond(js, conn):
    """Listing order, its cursors and retention's ``trim_index`` (score <= cutoff in ms) all read this score."""
    payload = p2p_payload(new_edit_id(), "scored")
    js.create(payload, webhook=None, idempotency_key=None)
    assert conn.zscore(tenant_index_key("scored"), payload.id) == int(payload.created_at.timestamp() * 1000)


def test_the_create_response_counts_higher_priority_queues_ahead(js):
    """The position a client sees on submit is the one ``get`` shows later: high-priority work of the same
    shape runs first."""
    create(js, priority="high")
    create(js, priority="high")
    low = create(js, priority="low")
    assert low.queue_position == 2 == js.get(low.id).queue_position


def test_listeners_get_the_stores_connection(js):
    """``service.webhooks.emit`` enqueues its delivery with the connection it is given."""
    seen = []
    js.add_listener(lambda r, edit, event, tenant: seen.append((r.ping(), event, tenant)))
    processing(js)
    assert seen == [(True, "started", "default")]


def test_queue_wait_is_set_when_the_edit_starts_and_kept_after(js, monkeypatch):
    """The wait is start minus enqueue; finishing later must not stretch it to include the run."""
    clock = iter([1000.0, 1010.0, 1100.0, 1101.0, 1102.0])
    monkeypatch.setattr(jobstore, "_now", lambda: next(clock))
    edit = create(js)  # enqueued_at 1000
    assert js.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w")  # started at 1010
    assert js.get(edit.id).metrics.queue_wait_seconds == 10.0
    assert js.mark_succeeded(edit.id, results=[], attention_maps=[], run_seconds=90.0)  # completed at 1100
    assert js.get(edit.id).metrics.queue_wait_seconds == 10.0


def fake_clock(monkeypatch, **clocks) -> None:
    """jobstore's ``time`` module with the given functions replaced (the rest real), for this test only."""
    real = {name: getattr(time, name) for name in ("time", "monotonic", "sleep")}
    monkeypatch.setattr(jobstore, "time", SimpleNamespace(**(real | clocks)))


def test_progress_is_published_at_most_once_per_interval_per_edit(conn, redis_url, monkeypatch):
    """Driven by a fake clock: a step inside the interval since this edit's last publish is stored but not
    published; one after it is; another edit's publishes do not reset the first edit's interval."""
    now = [1000.0]
    fake_clock(monkeypatch, monotonic=lambda: now[0])
    events = []
    js = JobStore(conn, make_settings(redis_url, worker={"progress_min_interval_seconds": 5.0}), listeners=[
        lambda r, edit, event, tenant: event == "progress" and events.append((edit.id, edit.progress.step))])
    a, b = processing(js), processing(js)
    for t, edit, step in [(1000.0, a, 1), (1001.0, a, 2), (1003.0, b, 2), (1004.9, a, 3), (1005.0, a, 4),
                          (1006.0, a, 5), (1009.0, b, 3), (1010.0, a, 6)]:
        now[0] = t
        js.set_progress(edit.id, step, 20)
    assert events == [(a.id, 1), (b.id, 2), (a.id, 4), (b.id, 3), (a.id, 6)]
    assert js.get(a.id).progress.step == 6  # every step is stored, published or not


def test_a_cancel_that_loses_the_race_to_the_finish_reports_the_finished_edit(js):
    """The worker finishes between the cancel's read and its flag write: the cancel re-reads and says the edit
    already succeeded (409), rather than retrying on the stale record or failing on a missing one."""
    edit = processing(js)
    real = js._run_transition

    def worker_finishes_first(edit_id, allowed, to, **kw):
        if to is None:  # the cancel's "flag a processing edit" write
            js.mark_succeeded(edit_id, results=[], attention_maps=[], run_seconds=1.0)
        return real(edit_id, allowed, to, **kw)

    js._run_transition = worker_finishes_first
    with pytest.raises(EditConflict, match="already succeeded"):
        js.request_cancel(edit.id, "default")
    assert js.get(edit.id).status is EditStatus.succeeded


def test_a_finished_edit_leaves_no_progress_throttle_state(js):
    """A worker runs edits for days: per-edit throttle entries must go when the edit leaves it."""
    done, requeued = processing(js), processing(js)
    for edit in (done, requeued):
        js.set_progress(edit.id, 1, 10)
    js.mark_succeeded(done.id, results=[], attention_maps=[], run_seconds=1.0)
    assert js.mark_requeued(requeued.id, "worker stopping")
    assert js._last_progress_publish == {}


# ---------------------------------------------------------------------------------------------- ids, claims, logs

def test_an_id_holds_its_creation_millisecond_exactly(monkeypatch):
    """The 80 random bits stay below the timestamp: drawn 64 times at one (even) millisecond, every id decodes
    to exactly that millisecond (a random bit spilling into the timestamp would read 1 ms late half the time)."""
    ms = 1_800_000_000_000
    fake_clock(monkeypatch, time=lambda: ms / 1000)
    for _ in range(64):
        monkeypatch.setattr(jobstore, "_last_id", [0])  # a fresh process each draw: no monotonic bump
        value = 0
        for char in new_edit_id():
            value = value * 32 + CROCKFORD.index(char)
        assert value >> 80 == ms


@pytest.mark.parametrize("path", ["find_idempotent", "create_async"])
def test_an_orphaned_claim_is_released_by_every_path_that_finds_it(path, conn, redis_url, monkeypatch):
    """A claim whose creator died before writing the edit: the replay gets 409 "retry" and the claim is gone,
    so the retry can create the edit."""
    monkeypatch.setattr(jobstore, "IDEMPOTENCY_WAIT_SECONDS", 0.05)
    js = JobStore(conn, make_settings(redis_url))
    payload = p2p_payload(new_edit_id())
    fingerprint = request_fingerprint(payload)
    conn.set(idem_key("default", "crashed"), json.dumps({"edit_id": "ghost", "fingerprint": fingerprint}))
    with pytest.raises(EditConflict, match="did not complete; retry the request"):
        if path == "find_idempotent":
            js.find_idempotent("default", "crashed", fingerprint)
        else:
            async def replay():
                client = redis.asyncio.Redis.from_url(redis_url)
                try:
                    await js.create_async(client, payload, webhook=None, idempotency_key="crashed")
                finally:
                    await client.aclose()

            asyncio.run(replay())
    assert conn.get(idem_key("default", "crashed")) is None


def logged(caplog, level: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "service.jobstore" and r.levelname == level]


def test_a_failed_publish_and_a_failing_listener_are_logged_with_the_edit(js, monkeypatch, caplog):
    """Operators find a lost event or a broken watcher by the edit id in the log."""
    def broken_listener(r, edit, event, tenant):
        raise RuntimeError("watcher down")

    js.add_listener(broken_listener)
    edit = create(js)

    def broken(*args, **kwargs):
        raise redis.ConnectionError("pub/sub down")

    monkeypatch.setattr(js.redis, "publish", broken)
    with caplog.at_level("INFO", logger="service.jobstore"):
        assert js.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w")
    assert logged(caplog, "ERROR") == [f"edit {edit.id}: event not published",
                                       f"edit {edit.id}: listener {broken_listener!r} failed on started"]
    assert all(r.exc_info for r in caplog.records if r.levelname == "ERROR")  # with the traceback


def test_an_ignored_transition_is_logged_with_both_statuses(js, caplog):
    edit = processing(js)
    js.mark_succeeded(edit.id, results=[], attention_maps=[], run_seconds=1.0)
    with caplog.at_level("INFO", logger="service.jobstore"):
        js.mark_failed(edit.id, ErrorInfo(type="internal", message="late"))  # a late writer: ignored
    assert logged(caplog, "INFO") == [f"edit {edit.id}: succeeded → failed ignored"]


def test_an_unexpected_error_removing_the_rq_job_is_logged_and_the_cancel_stands(js, monkeypatch, caplog):
    edit = create(js)

    def fetch_fails(*args, **kwargs):
        raise RuntimeError("rq broke")

    monkeypatch.setattr(jobstore.Job, "fetch", fetch_fails)
    with caplog.at_level("INFO", logger="service.jobstore"):
        assert js.request_cancel(edit.id, "default").status is EditStatus.canceled
    assert logged(caplog, "ERROR") == [f"edit {edit.id}: could not remove its RQ job"]


def test_release_held_logs_each_edit_whose_queue_entry_is_gone(conn, redis_url, caplog):
    js = JobStore(conn, make_settings(redis_url))
    lost = create(js)
    conn.delete(Job.key_for(lost.id))
    with caplog.at_level("INFO", logger="service.jobstore"):
        js.release_held()
    assert logged(caplog, "WARNING") == [f"edit {lost.id}: its RQ job is gone; failing it so its tenant's slot frees"]
