"""Dataset jobs (IP2P data engine) in-process: the HTTP API validates and stores a job, the driver fans it out
into low-priority P2P edits that an in-process worker batches and scores, and the output in S3 (WebDataset
shards, metadata.jsonl, manifest) loads back with the `webdataset` reader. Real Redis, S3, tiny models."""

from __future__ import annotations

import io
import json

import pytest
import webdataset as wds
from fastapi.testclient import TestClient
from gateway_support import make_settings as gateway_make_settings
from PIL import Image

from editserve.contract import EditStatus
from service.datasets import DatasetStore, triplet_plan
from service.keys import edit_key
from worker.runtime.datasets import DatasetDriver
from worker.scoring.selection import PairScores, Thresholds, keep_and_rank

SIZE, STEPS = 64, 3
TRIPLETS = [
    {"input": "a photo of a cat", "instruction": "make it a dog", "output": "a photo of a dog"},
    {"input": "a red car on a road", "instruction": "make it blue", "output": "a blue car on a road"},
    {"input": "a house in summer", "instruction": "add snow", "output": "a house in winter with snow"},
]
KEEP_ALL = {"image_image": -1.0, "image_caption": -1.0, "directional": -1.0}


def job_body(**overrides) -> dict:
    body = {"triplets": TRIPLETS, "samples_per_triplet": 3, "keep_best": 2, "steps": STEPS, "height": SIZE,
            "width": SIZE, "seed": 5, "thresholds": KEEP_ALL}
    body.update(overrides)
    return body


@pytest.fixture
def gateway(redis_url, s3_server):
    from service.app import create_app

    settings = gateway_make_settings(redis_url, s3_server, datasets={"max_triplets": 5, "max_samples": 40,
                                                                      "max_active_per_tenant": 1})
    with TestClient(create_app(settings, prepare_bucket=False)) as client:
        client.settings = settings
        yield client


def run_until_done(client, dataset_id, driver, worker, rounds=200) -> dict:
    for _ in range(rounds):
        driver.tick()
        body = client.get(f"/v1/datasets/{dataset_id}").json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            return body
        worker.run_once(0.3)
    raise AssertionError(f"dataset did not finish: {body}")


def test_dataset_job_end_to_end_output_loads_back(gateway, make_worker, tmp_path):
    worker = make_worker()
    driver = DatasetDriver(worker.connection, worker.settings, store=worker.store, storage=worker.storage)
    created = gateway.post("/v1/datasets", json=job_body())
    assert created.status_code == 202, created.text
    dataset_id = created.json()["id"]
    assert created.headers["location"] == f"/v1/datasets/{dataset_id}"
    assert created.json()["progress"] == {"done": 0, "total": 3}

    done = run_until_done(gateway, dataset_id, driver, worker)
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"done": 3, "total": 3}
    assert done["counts"] == {"samples": 9, "kept": 6, "failed": 0, "triplets_with_pairs": 3}
    assert done["random_weights"] is True

    storage = worker.storage
    prefix = f"datasets/{dataset_id}/"
    manifest = json.loads(storage.get_bytes(prefix + "manifest.json"))
    assert manifest["counts"]["kept"] == 6 and manifest["format"] == "webdataset"
    assert sum(s["pairs"] for s in manifest["shards"]) == 6
    lines = [json.loads(line) for line in storage.get_bytes(prefix + "metadata.jsonl").splitlines()]
    assert len(lines) == 6 and len({line["key"] for line in lines}) == 6

    # every sample ran as an ordinary low-priority P2P edit with CLIP scores; the kept ones are the best two
    # by directional similarity of each triplet, with the plan's seed, fraction and guidance
    for index, triplet in enumerate(TRIPLETS):
        plan = triplet_plan(done["params"]["seed"], index, 3, (0.1, 0.9), (7.5, 15.0))
        rows = [line for line in lines if line["triplet"] == index]
        records = {}
        for key in worker.connection.scan_iter("editserve:edit:*"):
            payload = json.loads(worker.connection.hget(key, "payload"))
            meta = payload["request"]["metadata"]
            if meta.get("dataset") == dataset_id and meta["triplet"] == str(index):
                assert payload["request"]["priority"] == "low"
                records[int(meta["sample"])] = json.loads(worker.connection.hget(key, "results"))
        assert sorted(records) == [0, 1, 2]
        scored = [(s, PairScores(**records[s][1]["scores"])) for s in range(3)]
        assert [r["sample"] for r in rows] == keep_and_rank(scored, Thresholds(-1, -1, -1), 2)
        for row in rows:
            p = plan[row["sample"]]
            assert (row["seed"], row["p2p_fraction"], row["guidance"]) == (p.seed, p.p2p_fraction, p.guidance)
            assert 0.1 <= row["p2p_fraction"] <= 0.9 and 7.5 <= row["guidance"] <= 15.0
            assert (row["input"], row["instruction"], row["output"]) == (
                triplet["input"], triplet["instruction"], triplet["output"])
            assert row["clip"] == records[row["sample"]][1]["scores"]

    # the shards load back with the webdataset reader, pairs in metadata order
    paths = []
    for shard in manifest["shards"]:
        path = tmp_path / shard["key"].rsplit("/", 1)[1]
        path.write_bytes(storage.get_bytes(shard["key"]))
        paths.append(str(path))
    samples = list(wds.WebDataset(paths, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [line["key"] for line in lines]
    for sample, line in zip(samples, lines):
        assert sample["input.png"].size == (SIZE, SIZE) and sample["edited.png"].size == (SIZE, SIZE)
        assert sample["json"] == line
        edit_results = json.loads(worker.connection.hget(edit_key(line["edit_id"]), "results"))
        stored = Image.open(io.BytesIO(storage.get_bytes(edit_results[1]["key"])))
        assert list(sample["edited.png"].convert("RGB").getdata()) == list(stored.convert("RGB").getdata())
    # the shard and output URLs are presigned for the client
    assert len(done["output"]["shard_urls"]) == len(manifest["shards"])


def test_filter_rejects_by_threshold(gateway, make_worker):
    """A threshold above every possible score keeps nothing: the job still succeeds, with empty output."""
    worker = make_worker()
    driver = DatasetDriver(worker.connection, worker.settings, store=worker.store, storage=worker.storage)
    body = job_body(triplets=TRIPLETS[:1], samples_per_triplet=2,
                    thresholds={"image_image": 1.0, "image_caption": -1.0, "directional": -1.0})
    dataset_id = gateway.post("/v1/datasets", json=body).json()["id"]
    done = run_until_done(gateway, dataset_id, driver, worker)
    assert done["status"] == "succeeded" and done["counts"]["samples"] == 2 and done["counts"]["kept"] == 0
    manifest = json.loads(worker.storage.get_bytes(f"datasets/{dataset_id}/manifest.json"))
    assert manifest["shards"] == [] and worker.storage.get_bytes(f"datasets/{dataset_id}/metadata.jsonl") == b""


def test_triplets_from_a_jsonl_object_and_cancel(gateway, redis_url):
    from service.storage import Storage

    storage = Storage(gateway.settings.s3)
    storage.ensure_bucket_and_lifecycle()
    lines = [{"caption": "a cat", "edit": "make it a dog", "output": "a dog"},
             {"input": "a tree", "instruction": "add apples", "output": "an apple tree"}]
    storage.put_bytes("uploads/triplets.jsonl", "\n".join(json.dumps(x) for x in lines).encode())
    created = gateway.post("/v1/datasets", json={"triplets_key": "uploads/triplets.jsonl", "samples_per_triplet": 2})
    assert created.status_code == 202, created.text
    body = created.json()
    assert body["progress"]["total"] == 2 and body["params"]["samples_per_triplet"] == 2
    stored = storage.get_bytes(f"datasets/{body['id']}/triplets.jsonl").decode().splitlines()
    assert json.loads(stored[0]) == {"input": "a cat", "instruction": "make it a dog", "output": "a dog"}

    busy = gateway.post("/v1/datasets", json=job_body())  # max_active_per_tenant = 1
    assert busy.status_code == 429 and busy.json()["error"]["type"] == "tenant_dataset_limit"

    canceled = gateway.post(f"/v1/datasets/{body['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert gateway.post(f"/v1/datasets/{body['id']}/cancel").status_code == 200  # idempotent
    assert gateway.get("/v1/datasets/nope").status_code == 404


@pytest.mark.parametrize("body, status, field", [
    (job_body(triplets_key="x.jsonl"), 422, "triplets"),
    (job_body(p2p_fraction=[0.9, 0.1]), 422, "p2p_fraction"),
    (job_body(guidance=[7.5, float("inf")]), 422, "guidance.1"),
    (job_body(samples_per_triplet=0), 422, "samples_per_triplet"),
    (job_body(thresholds={"image_image": 1.5}), 422, "thresholds.image_image"),
    (job_body(triplets=TRIPLETS * 2), 413, "triplets"),
    (job_body(samples_per_triplet=20), 413, "samples_per_triplet"),
    (job_body(model="tiny-ip2p"), 422, "model"),
    (job_body(height=1024), 422, "height"),
    (job_body(triplets=[{"input": "a " * 100 + "cat", "output": "a dog"}]), 422, "triplets.0.input"),
    (job_body(triplets=[{"input": "a\ncat", "output": "a dog"}]), 422, "triplets.0.input"),
    (job_body(triplets=[{"input": "a cat"}]), 422, "triplets.0.output"),
    ({"triplets_key": "missing/object.jsonl"}, 422, "triplets_key"),
    (job_body(webhook={"url": "http://127.0.0.1/hook"}), 422, "webhook.url"),
])
def test_bad_requests_name_the_field(gateway, body, status, field):
    response = gateway.post("/v1/datasets", content=json.dumps(body, allow_nan=True),
                            headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field, response.text


def test_bad_jsonl_line_is_named(gateway):
    from service.storage import Storage

    storage = Storage(gateway.settings.s3)
    storage.ensure_bucket_and_lifecycle()
    storage.put_bytes("uploads/bad.jsonl", b'{"input": "a cat", "output": "a dog"}\n{"input": "a cat"}\n')
    response = gateway.post("/v1/datasets", json={"triplets_key": "uploads/bad.jsonl"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "triplets_key" and "line 2" in response.json()["error"]["message"]


def test_sample_plan_is_deterministic_and_in_range():
    a = triplet_plan(7, 3, 50, (0.1, 0.9), (7.5, 15.0))
    assert a == triplet_plan(7, 3, 50, (0.1, 0.9), (7.5, 15.0))
    assert a != triplet_plan(7, 4, 50, (0.1, 0.9), (7.5, 15.0))
    assert len({p.seed for p in a}) == 50 and all(0 <= p.seed < 2**32 for p in a)
    assert all(0.1 <= p.p2p_fraction <= 0.9 and 7.5 <= p.guidance <= 15.0 for p in a)


def test_store_counts_a_triplet_once(redis_url, s3_server):
    import redis

    from editserve.contract import DatasetRequest

    settings = gateway_make_settings(redis_url, s3_server)
    store = DatasetStore(redis.Redis.from_url(redis_url), settings)
    request = DatasetRequest(triplets=[{"input": "a", "output": "b"}])
    store.create("ds1", "t", request, {"model": "tiny-sd"}, 1)
    assert store.transition("ds1", (EditStatus.queued,), EditStatus.processing, started_at=True)
    assert store.plan("ds1", 0, ["e1", "e2"]) and not store.plan("ds1", 0, ["e3"])  # only `next` fans out
    assert store.collect("ds1", 0, samples=2, kept=1, failed=0)
    assert not store.collect("ds1", 0, samples=2, kept=1, failed=0)  # a second driver's redo adds nothing
    record = store.record("ds1")
    assert (record["done"], record["c_samples"], record["c_kept"]) == ("1", "2", "1")
    assert store.inflight("ds1") == {}


def test_sdk_and_cli_create_get_download(redis_url, s3_server, make_worker, tmp_path, capsys):
    from gateway_support import start_live_server

    from editserve import Client
    from editserve.cli import main as cli
    from editserve.errors import InvalidRequestError
    from service.app import create_app

    server = start_live_server(create_app(gateway_make_settings(redis_url, s3_server), prepare_bucket=False))
    worker = make_worker()
    driver = DatasetDriver(worker.connection, worker.settings, store=worker.store, storage=worker.storage)
    try:
        with Client(server.url) as client:
            with pytest.raises(InvalidRequestError) as bad:  # validated locally, the server's message
                client.create_dataset(TRIPLETS[:1], p2p_fraction=(0.9, 0.1))
            assert "p2p_fraction" in str(bad.value)
            created = client.create_dataset(TRIPLETS[:2], samples_per_triplet=2, keep_best=1, steps=STEPS, size=SIZE,
                                            seed=1, thresholds=KEEP_ALL)
            assert client.get_dataset(created.id).progress.total == 2
            for _ in range(100):
                driver.tick()
                if client.get_dataset(created.id).status is EditStatus.succeeded:
                    break
                worker.run_once(0.3)
            done = client.wait_dataset(created.id, timeout=5)
            assert done.counts.kept == 2
            paths = client.download_dataset(done, tmp_path / "sdk")
            assert sorted(p.name for p in paths) == ["manifest.json", "metadata.jsonl", "shard-00000.tar"]
            assert len((tmp_path / "sdk" / "metadata.jsonl").read_text().splitlines()) == 2
        capsys.readouterr()
        assert cli(["--url", server.url, "dataset", "get", created.id]) == 0
        assert json.loads(capsys.readouterr().out)["status"] == "succeeded"
        assert cli(["--url", server.url, "-q", "dataset", "download", created.id, "--out", str(tmp_path / "cli")]) == 0
        assert len(capsys.readouterr().out.split()) == 3
        samples = list(wds.WebDataset(str(tmp_path / "cli" / "shard-00000.tar"), shardshuffle=False).decode("pil"))
        assert len(samples) == 2 and all(s["edited.png"].size == (SIZE, SIZE) for s in samples)
        triplets_file = tmp_path / "t.jsonl"
        triplets_file.write_text("\n".join(json.dumps(t) for t in TRIPLETS[:1]))
        assert cli(["--url", server.url, "dataset", "create", "--triplets", str(triplets_file), "--samples", "1",
                    "--size", str(SIZE), "--steps", str(STEPS)]) == 0
        new_id = capsys.readouterr().out.strip()
        assert cli(["--url", server.url, "dataset", "cancel", new_id]) == 0
        assert capsys.readouterr().out.strip() == f"{new_id} canceled"
    finally:
        server.stop()


def test_cancel_stops_the_jobs_queued_samples(gateway, redis_url, s3_server):
    """No worker: the driver fans the job out, the client cancels, the next pass cancels every queued sample."""
    import redis

    from service.datasets import ACTIVE_KEY
    from service.jobstore import JobStore
    from service.storage import Storage

    conn = redis.Redis.from_url(redis_url)
    storage = Storage(gateway.settings.s3)
    driver = DatasetDriver(conn, gateway.settings, store=JobStore(conn, gateway.settings, storage), storage=storage)
    dataset_id = gateway.post("/v1/datasets", json=job_body(samples_per_triplet=2)).json()["id"]
    driver.tick()
    body = gateway.get(f"/v1/datasets/{dataset_id}").json()
    assert body["status"] == "processing"
    ids = [i for ids in driver.datasets.inflight(dataset_id).values() for i in ids]
    assert len(ids) == 6  # window 32 ≥ 3 triplets × 2 samples: all fanned out at once
    assert {conn.hget(edit_key(i), "status") for i in ids} == {b"queued"}
    assert gateway.post(f"/v1/datasets/{dataset_id}/cancel").json()["status"] == "canceled"
    driver.tick()
    assert {conn.hget(edit_key(i), "status") for i in ids} == {b"canceled"}
    assert not conn.sismember(ACTIVE_KEY, dataset_id)
    retention = gateway.settings.s3.retention_days * 24 * 3600
    dataset_keys = conn.keys(f"editserve:dataset:{dataset_id}*")
    assert dataset_keys and all(0 < conn.ttl(k) <= retention for k in dataset_keys)  # a retired job's keys expire
    assert gateway.post("/v1/datasets", json=job_body()).status_code == 202  # the tenant's slot is free again
