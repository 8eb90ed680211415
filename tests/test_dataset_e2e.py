"""Dataset jobs with real processes (uvicorn gateway, batching workers whose driver threads fan jobs out,
webhook sender): a worker SIGKILLed mid-job loses and duplicates no kept pair, and interactive edits
submitted during a job start before the job's remaining queued work."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import redis

from editserve import verify_webhook
from editserve.contract import BatchKey
from service.config import Settings
from devtools.devstack import LocalStack, free_port
from service.queues import queue_name
from worker.scoring.selection import PairScores, Thresholds, keep_and_rank

pytestmark = pytest.mark.e2e
DB = 13
SIZE, STEPS = 64, 4
KEEP_ALL = {"image_image": -1.0, "image_caption": -1.0, "directional": -1.0}
CAPTIONS = ["a cat", "a dog", "a red car", "a blue car", "a house", "a tree", "a boat", "a bird"]


class Hooks(BaseHTTPRequestHandler):
    received: list[tuple[str, str]] = []  # (type, dataset id), signature verified
    secret = Settings().webhooks.secret

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        try:
            verify_webhook(self.secret, dict(self.headers), body)  # raises on a bad signature
            event = json.loads(body)
            self.received.append((event["type"], event["data"]["id"]))
        except Exception:
            self.received.append(("bad-signature", ""))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stack(redis_server, s3_server, tiny_models):
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    redis.Redis.from_url(url).flushdb()
    port = free_port()
    hooks = ThreadingHTTPServer(("127.0.0.1", port), Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    s = LocalStack(redis_url=url, s3=s3_server, models_dir=tiny_models["tiny-sd"].parent, extra_env={
        "EDITSERVE_WEBHOOKS__ALLOW_HOSTS": '["127.0.0.1"]', "EDITSERVE_WEBHOOKS__BACKOFF_SECONDS": "[0.2, 0.5]",
        "EDITSERVE_WORKER__HEARTBEAT_TTL_SECONDS": "5", "EDITSERVE_WORKER__REAPER_INTERVAL_SECONDS": "1",
        "EDITSERVE_WORKER__TORCH_THREADS": "1", "EDITSERVE_DATASETS__LEASE_SECONDS": "2",
        "EDITSERVE_DATASETS__DRIVER_INTERVAL_SECONDS": "0.2", "EDITSERVE_DATASETS__WINDOW_SAMPLES": "8",
        "EDITSERVE_DATASETS__MAX_ACTIVE_PER_TENANT": "5", "EDITSERVE_WEBHOOKS__METRICS_PORT": "0",
        "EDITSERVE_LIMITS__TENANT_RPS": "0"})
    s.start_gateway()
    s.start_webhook_sender()
    s.hook_url = f"http://127.0.0.1:{port}/hook"
    s.redis = redis.Redis.from_url(url)
    s.http = httpx.Client(base_url=s.base_url, timeout=30)
    yield s
    s.http.close()
    s.stop()
    hooks.shutdown()


def wait(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def create(stack, triplets: int, samples: int, **extra) -> str:
    body = {"triplets": [{"input": CAPTIONS[i % 8], "instruction": "change it", "output": CAPTIONS[(i + 1) % 8]}
                         for i in range(triplets)],
            "samples_per_triplet": samples, "keep_best": 2, "steps": STEPS, "height": SIZE, "width": SIZE,
            "seed": 3, "thresholds": KEEP_ALL, **extra}
    response = stack.http.post("/v1/datasets", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def dataset(stack, dataset_id) -> dict:
    return stack.http.get(f"/v1/datasets/{dataset_id}").json()


def sample_records(stack, dataset_id) -> dict[tuple[int, int], list[dict]]:
    """(triplet, sample) → every edit record made for it (exactly one each when nothing was duplicated)."""
    out: dict[tuple[int, int], list[dict]] = {}
    for key in stack.redis.scan_iter("editserve:edit:*"):
        record = {k.decode(): v.decode() for k, v in stack.redis.hgetall(key).items()}
        meta = json.loads(record["payload"])["request"]["metadata"]
        if meta.get("dataset") == dataset_id:
            out.setdefault((int(meta["triplet"]), int(meta["sample"])), []).append(record)
    return out


def shard_keys(stack, manifest) -> list[str]:
    import io
    import tarfile

    keys = []
    for shard in manifest["shards"]:
        data = stack.s3.client().get_object(Bucket=stack.s3.bucket, Key=shard["key"])["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            keys += [m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".json")]
    return keys


def test_sigkill_mid_job_loses_and_duplicates_no_kept_pair(stack):
    triplets, samples = 5, 3
    dataset_id = create(stack, triplets, samples, webhook={"url": stack.hook_url,
                                                           "events": ["started", "progress", "completed"]})
    victim = stack.start_worker("victim", models="tiny-sd",
                                env={"EDITSERVE_WORKER__DEBUG_STEP_DELAY_SECONDS": "0.15"})
    try:
        wait(lambda: 1 <= dataset(stack, dataset_id)["progress"]["done"] < triplets
             and any(r["status"] == "processing" for rs in sample_records(stack, dataset_id).values() for r in rs),
             180, "the victim mid-job", interval=0.05)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
        done_at_kill = dataset(stack, dataset_id)["progress"]["done"]
        assert done_at_kill < triplets
        stack.start_worker("rescuer", models="tiny-sd")
        final = wait(lambda: (d := dataset(stack, dataset_id))["status"] in ("succeeded", "failed") and d, 300,
                     "the dataset job to finish")
    finally:
        stack.stop("victim")
        stack.stop("rescuer")
    assert final["status"] == "succeeded", final
    assert final["progress"] == {"done": triplets, "total": triplets}
    assert final["counts"]["kept"] == triplets * 2 and final["counts"]["samples"] == triplets * samples

    records = sample_records(stack, dataset_id)
    assert sorted(records) == [(t, s) for t in range(triplets) for s in range(samples)]
    assert all(len(rs) == 1 and rs[0]["status"] == "succeeded" for rs in records.values())  # no sample twice
    expected = []
    for t in range(triplets):
        scored = [(s, PairScores(**json.loads(records[(t, s)][0]["results"])[1]["scores"])) for s in range(samples)]
        expected += [f"t{t:08d}_s{s:04d}" for s in keep_and_rank(scored, Thresholds(-1, -1, -1), 2)]

    s3 = stack.s3.client()
    prefix = f"datasets/{dataset_id}/"
    manifest = json.loads(s3.get_object(Bucket=stack.s3.bucket, Key=prefix + "manifest.json")["Body"].read())
    metadata = s3.get_object(Bucket=stack.s3.bucket, Key=prefix + "metadata.jsonl")["Body"].read().splitlines()
    assert [json.loads(line)["key"] for line in metadata] == expected  # every kept pair, once, in order
    assert shard_keys(stack, manifest) == expected
    assert manifest["counts"]["kept"] == len(expected)

    events = wait(lambda: [e for e in Hooks.received if e[1] == dataset_id and e[0] == "dataset.completed"] and
                  [e for e in Hooks.received if e[1] == dataset_id], 30, "the completed webhook")
    types = [e[0] for e in events]
    assert types.count("dataset.completed") == 1 and "dataset.started" in types and "dataset.progress" in types
    assert ("bad-signature", "") not in Hooks.received


def test_interactive_edits_start_before_the_jobs_remaining_work(stack):
    triplets, samples = 6, 4
    dataset_id = create(stack, triplets, samples)
    stack.start_worker("busy", models="tiny-sd", env={"EDITSERVE_WORKER__MAX_BATCH_SIZE": "2",
                                                      "EDITSERVE_WORKER__DEBUG_STEP_DELAY_SECONDS": "0.05"})
    low = queue_name(BatchKey(model="tiny-sd", kind="p2p", height=SIZE, width=SIZE, steps=STEPS, scheduler="ddim"),
                     "low")
    try:
        wait(lambda: stack.redis.llen(f"rq:queue:{low}") >= 2 and dataset(stack, dataset_id)["progress"]["done"] >= 1,
             180, "the job running with samples queued", interval=0.02)
        interactive = []
        for seed in (1, 2):
            response = stack.http.post("/v1/edits", json={"kind": "p2p", "source_prompt": "a photo of a cat",
                                                           "target_prompts": ["a photo of a dog"], "steps": STEPS,
                                                           "height": SIZE, "width": SIZE, "seed": seed})
            assert response.status_code == 202, response.text
            interactive.append(response.json()["id"])
        waiting = [v.decode() for v in stack.redis.lrange(f"rq:queue:{low}", 0, -1)]  # not claimed yet
        assert waiting
        edits = [wait(lambda i=i: (e := stack.http.get(f"/v1/edits/{i}").json())["status"] == "succeeded" and e,
                      120, "interactive edit") for i in interactive]
        final = wait(lambda: (d := dataset(stack, dataset_id))["status"] == "succeeded" and d, 300, "the job")
    finally:
        stack.stop("busy")
    assert final["counts"]["samples"] == triplets * samples
    latest_interactive_start = max(float(stack.redis.hget(f"editserve:edit:{e['id']}", "started_at")) for e in edits)
    sample_starts = [float(stack.redis.hget(f"editserve:edit:{i}", "started_at")) for i in waiting]
    # every sample that was still waiting in its queue started after both interactive edits had started
    assert min(sample_starts) >= latest_interactive_start
