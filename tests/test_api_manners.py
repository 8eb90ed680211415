"""API manners (issue 13) over real HTTP with real Redis and S3: a bare ``Prefer: wait``, an idempotent
second cancel, operation ids that read well in generated clients."""

from __future__ import annotations

import time

import pytest
from gateway_support import gateway_app, live, make_settings, rconn, store  # noqa: F401  (fixtures)

from service.streams import wait_seconds

P2P = {"kind": "p2p", "source_prompt": "a cat riding a bike", "target_prompts": ["a dog riding a bike"],
       "steps": 4}


@pytest.fixture
def gateway_settings(redis_url, s3):
    return make_settings(redis_url, s3, limits={"default_wait_seconds": 1, "max_wait_seconds": 30})


def test_bare_prefer_wait_waits_the_default_and_says_so(live):
    with live.client() as client:
        started = time.monotonic()
        response = client.post("/v1/edits", json=P2P, headers={"Prefer": "wait"})
        elapsed = time.monotonic() - started
        assert response.status_code == 202, response.text
        assert response.headers["preference-applied"] == "wait=1"
        assert elapsed > 0.9  # held for the default, not answered at once
        numbered = client.post("/v1/edits", json=P2P, headers={"Prefer": "respond-async, wait=0"})
        assert numbered.headers["preference-applied"] == "wait=0"
        plain = client.post("/v1/edits", json=P2P)
        assert "preference-applied" not in plain.headers


def test_wait_preference_parsing():
    assert wait_seconds(["wait"], cap=60, default=5) == 5
    assert wait_seconds(["wait"], cap=3, default=5) == 3
    assert wait_seconds(["wait"], cap=7) == 7
    assert wait_seconds(["wait=2"], cap=60, default=5) == 2
    assert wait_seconds(["respond-async"], cap=60, default=5) is None
    assert wait_seconds(["wait=soon"], cap=60, default=5) is None


def test_second_cancel_of_a_canceled_edit_answers_the_edit(live, store):
    with live.client() as client:
        edit = client.post("/v1/edits", json=P2P).json()
        first = client.post(f"/v1/edits/{edit['id']}/cancel")
        again = client.post(f"/v1/edits/{edit['id']}/cancel")
        assert first.status_code == again.status_code == 200
        assert again.json()["id"] == edit["id"] and again.json()["status"] == "canceled"
        assert again.json()["completed_at"] == first.json()["completed_at"]

        done = client.post("/v1/edits", json=P2P).json()
        store.mark_processing(done["id"], batch_id="b", batch_size=1, worker="w")
        store.mark_succeeded(done["id"], results=[], attention_maps=[], run_seconds=0.1)
        refused = client.post(f"/v1/edits/{done['id']}/cancel")
        assert refused.status_code == 409 and "already succeeded" in refused.json()["error"]["message"]


def test_operation_ids_read_well(live):
    with live.client() as client:
        spec = client.get("/openapi.json").json()
    ids = {(path, method): op["operationId"] for path, ops in spec["paths"].items() for method, op in ops.items()}
    assert ids[("/v1/edits", "post")] == "createEdit"
    assert ids[("/v1/edits/{edit_id}", "get")] == "getEdit"
    assert ids[("/v1/edits", "get")] == "listEdits"
    assert ids[("/v1/edits/{edit_id}/cancel", "post")] == "cancelEdit"
    assert ids[("/v1/edits/{edit_id}/events", "get")] == "streamEditEvents"
    assert ids[("/v1/models", "get")] == "listModels"
    assert len(set(ids.values())) == len(ids)
    assert all("_" not in op_id for op_id in ids.values())


def test_models_list_their_schedulers_and_requests_may_name_them(live):
    with live.client() as client:
        models = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
        assert models["tiny-ip2p"]["scheduler"] == "euler_a" and models["tiny-sd"]["scheduler"] == "ddim"
        assert {"dpmpp_2m", "dpmpp_2m_karras", "unipc", "euler", "euler_a", "ddim", "pndm"} <= set(
            models["tiny-sd"]["schedulers"])
        accepted = client.post("/v1/edits", json=dict(P2P, scheduler="dpmpp_2m_karras", negative_prompt="blurry"))
        assert accepted.status_code == 202 and accepted.json()["params"]["scheduler"] == "dpmpp_2m_karras"
        refused = client.post("/v1/edits", json=dict(P2P, scheduler="lms"))
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "scheduler"
