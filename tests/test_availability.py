"""Honest availability (issue 13) over real HTTP, Redis, S3 and an in-process worker with the tiny models:
``/v1/models`` counts live workers (heartbeats), queued edits and recent throughput per model; a queued edit
says how many workers serve its model and, with none, has no ETA (never one borrowed from statistics); ETAs
come from the same kind of work only; a model may be set to refuse edits while no live worker serves it."""

from __future__ import annotations

import base64

import pytest
import redis
from gateway_support import gateway_app, live, make_settings, png, rconn, store  # noqa: F401  (fixtures)
from worker_support import wait_until

from editserve import cli
from service.keys import eta_stats_keys
from service.liveness import beat, leave

REFUSING = ["tiny-sd-smooth", "tiny-ip2p"]  # set to require a live worker in this module's gateway


@pytest.fixture
def gateway_settings(redis_url, s3):
    return make_settings(redis_url, s3, require_live_worker=REFUSING, no_worker_retry_after_seconds=7)

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
        assert (listed["tiny-sd"]["require_live_worker"], listed["tiny-ip2p"]["require_live_worker"]) == (False, True)

        leave(rconn, "gpu-1", ["tiny-sd"])
        leave(rconn, "gpu-2", ["tiny-sd", "tiny-ip2p"])
        assert client.get(f"/v1/edits/{waiting['id']}").json()["workers"] == 0
        assert client.get(f"/v1/edits/{done['id']}").json()["workers"] is None  # only queued edits say it


P2P64 = {**P2P, "height": 64, "width": 64}
IP2P64 = {"kind": "ip2p", "instruction": "make it snowy", "resolution": 64, "steps": 4,
          "image": base64.b64encode(png(64, 64)).decode()}


def run_all(worker, client, ids: list[str]) -> list[dict]:
    """Let the in-process worker run batches until every edit in ``ids`` is terminal; their final views."""
    def finished():
        worker.run_once(0.5)
        edits = [client.get(f"/v1/edits/{i}").json() for i in ids]
        return edits if all(e["status"] in ("succeeded", "failed", "canceled") for e in edits) else None
    edits = wait_until(finished, timeout=300, interval=0, what=f"edits {ids} to finish")
    assert [e["status"] for e in edits] == ["succeeded"] * len(ids), [e.get("error") for e in edits]
    return edits


def stats(connection: redis.Redis, key: str) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in connection.hgetall(key).items()}


def test_etas_come_from_the_same_kind_of_work_and_models_report_throughput(live, rconn, make_worker, capsys):
    worker = make_worker()
    beat(rconn, "gpu-1", ["tiny-sd", "tiny-ip2p"], ttl=600)  # the in-process worker runs no beacon
    with live.client() as client:
        idle = models(client)
        assert idle["tiny-ip2p"]["throughput"]["edits"] == 0 and idle["tiny-sd"]["throughput"]["edits"] == 0
        assert idle["tiny-ip2p"]["throughput"]["window_seconds"] > 0

        ip2p = run_all(worker, client, [client.post("/v1/edits", json=IP2P64).json()["id"] for _ in range(2)])
        listed = models(client)
        made = listed["tiny-ip2p"]["throughput"]
        assert (made["edits"], made["steps"]) == (2, 8)
        assert made["images"] == sum(len(e["results"]) for e in ip2p) >= 2
        assert made["edits_per_minute"] > 0 and made["images_per_minute"] > 0 and made["steps_per_second"] > 0
        assert listed["tiny-sd"]["throughput"]["edits"] == 0  # nothing borrowed across models either
        buckets = list(rconn.scan_iter("editserve:throughput:*"))  # per-minute buckets that expire by themselves
        assert buckets and all(0 < rconn.ttl(k) <= 300 + 60 for k in buckets)
        assert cli.main(["--url", live.url, "models"]) == 0  # the CLI's table shows the same figures
        row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("tiny-ip2p "))
        assert row[5:7] == ["1", "0"] and float(row[7]) > 0 and "refused without a worker" in " ".join(row)

        # IP2P statistics exist now; a P2P edit, queued with a live worker, has none of its own: no ETA
        p2p = client.post("/v1/edits", json=P2P64).json()
        assert p2p["status"] == "queued" and p2p["workers"] == 1 and p2p["eta_seconds"] is None
        assert client.get(f"/v1/edits/{p2p['id']}").json()["eta_seconds"] is None
        queued_ip2p = client.post("/v1/edits", json=IP2P64).json()  # while IP2P's own figures give one
        assert queued_ip2p["eta_seconds"] is not None
        run_all(worker, client, [p2p["id"], queued_ip2p["id"]])

        # P2P ran at 4 steps: a 4-step P2P edit uses that batch shape, a 6-step one the per-step cost
        same = client.post("/v1/edits", json=P2P64).json()
        exact = stats(rconn, eta_stats_keys("tiny-sd", "p2p", 64, 64, 4, "ddim")[0])
        assert same["eta_seconds"] == round(
            4 * exact["step_seconds"] + same["queue_position"] * exact["job_seconds"], 2)
        longer = client.post("/v1/edits", json={**P2P64, "steps": 6}).json()
        shape = stats(rconn, eta_stats_keys("tiny-sd", "p2p", 64, 64, 6, "ddim")[1])
        assert "job_seconds" not in shape  # a per-job time means nothing at another step count
        assert longer["eta_seconds"] == round(
            6 * shape["step_seconds"] + longer["queue_position"] * 6 * shape["job_step_seconds"], 2)
        other_sampler = client.post("/v1/edits", json={**P2P64, "scheduler": "euler"}).json()
        assert other_sampler["workers"] == 1 and other_sampler["eta_seconds"] is None
        assert models(client)["tiny-sd"]["throughput"]["edits"] == 1
    leave(rconn, "gpu-1", ["tiny-sd", "tiny-ip2p"])


def test_a_model_set_to_require_a_live_worker_refuses_edits_while_none_serves_it(live, rconn):
    def refused(response, model):
        body = response.json()["error"]
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "7"
        assert (body["type"], body["field"]) == ("no_live_worker", "model") and repr(model) in body["message"]

    with live.client() as client:
        records = len(list(rconn.scan_iter("editserve:edit:*")))
        refused(client.post("/v1/edits", json={**P2P64, "model": "tiny-sd-smooth"}), "tiny-sd-smooth")
        refused(client.post("/v1/edits", files={"image": ("in.png", png(64, 64), "image/png")},
                            data={"request": '{"kind": "ip2p", "instruction": "make it snowy", "resolution": 64}'}),
                "tiny-ip2p")
        photo = base64.b64encode(png(64, 64)).decode()
        inversion = {"caption": "a cat", "model": "tiny-sd-smooth", "image": photo, "resolution": 64, "steps": 4}
        refused(client.post("/v1/inversions", json=inversion), "tiny-sd-smooth")  # inversions run on workers too
        assert len(list(rconn.scan_iter("editserve:edit:*"))) == records  # nothing was queued

        default = client.post("/v1/edits", json=P2P64)  # tiny-sd keeps the default: accepted, waits for a worker
        assert default.status_code == 202 and default.json()["workers"] == 0

        beat(rconn, "gpu-9", ["tiny-sd-smooth"], ttl=60)
        served = client.post("/v1/edits", json={**P2P64, "model": "tiny-sd-smooth"})
        assert served.status_code == 202 and served.json()["workers"] == 1
        assert client.post("/v1/inversions", json=inversion).status_code == 202
        leave(rconn, "gpu-9", ["tiny-sd-smooth"])
        refused(client.post("/v1/edits", json={**P2P64, "model": "tiny-sd-smooth"}), "tiny-sd-smooth")
