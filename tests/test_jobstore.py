"""JobStore against a real Redis: transitions, guards, RQ bookkeeping, events, idempotency, listing."""

from __future__ import annotations

import inspect
import json
import threading
import time

import pytest
from gateway_support import conn, js, p2p_payload  # noqa: F401  (conn, js: fixtures)
from rq import Queue
from rq.job import Job, JobStatus

from editserve.contract import BatchKey, EditStatus, ErrorInfo, WebhookSpec
from service.jobstore import EditConflict, EditNotFound, IdempotencyConflict, JobStore, new_edit_id
from service.keys import edit_key, events_channel
from service.liveness import beat
from service.queues import discover, parse_queue_name, queue_name, queue_names_by_priority


def create(js, tenant="default", **kw):
    edit, created = js.create(p2p_payload(new_edit_id(), tenant, **kw), webhook=None, idempotency_key=None)
    assert created
    return edit


def rq_queue_of(edit_id, conn) -> Queue:
    return Queue(Job.fetch(edit_id, connection=conn).origin, connection=conn)


# ---------------------------------------------------------------------------------------------- RQ contract

def test_rq_apis_we_rely_on_keep_their_signatures():
    """Fails loudly when an rq upgrade changes what JobStore and the queues module call."""
    enqueue_params = inspect.signature(Queue.enqueue_call).parameters
    for name in ("job_id", "timeout", "result_ttl", "failure_ttl", "retry", "unique", "at_front", "description"):
        assert name in enqueue_params, f"Queue.enqueue_call lost {name!r}"
    assert "pipeline" in inspect.signature(Job.cancel).parameters
    assert list(inspect.signature(Queue.get_job_position).parameters) == ["self", "job_or_id"]
    assert "connection" in inspect.signature(Queue.all).parameters
    assert "connection" in inspect.signature(Job.fetch).parameters
    assert JobStatus.CANCELED.value == "canceled"


def test_edit_ids_are_time_sortable_and_valid_rq_ids():
    ids = [new_edit_id() for _ in range(2000)]  # many share a millisecond: still strictly increasing
    assert all(len(i) == 26 and i.isalnum() and i == i.lower() for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    first, later = new_edit_id(), (time.sleep(0.002), new_edit_id())[1]
    assert first[:10] <= later[:10]


# ---------------------------------------------------------------------------------------------- create / get

def test_create_records_and_enqueues_with_job_id_equal_to_edit_id(js, conn):
    edit = create(js, steps=12)
    assert edit.status is EditStatus.queued and edit.revision == 1
    job = Job.fetch(edit.id, connection=conn)
    assert job.func_name == "worker.runtime.execute.run_single"
    assert job.timeout == js.settings.worker.job_timeout_seconds
    assert job.origin == queue_name(BatchKey(model="tiny-sd", kind="p2p", height=128, width=128, steps=12,
                                             scheduler="ddim"), "normal")
    assert json.loads(job.args[0])["id"] == edit.id
    assert js.load_payload(edit.id).id == edit.id
    assert edit.params["seeds"] == [7] and edit.params["steps"] == 12
    assert edit.queue_position == 0
    assert js.tenant_of(edit.id) == "default"


def test_get_is_tenant_scoped(js):
    edit = create(js, tenant="acme")
    assert js.get(edit.id, "acme") is not None
    assert js.get(edit.id, "other") is None
    assert js.get("nope") is None


def test_queue_position_counts_higher_priority_queues_of_the_same_key(js):
    low = create(js, priority="low")
    create(js, priority="high")
    create(js, priority="high")
    second_low = create(js, priority="low")
    assert js.get(low.id).queue_position == 2
    assert js.get(second_low.id).queue_position == 3


# ---------------------------------------------------------------------------------------------- transitions

def test_full_lifecycle_and_metrics(js, conn):
    edit = create(js)
    assert js.mark_processing(edit.id, batch_id="b1", batch_size=3, worker="w1") is True
    js.set_progress(edit.id, 4, 10)
    got = js.get(edit.id)
    assert got.status is EditStatus.processing and got.progress.step == 4 and got.started_at is not None
    assert got.metrics.attempts == 1 and got.metrics.batch_id == "b1" and got.metrics.batch_size == 3
    assert got.eta_seconds is not None
    results = [{"index": 0, "label": "a cat on a mat", "key": f"edits/{edit.id}/output-0.png", "width": 128,
                "height": 128, "seed": 7}]
    maps = [{"prompt_index": 0, "prompt": "a cat", "tokens": ["a", "cat"], "grid_key": f"edits/{edit.id}/attn-0.png",
             "array_key": f"edits/{edit.id}/attn-0.npy"}]
    js.mark_succeeded(edit.id, results=results, attention_maps=maps, run_seconds=2.0)
    done = js.get(edit.id)
    assert done.status is EditStatus.succeeded and done.completed_at is not None
    assert done.results[0].url.startswith("http") and done.results[0].seed == 7 and done.results[0].expires_at
    assert done.attention_maps[0].grid_url != done.attention_maps[0].array_url
    assert done.metrics.run_seconds == 2.0 and done.progress.step == done.progress.total
    assert conn.ttl(edit_key(edit.id)) > 0  # terminal records expire with the S3 retention
    # rolling stats now give queued edits an ETA, once a live worker serves the model
    assert create(js).eta_seconds is None
    beat(conn, "w1", ["tiny-sd"], ttl=60)
    assert create(js).eta_seconds is not None


def test_terminal_is_final(js):
    edit = create(js)
    js.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w")
    js.mark_canceled(edit.id)
    js.mark_succeeded(edit.id, results=[], attention_maps=[], run_seconds=1.0)
    js.mark_failed(edit.id, ErrorInfo(type="x", message="late"))
    assert js.mark_requeued(edit.id, "late reaper") is False
    js.set_progress(edit.id, 5, 10)
    final = js.get(edit.id)
    assert final.status is EditStatus.canceled and final.error is None and final.results == []
    assert js.mark_processing(edit.id, batch_id="b2", batch_size=1, worker="w2") is False
    assert js.is_cancel_requested(edit.id) is True


def test_duplicate_run_is_refused(js):
    edit = create(js)
    assert js.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w1")
    assert not js.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w2")
    assert js.get(edit.id).metrics.attempts == 1


def test_concurrent_terminal_writers_leave_exactly_one_outcome(js):
    edit = create(js)
    js.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w")
    barrier = threading.Barrier(8)

    def writer(i):
        barrier.wait()
        if i % 2:
            js.mark_succeeded(edit.id, results=[], attention_maps=[], run_seconds=1.0)
        else:
            js.mark_failed(edit.id, ErrorInfo(type="boom", message=str(i)))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    final = js.get(edit.id)
    assert final.status in (EditStatus.succeeded, EditStatus.failed)
    assert final.revision == 3  # created, processing, one terminal change


def test_requeue_after_crash_counts_attempts(js, conn):
    edit = create(js)
    js.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w")
    js.set_progress(edit.id, 3, 10)
    assert js.mark_requeued(edit.id, "worker died") is True
    requeued = js.get(edit.id)
    assert requeued.status is EditStatus.queued and requeued.progress is None
    js.reenqueue(edit.id)
    assert rq_queue_of(edit.id, conn).get_job_ids()[0] == edit.id
    assert js.mark_processing(edit.id, batch_id="b2", batch_size=1, worker="w2")
    assert js.get(edit.id).metrics.attempts == 2


def test_requeue_of_a_cancel_requested_edit_cancels_it(js):
    edit = create(js)
    js.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w")
    js.request_cancel(edit.id, "default")
    assert js.mark_requeued(edit.id, "worker died") is False
    assert js.get(edit.id).status is EditStatus.canceled


# ---------------------------------------------------------------------------------------------- cancel

def test_cancel_queued_removes_the_rq_job(js, conn):
    edit = create(js)
    queue = rq_queue_of(edit.id, conn)
    assert edit.id in queue.get_job_ids()
    canceled = js.request_cancel(edit.id, "default")
    assert canceled.status is EditStatus.canceled
    assert edit.id not in queue.get_job_ids() and queue.count == 0
    assert not conn.exists(Job.key_for(edit.id))  # never started: nothing of its RQ job is kept (issue 9, item 8)


def test_cancel_processing_sets_the_flag_for_the_worker(js):
    edit = create(js)
    js.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w")
    assert js.is_cancel_requested(edit.id) is False
    flagged = js.request_cancel(edit.id, "default")
    assert flagged.status is EditStatus.processing and flagged.cancel_requested
    assert js.is_cancel_requested(edit.id) is True
    js.mark_canceled(edit.id)
    assert js.get(edit.id).status is EditStatus.canceled


def test_cancel_terminal_conflicts_and_foreign_is_not_found(js):
    edit = create(js)
    js.mark_failed(edit.id, ErrorInfo(type="x", message="y"))
    with pytest.raises(EditConflict, match="already failed"):
        js.request_cancel(edit.id, "default")
    with pytest.raises(EditNotFound):
        js.request_cancel(edit.id, "someone-else")


# ---------------------------------------------------------------------------------------------- events

def test_every_change_is_published_in_order(js, conn):
    edit = create(js)
    pubsub = conn.pubsub()
    pubsub.subscribe(events_channel(edit.id))
    confirmed = pubsub.get_message(timeout=10)  # subscribed for sure, instead of sleeping and hoping
    assert confirmed is not None and confirmed["type"] == "subscribe"
    js.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w")
    for step in range(1, 4):
        js.set_progress(edit.id, step, 3)
    js.mark_succeeded(edit.id, results=[], attention_maps=[], run_seconds=0.5)
    seen = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (not seen or seen[-1]["status"] != "succeeded"):
        message = pubsub.get_message(timeout=0.5)
        if message:
            seen.append(json.loads(message["data"]))
    revisions = [m["revision"] for m in seen]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    assert [m["status"] for m in seen][0] == "processing" and seen[-1]["status"] == "succeeded"
    assert any(m["progress"] and m["progress"]["step"] == 3 for m in seen)


def test_listeners_are_told_of_changes_with_event_names(js):
    calls = []
    js.add_listener(lambda r, edit, event, tenant: calls.append((edit.status.value, event, tenant)))
    payload = p2p_payload(new_edit_id(), "acme")
    edit, _ = js.create(payload, webhook=WebhookSpec(url="https://example.com/hook"), idempotency_key=None)
    js.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w")
    js.set_progress(edit.id, 1, 10)
    js.mark_succeeded(edit.id, results=[], attention_maps=[], run_seconds=1.0)
    assert calls == [("processing", "started", "acme"), ("processing", "progress", "acme"),
                     ("succeeded", "completed", "acme")]


def test_a_failing_listener_does_not_fail_the_transition(js):
    def broken(r, edit, event, tenant):
        raise RuntimeError("watcher bug")

    js.add_listener(broken)
    edit, _ = js.create(p2p_payload(new_edit_id()), webhook=WebhookSpec(url="https://example.com/h"),
                        idempotency_key=None)
    js.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w")
    assert js.get(edit.id).webhook.url == "https://example.com/h"


def test_webhook_delivery_state_is_recorded(js):
    edit, _ = js.create(p2p_payload(new_edit_id()), webhook=WebhookSpec(url="https://example.com/h"),
                        idempotency_key=None)
    js.record_webhook_delivery(edit.id, ok=True)
    js.record_webhook_delivery(edit.id, ok=False, error="HTTP 500")
    state = js.get(edit.id).webhook
    assert (state.delivered, state.failed, state.last_error) == (1, 1, "HTTP 500")


# ---------------------------------------------------------------------------------------------- idempotency

def test_idempotent_create_returns_the_first_edit(js, conn):
    first, created = js.create(p2p_payload(new_edit_id()), webhook=None, idempotency_key="key-1")
    again, created_again = js.create(p2p_payload(new_edit_id()), webhook=None, idempotency_key="key-1")
    assert created and not created_again and again.id == first.id
    assert conn.exists("editserve:idem:default:key-1")
    with pytest.raises(IdempotencyConflict):
        js.create(p2p_payload(new_edit_id(), target="a fox on a mat"), webhook=None, idempotency_key="key-1")
    # keys are per tenant
    other, created_other = js.create(p2p_payload(new_edit_id(), "acme"), webhook=None, idempotency_key="key-1")
    assert created_other and other.id != first.id


def test_concurrent_duplicates_create_one_edit_and_one_job(js, conn):
    barrier = threading.Barrier(10)
    results = []

    def submit():
        barrier.wait()
        results.append(js.create(p2p_payload(new_edit_id()), webhook=None, idempotency_key="race"))

    threads = [threading.Thread(target=submit) for _ in range(10)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len({edit.id for edit, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert sum(conn.llen(k) for k in conn.scan_iter("rq:queue:edits.*")) == 1


# ---------------------------------------------------------------------------------------------- listing

def test_list_newest_first_with_cursor_and_filters(js):
    ids = [create(js).id for _ in range(5)]
    other = create(js, model="sd14")
    create(js, tenant="acme")
    js.mark_failed(ids[0], ErrorInfo(type="x", message="y"))
    page1 = js.list("default", limit=2)
    page2 = js.list("default", limit=2, cursor=page1.next_cursor)
    page3 = js.list("default", limit=2, cursor=page2.next_cursor)
    seen = [e.id for e in page1.data + page2.data + page3.data]
    assert seen == [other.id] + ids[::-1] and page3.next_cursor is None
    assert [e.id for e in js.list("default", status="failed").data] == [ids[0]]
    assert [e.id for e in js.list("default", model="sd14").data] == [other.id]
    assert js.list("default", kind="ip2p").data == []
    assert len(js.list("acme").data) == 1
    with pytest.raises(ValueError):
        js.list("default", cursor="garbage!")


# ---------------------------------------------------------------------------------------------- queues

def test_queue_names_parse_and_discover_by_priority(js, conn):
    key = BatchKey(model="tiny-sd", kind="p2p", height=128, width=128, steps=10, scheduler="ddim")
    assert parse_queue_name(queue_name(key, "high")) == ("high", "tiny-sd")
    assert parse_queue_name("edits.low.tiny-sd:p2p:128x128:s10:ddim") == ("low", "tiny-sd")  # the older layout
    assert parse_queue_name("webhooks") is None
    with pytest.raises(ValueError):
        queue_name(key, "urgent")
    create(js, priority="low")
    create(js, priority="high")
    create(js, steps=20)  # another batch key, the same model: the same queue
    create(js, model="sd14")
    groups = discover(conn)
    assert groups[0].model == "tiny-sd"
    assert groups[0].queue_names == [queue_name(key, "high"), queue_name(key, "normal"), queue_name(key, "low")]
    assert {g.model for g in groups} == {"tiny-sd", "sd14"}
    assert [g.model for g in discover(conn, models=["sd14"])] == ["sd14"]
    flat = queue_names_by_priority(groups)
    assert flat[0].startswith("edits.high.") and flat[-1].startswith("edits.low.")


def test_an_orphaned_idempotency_claim_is_released(js, conn, monkeypatch):
    import service.jobstore as jobstore_module

    monkeypatch.setattr(jobstore_module, "IDEMPOTENCY_WAIT_SECONDS", 0.1)
    payload = p2p_payload(new_edit_id())
    fingerprint = jobstore_module.request_fingerprint(payload)
    conn.set("editserve:idem:default:crashed", json.dumps({"edit_id": "ghost", "fingerprint": fingerprint}))
    retry = r"^a request with this Idempotency-Key did not complete; retry the request$"
    with pytest.raises(EditConflict, match=retry):
        js.create(payload, webhook=None, idempotency_key="crashed")
    edit, created = js.create(payload, webhook=None, idempotency_key="crashed")
    assert created and edit.id == payload.id


def test_in_progress_gauge_falls_back_when_this_process_requeues_its_edit(redis_url, s3_server):
    """A worker that gives an edit back (second signal, split retry) must not leave it counted as running."""
    from editserve.contract import BatchKey, JobPayload, P2PEditRequest
    from datetime import datetime, timezone
    import redis as _redis
    from service import metrics
    from service.config import Settings
    from service.jobstore import JobStore, new_edit_id

    store = JobStore(_redis.Redis.from_url(redis_url), Settings(redis_url=redis_url))
    key = BatchKey(model="tiny-sd", kind="p2p", height=64, width=64, steps=4, scheduler="ddim")
    payload = JobPayload(id=new_edit_id(), tenant="t", request=P2PEditRequest(source_prompt="a cat",
                         target_prompts=["a dog"]), batch_key=key, seeds=[1], created_at=datetime.now(timezone.utc))
    store.create(payload, webhook=None, idempotency_key=None)
    before = metrics.jobs_in_progress._value.get()
    assert store.mark_processing(payload.id, batch_id="b", batch_size=1, worker="w")
    assert metrics.jobs_in_progress._value.get() == before + 1
    assert store.mark_requeued(payload.id, "worker stopping")
    assert metrics.jobs_in_progress._value.get() == before
