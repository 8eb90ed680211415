"""Inversions as an HTTP resource (issue 11, service side): POST/GET/list/cancel /v1/inversions through a real
uvicorn gateway, real Redis and the SeaweedFS S3 endpoint, run by a real batching worker on the
well-conditioned tiny model (tiny-sd-smooth, 64 px, fp32 latents, one torch thread); then P2P edits that name
the inversion, which run no inversion work and equal the edit from the in-memory inversion.
"""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
import numpy as np
import pytest
import redis
import torch
from gateway_support import gateway_app, gateway_settings, live  # noqa: F401  (fixtures)
from PIL import Image
from worker_support import WorkerProcess, edit_field, make_settings, wait_until

from editserve.contract import EditStatus, InversionRequest
from service import metrics
from service.imaging import square_photo
from worker.editing import inversion as inversion_core
from worker.editing.batch import BatchRunner
from worker.editing.jobs import P2PJobSpec
from worker.runtime.inversions import inversion_from_bytes, inversion_spec, run_inversions

MODEL, SIZE, STEPS, INNER = "tiny-sd-smooth", 64, 4, 2
CAPTION, TARGET = "a photo of an astronaut", "a photo of an robot"
TOL = 1e-4


@pytest.fixture(scope="module")
def photo_png() -> bytes:
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((96, 80)).save(buffer, format="PNG")  # not square: the gateway crops
    return buffer.getvalue()


@pytest.fixture(scope="module")
def smooth_registry(tiny_models):
    """tiny-sd-smooth loaded once; one torch thread, so the worker's run and the in-core run round alike."""
    from service.config import Settings
    from worker.models.registry import ModelRegistry

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    registry = ModelRegistry(Settings(models_dir=tiny_models["tiny-sd"].parent))
    registry.get(MODEL)
    yield registry
    torch.set_num_threads(threads)


@pytest.fixture
def worker(redis_url, s3_server, smooth_registry):
    from worker.runtime.worker import EditWorker

    made = []

    def make(**worker_settings):
        settings = make_settings(redis_url, s3_server, **worker_settings)
        w = EditWorker(settings, [MODEL], f"inv-{len(made)}", registry=smooth_registry)
        w.bridge.register()
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop_metrics_server()
        w.finisher.close()
        w.bridge.unregister()


def body(**overrides) -> dict:
    return {"caption": CAPTION, "model": MODEL, "steps": STEPS, "resolution": SIZE, "method": "null-text",
            "num_inner_steps": INNER, **overrides}


def post_inversion(client: httpx.Client, photo: bytes, **overrides) -> httpx.Response:
    """Multipart: the JSON `request` part and the `image` file part (as POST /v1/edits takes them)."""
    return client.post("/v1/inversions", data={"request": json.dumps(body(**overrides))},
                       files={"image": ("photo.png", photo, "image/png")})


def inversion_runs() -> float:
    return metrics.inversion_jobs_total.labels(model=MODEL)._value.get()


def test_create_progress_succeed_reuse_and_list(live, worker, photo_png, monkeypatch):  # noqa: F811
    from service.jobstore import JobStore

    details: list[dict] = []
    original = JobStore.set_progress_detail

    def recording(self, edit_id, detail):
        details.append(json.loads(detail))
        return original(self, edit_id, detail)

    monkeypatch.setattr(JobStore, "set_progress_detail", recording)
    client = live.client()
    created = post_inversion(client, photo_png)
    assert created.status_code == 202, created.text
    inversion = created.json()
    assert created.headers["location"] == f"/v1/inversions/{inversion['id']}"
    assert inversion["status"] == "queued" and inversion["object"] == "inversion"
    assert inversion["request"]["resolution"] == SIZE and inversion["request"]["steps"] == STEPS

    worker().run_once(timeout=10)
    done = client.get(f"/v1/inversions/{inversion['id']}").json()
    assert done["status"] == "succeeded", done
    # progress: the DDIM walk's steps, then each null-text step with its inner iterations
    assert [d["step"] for d in details if d["phase"] == "ddim"] == list(range(1, STEPS + 1))
    optimised = [d for d in details if d["phase"] == "null-text"]
    assert [d["step"] for d in optimised] == list(range(1, STEPS + 1))
    assert all(1 <= d["inner_iterations"] <= INNER and d["inner_total"] == INNER for d in optimised)
    assert done["progress"]["step"] == done["progress"]["total"] == STEPS
    assert 1 <= done["progress"]["inner_iterations"] <= INNER

    arrays = httpx.get(done["result"]["arrays_url"]).content
    stored = inversion_from_bytes(arrays)
    assert tuple(stored.x_t.shape) == (1, 4, SIZE // 8, SIZE // 8) and stored.uncond_embeddings.shape[0] == STEPS
    assert (stored.model, stored.steps, stored.height, stored.method) == (MODEL, STEPS, SIZE, "null-text")
    reconstruction = Image.open(io.BytesIO(httpx.get(done["result"]["reconstruction_url"]).content))
    assert reconstruction.size == (SIZE, SIZE)
    assert done["reconstruction_error"] is not None and np.isfinite(done["reconstruction_error"])

    again = post_inversion(client, photo_png)  # an equal request: the finished inversion, nothing rerun
    assert again.status_code == 200 and again.json()["reused"] is True and again.json()["id"] == inversion["id"]
    other = post_inversion(client, photo_png, method="ddim")  # another key: a new job
    assert other.status_code == 202 and other.json()["id"] != inversion["id"]

    listed = client.get("/v1/inversions").json()["data"]
    assert [i["id"] for i in listed] == [other.json()["id"], inversion["id"]]
    assert [i["id"] for i in client.get("/v1/inversions", params={"status": "succeeded"}).json()["data"]] == \
        [inversion["id"]]


def test_an_edit_naming_the_inversion_runs_no_inversion_and_equals_the_in_memory_edit(
        live, worker, photo_png, smooth_registry, monkeypatch):  # noqa: F811
    client = live.client()
    created = post_inversion(client, photo_png, method="null-text")
    w = worker()
    w.run_once(timeout=10)
    inversion = client.get(f"/v1/inversions/{created.json()['id']}").json()
    assert inversion["status"] == "succeeded", inversion

    calls = []
    real_run = inversion_core.InversionRunner.run
    monkeypatch.setattr(inversion_core.InversionRunner, "run",
                        lambda self, *a, **k: calls.append(1) or real_run(self, *a, **k))
    runs_before = inversion_runs()
    edit = client.post("/v1/edits", json={"kind": "p2p", "source_prompt": CAPTION, "target_prompts": [TARGET],
                                          "inversion_id": inversion["id"], "cross_replace_steps": 0.5,
                                          "self_replace_steps": 0.25})
    assert edit.status_code == 202, edit.text
    params = edit.json()["params"]
    assert (params["model"], params["steps"], params["height"], params["scheduler"]) == (MODEL, STEPS, SIZE, "ddim")
    assert params["inversion_id"] == inversion["id"]
    w.run_once(timeout=10)
    done = client.get(f"/v1/edits/{edit.json()['id']}").json()
    assert done["status"] == "succeeded", done
    assert calls == [] and inversion_runs() == runs_before  # no inversion work for the edit

    # the same edit from the inversion computed in memory (no S3 round trip) gives the same pixels
    photo = square_photo(Image.open(io.BytesIO(photo_png)).convert("RGB"), SIZE)
    spec = inversion_spec("mem", InversionRequest(**body()), photo)
    in_memory = run_inversions(smooth_registry.get(MODEL), [spec], size=SIZE, steps=STEPS)[0]
    stored = inversion_from_bytes(httpx.get(inversion["result"]["arrays_url"]).content)
    assert (stored.x_t - in_memory.inversion.x_t).abs().max().item() <= TOL
    assert (stored.uncond_embeddings - in_memory.inversion.uncond_embeddings).abs().max().item() <= TOL
    runner = BatchRunner(smooth_registry.get(MODEL), height=SIZE, width=SIZE, steps=STEPS, scheduler="ddim")
    reference = runner.run([P2PJobSpec("ref", CAPTION, [TARGET], seed=0, cross_replace_steps=0.5,
                                       self_replace_steps=0.25, inversion=in_memory.inversion)])[0]
    assert reference.ok, reference.error
    served = [np.asarray(Image.open(io.BytesIO(httpx.get(r["url"]).content)).convert("RGB"), dtype=np.int16)
              for r in done["results"]]
    expected = [np.asarray(image.convert("RGB"), dtype=np.int16) for image in reference.images]
    assert len(served) == len(expected) == 2
    for got, want in zip(served, expected):
        assert np.abs(got - want).max() <= 1


def test_tenancy_another_tenants_inversion_is_404(live, worker, photo_png):  # noqa: F811
    client = live.client()
    admin = {"Authorization": "Bearer admin-secret-token"}
    key = client.post("/v1/admin/keys", json={"tenant": "other", "label": "t"}, headers=admin).json()["key"]
    mine = post_inversion(client, photo_png).json()["id"]
    worker().run_once(timeout=10)
    theirs = live.client(headers={"Authorization": f"Bearer {key}"})
    assert theirs.get(f"/v1/inversions/{mine}").status_code == 404
    assert theirs.post(f"/v1/inversions/{mine}/cancel").status_code == 404
    assert theirs.get("/v1/inversions").json()["data"] == []
    edit = theirs.post("/v1/edits", json={"kind": "p2p", "source_prompt": CAPTION, "target_prompts": [TARGET],
                                          "inversion_id": mine})
    assert edit.status_code == 404 and edit.json()["error"]["field"] == "inversion_id"
    assert client.get(f"/v1/inversions/{mine}").json()["status"] == "succeeded"


@pytest.mark.parametrize("overrides,field,status", [
    ({"method": "textual"}, "method", 422), ({"guidance_scale": 0.5}, "guidance_scale", 422),
    ({"num_inner_steps": 0}, "num_inner_steps", 422), ({"num_inner_steps": 51}, "num_inner_steps", 422),
    ({"early_stop_epsilon": -1.0}, "early_stop_epsilon", 422), ({"steps": 0}, "steps", 422),
    ({"steps": "4"}, "steps", 422), ({"scheduler": "pndm"}, "scheduler", 422), ({"resolution": 96}, "resolution", 422),
    ({"model": "nope"}, "model", 422), ({"model": "tiny-ip2p"}, "model", 422), ({"caption": ""}, "caption", 422),
    ({"caption": "a\u202ecat"}, "caption", 422), ({"caption": "cat " * 100}, "caption", 422),
    ({"webhook": {"url": "http://127.0.0.1/x"}}, "webhook.url", 422), ({"colour": 1}, "colour", 422),
])
def test_every_bad_knob_is_a_4xx_naming_its_field(live, photo_png, overrides, field, status):  # noqa: F811
    response = post_inversion(live.client(), photo_png, **overrides)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field


def test_the_photo_is_required_and_checked_and_json_base64_works(live, photo_png, redis_url):  # noqa: F811
    client = live.client()
    missing = client.post("/v1/inversions", json=body())
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "image"
    garbage = client.post("/v1/inversions", json=body(image="not base64!"))
    assert garbage.status_code == 422 and garbage.json()["error"]["field"] == "image"
    not_an_image = client.post("/v1/inversions", json=body(image=base64.b64encode(b"hello").decode()))
    assert not_an_image.status_code == 422 and not_an_image.json()["error"]["field"] == "image"
    ok = client.post("/v1/inversions", json=body(image=base64.b64encode(photo_png).decode()),
                     headers={"Idempotency-Key": "k1"})
    assert ok.status_code == 202, ok.text
    replay = client.post("/v1/inversions", json=body(image=base64.b64encode(photo_png).decode()),
                         headers={"Idempotency-Key": "k1"})
    assert replay.status_code == 200 and replay.json()["id"] == ok.json()["id"]
    assert replay.headers["idempotent-replayed"] == "true"


def test_an_edit_naming_an_unusable_inversion_is_a_4xx_naming_inversion_id(live, worker, photo_png):  # noqa: F811
    client = live.client()
    edit = {"kind": "p2p", "source_prompt": CAPTION, "target_prompts": [TARGET]}
    unknown = client.post("/v1/edits", json={**edit, "inversion_id": "0123456789abcdefghjkmnpqrs"})
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "inversion_id"
    queued = post_inversion(client, photo_png).json()["id"]
    pending = client.post("/v1/edits", json={**edit, "inversion_id": queued})
    assert pending.status_code == 409 and pending.json()["error"]["field"] == "inversion_id"
    worker().run_once(timeout=10)
    for mismatch in ({"steps": STEPS + 1}, {"height": 128, "width": 128}, {"model": "tiny-sd"}):
        response = client.post("/v1/edits", json={**edit, "inversion_id": queued, **mismatch})
        assert response.status_code == 422 and response.json()["error"]["field"] == "inversion_id", mismatch
    wrong_sampler = client.post("/v1/edits", json={**edit, "inversion_id": queued, "scheduler": "pndm"})
    assert wrong_sampler.status_code == 422 and wrong_sampler.json()["error"]["field"] == "scheduler"
    bad_id = client.post("/v1/edits", json={**edit, "inversion_id": "../x"})
    assert bad_id.status_code == 422 and bad_id.json()["error"]["field"] == "inversion_id"


def test_cancel_queued_now_and_processing_at_the_next_step(live, worker, photo_png, redis_url, s3_server):  # noqa: F811
    client = live.client()
    queued = post_inversion(client, photo_png, caption="a photo of a queued astronaut").json()["id"]
    canceled = client.post(f"/v1/inversions/{queued}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"

    running = post_inversion(client, photo_png, steps=8).json()["id"]
    w = worker(debug_step_delay_seconds=0.3, cancel_check_interval_seconds=0.05)
    thread = threading.Thread(target=w.run_once, kwargs={"timeout": 10})
    thread.start()
    conn = redis.Redis.from_url(redis_url)
    wait_until(lambda: int(edit_field(conn, running, "progress_step") or 0) >= 1, 60, what="inversion progress")
    response = client.post(f"/v1/inversions/{running}/cancel")
    assert response.status_code == 200 and response.json()["status"] in ("processing", "canceled")
    thread.join(60)
    final = client.get(f"/v1/inversions/{running}").json()
    assert final["status"] == "canceled" and final["result"] is None
    stopped = final["progress"]  # where it stopped: before the last null-text step, and nothing was stored
    assert stopped["phase"] == "ddim" or stopped["step"] < 8, stopped
    s3 = s3_server.client()
    assert s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"edits/{running}/").get("KeyCount") == 1  # the photo
    done = client.post(f"/v1/inversions/{running}/cancel")  # idempotent
    assert done.status_code == 200 and done.json()["status"] == "canceled"


def test_sigkill_mid_inversion_loses_nothing(live, redis_url, s3_server, photo_png):  # noqa: F811
    import signal

    client = live.client()
    settings = make_settings(redis_url, s3_server)
    conn = redis.Redis.from_url(redis_url)
    fast = {"heartbeat_ttl_seconds": 5, "reaper_interval_seconds": 1}
    # both start at once (their start-ups overlap); the rescuer is frozen until the victim holds the job
    rescuer = WorkerProcess(settings, s3_server, "inv-rescuer", models=MODEL, **fast)
    victim = WorkerProcess(settings, s3_server, "inv-victim", models=MODEL, debug_step_delay_seconds=0.5, **fast)
    try:
        wait_until(lambda: '"event":"worker_started"' in rescuer.log(), 180, what="rescuer start")
        rescuer.signal(signal.SIGSTOP)
        wait_until(lambda: '"event":"worker_started"' in victim.log(), 180, what="victim start")
        inversion_id = post_inversion(client, photo_png, steps=8).json()["id"]
        wait_until(lambda: int(edit_field(conn, inversion_id, "progress_step") or 0) >= 1, 120,
                   what=lambda: f"progress; log:\n{victim.log()[-2000:]}")
        victim.kill()
        rescuer.signal(signal.SIGCONT)
        wait_until(lambda: edit_field(conn, inversion_id, "status") == "succeeded", 180,
                   what=lambda: f"recovery; log:\n{rescuer.log()[-3000:]}")
    finally:
        victim.stop()
        rescuer.stop()
    done = client.get(f"/v1/inversions/{inversion_id}").json()
    assert done["status"] == "succeeded" and done["metrics"]["attempts"] == 2
    assert "inv-victim" in (edit_field(conn, inversion_id, "requeue_reason") or "")
    stored = inversion_from_bytes(httpx.get(done["result"]["arrays_url"]).content)
    assert stored.uncond_embeddings.shape[0] == 8


def post_photo_edit(client: httpx.Client, photo: bytes, caption: str, target: str) -> httpx.Response:
    request = {"kind": "p2p", "source_prompt": caption, "target_prompts": [target], "model": MODEL, "steps": STEPS,
               "height": SIZE, "inversion": {"method": "null-text", "num_inner_steps": INNER},
               "cross_replace_steps": 0.5, "self_replace_steps": 0.25}
    return client.post("/v1/edits", data={"request": json.dumps(request)},
                       files={"image": ("photo.png", photo, "image/png")})


def pixels(client: httpx.Client, edit: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(httpx.get(r["url"]).content)).convert("RGB"), dtype=np.int16)
            for r in edit["results"]]


def test_a_photo_edit_reuses_a_finished_inversion_else_inverts_once_for_the_next(
        live, worker, photo_png, monkeypatch):  # noqa: F811
    client = live.client()
    inversion = post_inversion(client, photo_png).json()["id"]
    w = worker()
    w.run_once(timeout=10)
    assert client.get(f"/v1/inversions/{inversion}").json()["status"] == "succeeded"
    calls = []
    real_run = inversion_core.InversionRunner.run
    monkeypatch.setattr(inversion_core.InversionRunner, "run",
                        lambda self, *a, **k: calls.append(1) or real_run(self, *a, **k))

    # the photo + its caption again: the finished inversion is found by its key, nothing is inverted
    photo_edit = post_photo_edit(client, photo_png, CAPTION, TARGET)
    assert photo_edit.status_code == 202, photo_edit.text
    assert photo_edit.json()["params"]["inversion_id"] == inversion
    named = client.post("/v1/edits", json={"kind": "p2p", "source_prompt": CAPTION, "target_prompts": [TARGET],
                                           "inversion_id": inversion, "cross_replace_steps": 0.5,
                                           "self_replace_steps": 0.25}).json()
    w.run_once(timeout=10)
    reused = client.get(f"/v1/edits/{photo_edit.json()['id']}").json()
    assert reused["status"] == "succeeded" and calls == []
    for got, want in zip(pixels(client, reused), pixels(client, client.get(f"/v1/edits/{named['id']}").json())):
        assert np.abs(got - want).max() <= 1

    # another caption: no inversion with that key, so the worker inverts it inline, once; the next equal edit
    # reuses the inversion that edit stored and equals it
    caption, target = "a photo of an person", "a photo of an robot"
    first = post_photo_edit(client, photo_png, caption, target).json()
    assert first["params"].get("inversion_id") is None
    runs_before = inversion_runs()
    w.run_once(timeout=10)
    first = client.get(f"/v1/edits/{first['id']}").json()
    assert first["status"] == "succeeded", first
    assert calls == [1] and inversion_runs() == runs_before + 1
    second = post_photo_edit(client, photo_png, caption, target).json()
    assert second["params"]["inversion_id"] == first["id"]
    w.run_once(timeout=10)
    second = client.get(f"/v1/edits/{second['id']}").json()
    assert second["status"] == "succeeded" and calls == [1]
    for got, want in zip(pixels(client, second), pixels(client, first)):
        assert np.abs(got - want).max() <= 1


def test_an_inversion_sends_edit_webhooks_with_its_edit_view(live, worker, photo_png, redis_url):  # noqa: F811
    """The processes' JobStore listener (``service.webhooks.emit``) queues a signed delivery per event: read
    them back from the webhooks queue (no sender runs here)."""
    from rq import Queue

    from service.webhooks.events import QUEUE_NAME

    hook = {"url": "https://example.com/hooks/inversions", "events": ["started", "progress", "completed"]}
    inversion = post_inversion(live.client(), photo_png, webhook=hook).json()["id"]
    worker().run_once(timeout=10)
    jobs = Queue(QUEUE_NAME, connection=redis.Redis.from_url(redis_url)).jobs
    bodies = [json.loads(job.args[0]["body"]) for job in jobs]
    mine = [b for b in bodies if b["data"]["id"] == inversion]
    assert {b["type"] for b in mine} == {"edit.started", "edit.progress", "edit.completed"}
    assert all(b["data"]["kind"] == "inversion" for b in mine)
    completed = next(b for b in mine if b["type"] == "edit.completed")
    assert completed["data"]["status"] == "succeeded"
    assert completed["data"]["results"][0]["label"] == "reconstruction"


def test_a_step_batching_worker_fails_an_inversion_naming_why(live, worker, photo_png):  # noqa: F811
    client = live.client()
    inversion = post_inversion(client, photo_png).json()["id"]
    w = worker(batching="step", poll_interval_ms=5)
    w.continuous.run_until_idle(60)
    failed = client.get(f"/v1/inversions/{inversion}").json()
    assert failed["status"] == "failed" and "request batching" in failed["error"]["message"]
