"""``Cancel-After`` on POST /v1/edits (issue 13) over real HTTP and Redis: the deadline is kept in Redis and the
reaper's pass cancels a queued edit once it has passed, leaves one before its deadline alone, and never
touches an edit that finished first; a bad header is a 422 naming ``Cancel-After``."""

from __future__ import annotations

import time

import pytest
import redis
from gateway_support import gateway_app, gateway_settings, live, store  # noqa: F401  (fixtures)

from service.cancel_after import cancel_deadline, parse_cancel_after
from worker.runtime.reaper import Reaper

P2P = {"kind": "p2p", "source_prompt": "a cat riding a bike", "target_prompts": ["a dog riding a bike"],
       "steps": 4}


def reaper_for(gateway_app) -> Reaper:
    svc = gateway_app.state.services
    return Reaper(redis.Redis.from_url(svc.settings.redis_url), svc.settings, svc.jobstore)


def test_a_queued_edit_is_canceled_by_the_reaper_once_its_deadline_passed(live, gateway_app, store):
    reaper = reaper_for(gateway_app)
    with live.client() as client:
        soon = client.post("/v1/edits", json=P2P, headers={"Cancel-After": "300ms"}).json()
        later = client.post("/v1/edits", json=P2P, headers={"Cancel-After": "1m"}).json()
        plain = client.post("/v1/edits", json=P2P).json()
        finished = client.post("/v1/edits", json=P2P, headers={"Cancel-After": "0.2"}).json()
        store.mark_processing(finished["id"], batch_id="b", batch_size=1, worker="w")
        store.mark_succeeded(finished["id"], results=[], attention_maps=[], run_seconds=0.1)
        assert cancel_deadline(reaper.connection, later["id"]) > time.time() + 50
        assert cancel_deadline(reaper.connection, plain["id"]) is None

        time.sleep(0.5)
        report = reaper.run_once()
        assert report.canceled_after == [soon["id"]]
        states = {e["id"]: client.get(f"/v1/edits/{e['id']}").json()["status"]
                  for e in (soon, later, plain, finished)}
        assert states == {soon["id"]: "canceled", later["id"]: "queued", plain["id"]: "queued",
                          finished["id"]: "succeeded"}
        assert cancel_deadline(reaper.connection, soon["id"]) is None  # swept once, not again
        assert cancel_deadline(reaper.connection, finished["id"]) is None
        assert reaper.run_once().canceled_after == []


@pytest.mark.parametrize("value", ["soon", "0", "-5", "1m30", "inf", "9" * 80])
def test_a_bad_cancel_after_is_refused_naming_the_header(live, value):
    with live.client() as client:
        response = client.post("/v1/edits", json=P2P, headers={"Cancel-After": value})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "Cancel-After"


def test_cancel_after_accepts_seconds_and_go_durations():
    assert parse_cancel_after("30") == 30 and parse_cancel_after("2.5") == 2.5
    assert parse_cancel_after("1m30s") == 90 and parse_cancel_after("500ms") == 0.5
    assert parse_cancel_after("1h") == 3600
