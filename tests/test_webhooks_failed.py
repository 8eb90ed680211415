"""The failed-webhook list (``editserve:webhooks:failed``): what lands there, its bounds, replay, and the CLI
(``python -m service.webhooks failed`` / ``replay``), against the session's Redis and a loopback receiver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rq import Queue, SimpleWorker
from test_webhooks_delivery import (  # noqa: F401 (receiver, redis: fixtures)
    Reply,
    delivery,
    make_settings,
    receiver,
    redis,
    state,
    use_settings,
)

from editserve.webhooks import verify
from service.webhooks import delivery as wh_delivery
from service.webhooks import events as wh_events
from service.webhooks import failed as wh_failed

REPO = Path(__file__).resolve().parent.parent


def give_up(redis, settings, url: str, edit_id: str = "ed1", event: str = "completed") -> wh_events.AttemptResult:
    """Emit-like bookkeeping (pending +1), then the last allowed attempt (it fails if the receiver says so)."""
    redis.hincrby(wh_events.state_key(edit_id), "pending", 1)
    sent = delivery(url, edit_id, event, attempt=settings.webhooks.max_attempts)
    result = wh_delivery.Deliverer(settings, redis).run(sent)
    result.delivery = sent
    return result


def test_exhausted_and_refused_deliveries_are_listed_newest_first(redis, redis_url, receiver):
    settings = make_settings(redis_url, max_attempts=3)
    receiver.script = [Reply(500), Reply(410), Reply(500)]
    exhausted = give_up(redis, settings, receiver.url(), "ed1")
    assert exhausted.outcome is wh_events.DeliveryOutcome.failed
    assert give_up(redis, settings, receiver.url(), "ed2").outcome is wh_events.DeliveryOutcome.gone  # not listed
    assert give_up(redis, settings, receiver.url(), "ed3", "progress").outcome is wh_events.DeliveryOutcome.failed  # idem
    refused = give_up(redis, make_settings(redis_url, allow_hosts=[]), "http://10.0.0.1/hook", "ed4")
    assert refused.outcome is wh_events.DeliveryOutcome.refused

    entries = wh_failed.list_failed(redis, settings=settings)
    assert [e.msg_id for e in entries] == ["msg_ed4_completed", "msg_ed1_completed"]
    newest, oldest = entries
    assert newest.outcome == "refused" and newest.error.startswith("refused:") and newest.status_code is None
    assert (oldest.outcome, oldest.status_code, oldest.error, oldest.delivery.attempt) == ("failed", 500,
                                                                                          "HTTP 500: ok", 3)
    assert oldest.delivery == exhausted.delivery  # the whole delivery, body included
    summary = oldest.summary()
    assert "body" not in json.dumps(summary) and summary["webhook_id"] == "msg_ed1_completed"
    assert summary["attempts"] == 3 and summary["url"] == receiver.url()
    assert 0 < redis.ttl(wh_events.FAILED_KEY) <= settings.webhooks.state_ttl_seconds
    assert wh_failed.find_failed(redis, oldest.id, settings=settings) == oldest
    assert wh_failed.find_failed(redis, "msg_nope", settings=settings) is None


def test_the_list_is_bounded_in_size_and_age(redis, redis_url, receiver, monkeypatch):
    settings = make_settings(redis_url, max_attempts=1)
    monkeypatch.setattr(wh_failed, "FAILED_MAX_ENTRIES", 3)
    redis.xadd(wh_events.FAILED_KEY, {"delivery": json.dumps(vars(delivery(receiver.url(), "old")))},
               id=f"{int((time.time() - settings.webhooks.state_ttl_seconds - 5) * 1000)}-0")
    assert wh_failed.list_failed(redis, settings=settings) == []  # too old to show, even before it is trimmed
    receiver.script = [Reply(500)] * 5
    for i in range(5):
        give_up(redis, settings, receiver.url(), f"ed{i}")
    assert [e.delivery.edit_id for e in wh_failed.list_failed(redis, settings=settings)] == ["ed4", "ed3", "ed2"]
    assert redis.xlen(wh_events.FAILED_KEY) == 3
    assert [e.delivery.edit_id for e in wh_failed.list_failed(redis, 2, settings=settings)] == ["ed4", "ed3"]


def test_replay_requeues_the_same_event_and_it_can_fail_again(redis, redis_url, receiver, monkeypatch):
    settings = make_settings(redis_url, max_attempts=2, backoff_seconds=[0.01])
    use_settings(monkeypatch, settings)
    receiver.script = [Reply(503)]
    give_up(redis, settings, receiver.url())
    [entry] = wh_failed.list_failed(redis, settings=settings)
    assert state(redis)["pending"] == "0" and state(redis)["failed"] == "1"

    replayed = wh_failed.replay_failed(redis, "msg_ed1_completed", settings=settings)
    assert replayed == entry and wh_failed.list_failed(redis, settings=settings) == []
    [job] = Queue(wh_events.QUEUE_NAME, connection=redis).get_jobs()
    assert job.args[0] == {**vars(entry.delivery), "attempt": 1}  # attempts start over
    assert state(redis)["pending"] == "1"
    with pytest.raises(KeyError):
        wh_failed.replay_failed(redis, "msg_ed1_completed", settings=settings)  # replayed once, not twice

    SimpleWorker([Queue(wh_events.QUEUE_NAME, connection=redis)], connection=redis).work(burst=True)
    [request] = receiver.requests[1:]
    assert request.headers["webhook-id"] == "msg_ed1_completed" and request.body == receiver.requests[0].body
    verify(settings.webhooks.secret, request.headers, request.body)
    s = state(redis)
    assert (s["delivered"], s["failed"], s["pending"]) == ("1", "1", "0")

    # A replay that fails again (all its attempts) is back in the list, by its entry id this time.
    receiver.script = [Reply(500), Reply(500)]
    give_up(redis, settings, receiver.url())
    [again] = wh_failed.list_failed(redis, settings=settings)
    wh_failed.replay_failed(redis, again.id, settings=settings)
    assert wh_failed.list_failed(redis, settings=settings) == [] and len(Queue(wh_events.QUEUE_NAME, connection=redis)) == 1


def run_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDITSERVE_REDIS_URL": redis_url, "EDITSERVE_WEBHOOKS__METRICS_PORT": "0"}
    return subprocess.run([sys.executable, "-m", "service.webhooks", "--log-level", "WARNING", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)


def test_cli_lists_and_replays(redis, redis_url, receiver):
    settings = make_settings(redis_url, max_attempts=1)
    receiver.script = [Reply(500), Reply(500)]
    give_up(redis, settings, receiver.url(), "ed1")
    give_up(redis, settings, receiver.url(), "ed2", "started")

    listed = run_cli(redis_url, "failed", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["webhook_id"] for r in rows] == ["msg_ed2_started", "msg_ed1_completed"]
    assert rows[1]["error"] == "HTTP 500: ok" and "body" not in listed.stdout

    table = run_cli(redis_url, "failed")
    assert table.returncode == 0 and "msg_ed1_completed" in table.stdout and "HTTP 500" in table.stdout
    assert "2 failed deliveries" in table.stderr

    replay = run_cli(redis_url, "replay", "msg_ed1_completed", "msg_unknown")
    assert replay.returncode == 1
    assert "queued again: msg_ed1_completed" in replay.stdout and "msg_unknown" in replay.stderr
    assert [e.msg_id for e in wh_failed.list_failed(redis, settings=settings)] == ["msg_ed2_started"]
    assert [j.args[0]["msg_id"] for j in Queue(wh_events.QUEUE_NAME, connection=redis).get_jobs()] == ["msg_ed1_completed"]


def test_admin_api_lists_and_replays(redis, redis_url, receiver):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import AuthSettings

    settings = make_settings(redis_url, max_attempts=1)
    settings.auth = AuthSettings(admin_token="admin-secret-token")
    receiver.script = [Reply(500), Reply(500)]
    give_up(redis, settings, receiver.url(), "ed1")
    give_up(redis, settings, receiver.url(), "ed2", "started")
    admin = {"Authorization": "Bearer admin-secret-token"}
    with TestClient(create_app(settings, prepare_bucket=False)) as client:
        assert client.get("/v1/admin/webhooks/failed").status_code == 401
        listed = client.get("/v1/admin/webhooks/failed", headers=admin)
        assert listed.status_code == 200
        rows = listed.json()["data"]
        assert [r["webhook_id"] for r in rows] == ["msg_ed2_started", "msg_ed1_completed"]
        assert rows[1]["error"] == "HTTP 500: ok" and rows[1]["attempts"] == 1 and "body" not in listed.text
        assert client.get("/v1/admin/webhooks/failed?limit=1", headers=admin).json()["data"] == rows[:1]
        assert client.get("/v1/admin/webhooks/failed?tenant=nobody", headers=admin).json()["data"] == []
        mine = client.get(f"/v1/admin/webhooks/failed?tenant={rows[0]['tenant']}&limit=5", headers=admin)
        assert mine.json()["data"] == rows
        assert client.get("/v1/admin/webhooks/failed?limit=0", headers=admin).status_code == 422

        replayed = client.post(f"/v1/admin/webhooks/failed/{rows[1]['id']}/replay", headers=admin)
        assert replayed.status_code == 200 and replayed.json() == rows[1]
        again = client.post("/v1/admin/webhooks/failed/msg_ed1_completed/replay", headers=admin)
        assert again.status_code == 404 and again.json()["error"]["type"] == "not_found"
    assert [e.msg_id for e in wh_failed.list_failed(redis, settings=settings)] == ["msg_ed2_started"]
    [job] = Queue(wh_events.QUEUE_NAME, connection=redis).get_jobs()
    assert job.args[0]["msg_id"] == "msg_ed1_completed" and job.args[0]["attempt"] == 1
