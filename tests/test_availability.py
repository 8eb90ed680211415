"""Honest availability (issue 13) over real HTTP and Redis: ``/v1/models`` counts live workers (heartbeats) and
queued edits per model; a queued edit says how many workers serve its model and, with none, has no ETA
(never one borrowed from statistics)."""

from __future__ import annotations

import redis
from gateway_support import gateway_app, gateway_settings, live, rconn, store  # noqa: F401  (fixtures)

from service.liveness import beat, leave

P2P = {"kind": "p2p", "source_prompt": "a cat riding a bike", "target_prompts": ["a dog riding a bike"],
       "steps": 4}


def models(client) -> dict:
    return {m["name"]: m for m in client.get("/v1/models").json()["data"]}


def test_models_and_queued_edits_tell_live_workers_and_eta_only_with_one(live, store, rconn: redis.Redis):
    with live.client() as client:
        before = models(client)
        assert before["tiny-sd"]["workers"] == 0 and before["tiny-sd"]["queued"] == 0
        done = client.post("/v1/edits", json=P2P).json()  # a finished run gives the ETA statistics
        store.mark_processing(done["id"], batch_id="b", batch_size=1, worker="w")
        store.mark_succeeded(done["id"], results=[], attention_maps=[], run_seconds=0.4)

        queued_before = models(client)["tiny-sd"]["queued"]  # the finished one's RQ entry is no worker's to pop
        waiting = client.post("/v1/edits", json=P2P).json()
        assert waiting["status"] == "queued" and waiting["workers"] == 0 and waiting["eta_seconds"] is None
        assert client.get(f"/v1/edits/{waiting['id']}").json()["eta_seconds"] is None
        listed = models(client)
        assert listed["tiny-sd"]["workers"] == 0 and listed["tiny-sd"]["queued"] == queued_before + 1
        assert listed["tiny-ip2p"]["queued"] == 0

        beat(rconn, "gpu-1", ["tiny-sd"], ttl=60)
        beat(rconn, "gpu-2", ["tiny-sd", "tiny-ip2p"], ttl=60)
        served = client.get(f"/v1/edits/{waiting['id']}").json()
        assert served["workers"] == 2 and served["eta_seconds"] is not None
        listed = models(client)
        assert (listed["tiny-sd"]["workers"], listed["tiny-ip2p"]["workers"]) == (2, 1)

        leave(rconn, "gpu-1", ["tiny-sd"])
        leave(rconn, "gpu-2", ["tiny-sd", "tiny-ip2p"])
        assert client.get(f"/v1/edits/{waiting['id']}").json()["workers"] == 0
        assert client.get(f"/v1/edits/{done['id']}").json()["workers"] is None  # only queued edits say it
