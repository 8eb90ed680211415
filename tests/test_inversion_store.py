"""Inversions as stored resources (issue 11, service part): the request contract, the batched run, the S3
objects (safetensors x_T + per-step embeddings, reconstruction PNG), and a P2P job payload that names a
stored inversion — against the real S3 endpoint and the well-conditioned tiny model, on fp32 latents.
"""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime

import pytest
import torch
from gateway_support import s3_settings
from PIL import Image
from pydantic import ValidationError

from editserve.contract import BatchKey, InversionRequest, JobPayload, P2PEditRequest
from service.storage import Storage, inversion_arrays_key, inversion_reconstruction_key
from worker.editing import inversion as inversion_core
from worker.editing.batch import BatchRunner
from worker.editing.jobs import EditValidationError
from worker.runtime.execute import to_job_spec
from worker.runtime.inversions import (
    inversion_bytes,
    inversion_from_bytes,
    inversion_spec,
    run_inversions,
    store_inversion,
)

SIZE, STEPS, TOL = 64, 4, 1e-4
CAPTION = "a photo of an astronaut"
MODEL = "tiny-sd-smooth"


@pytest.fixture(scope="module")
def smooth_model(tiny_models):
    """One torch thread: batched and alone runs compare on the same thread count (2 shared cores)."""
    from service.config import Settings
    from worker.models.registry import ModelRegistry

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ModelRegistry(Settings(models_dir=tiny_models["tiny-sd"].parent)).get(MODEL)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="module")
def inverted(smooth_model, photo):
    """Two requests inverted in one batch (they share every UNet call), as the worker runs them."""
    requests = {"ddim": InversionRequest(caption=CAPTION, method="ddim"),
                "null-text": InversionRequest(caption=CAPTION, method="null-text", num_inner_steps=2)}
    specs = [inversion_spec(f"{name}-{uuid.uuid4().hex[:8]}", req, photo) for name, req in requests.items()]
    results = run_inversions(smooth_model, specs, size=SIZE, steps=STEPS)
    for result in results:
        assert result.ok, result.error
    return dict(zip(requests, results))


@pytest.fixture
def storage(s3):
    return Storage(s3_settings(s3))


@pytest.mark.parametrize("field,value", [
    ("caption", ""), ("method", "textual"), ("guidance_scale", 0.5), ("guidance_scale", float("nan")),
    ("num_inner_steps", 0), ("num_inner_steps", 51), ("early_stop_epsilon", -1.0), ("steps", 0),
    ("scheduler", "pndm"), ("resolution", 32), ("model", "m" * 101),
])
def test_every_inversion_knob_is_validated_naming_its_field(field, value):
    with pytest.raises(ValidationError) as err:
        InversionRequest(**{"caption": CAPTION, field: value})
    assert [e["loc"][0] for e in err.value.errors()] == [field]


def test_unknown_inversion_fields_are_refused():
    with pytest.raises(ValidationError) as err:
        InversionRequest(caption=CAPTION, inner_steps=3)
    assert err.value.errors()[0]["loc"] == ("inner_steps",)


def test_stored_arrays_round_trip_bit_exact_with_their_key(inverted):
    inversion = inverted["null-text"].inversion
    back = inversion_from_bytes(inversion_bytes(inversion))
    assert torch.equal(back.x_t, inversion.x_t.float())
    assert torch.equal(back.uncond_embeddings, inversion.uncond_embeddings.float())
    assert back.meta() == inversion.meta()
    assert back.key_params() == {"model": MODEL, "height": SIZE, "width": SIZE, "steps": STEPS, "scheduler": "ddim"}
    assert back.uncond_embeddings.shape[0] == STEPS


def test_garbage_is_not_an_inversion():
    with pytest.raises(ValueError):
        inversion_from_bytes(b"\x00" * 64)


def test_store_puts_arrays_and_reconstruction_in_s3(storage, inverted):
    result = inverted["ddim"]
    stored = store_inversion(storage, result)
    assert stored["arrays_key"] == inversion_arrays_key(result.job_id)
    loaded = inversion_from_bytes(storage.get_bytes(stored["arrays_key"]))
    assert torch.equal(loaded.x_t, result.inversion.x_t.float())
    png = Image.open(io.BytesIO(storage.get_bytes(inversion_reconstruction_key(result.job_id))))
    assert png.size == (SIZE, SIZE)
    assert stored["reconstruction_error"] == pytest.approx(result.reconstruction_error)


def p2p_payload(inversion_id: str | None, edit_id: str = "e") -> JobPayload:
    request = P2PEditRequest(source_prompt=CAPTION, target_prompts=["a photo of an cosmonaut"], edit="replace",
                             model=MODEL, steps=STEPS, scheduler="ddim")
    key = BatchKey(model=MODEL, kind="p2p", height=SIZE, width=SIZE, steps=STEPS, scheduler="ddim")
    return JobPayload(id=edit_id, tenant="t", request=request, batch_key=key, seeds=[3],
                      inversion_id=inversion_id, created_at=datetime.now(UTC))


def test_edit_naming_a_stored_inversion_equals_the_core_edit_and_inverts_nothing(
        storage, inverted, smooth_model, monkeypatch):
    result = inverted["null-text"]
    store_inversion(storage, result)
    runs = []
    original_run = inversion_core.InversionRunner.run
    monkeypatch.setattr(inversion_core.InversionRunner, "run",
                        lambda self, *a, **k: runs.append(1) or original_run(self, *a, **k))

    spec = to_job_spec(p2p_payload(result.job_id), storage.get_bytes)
    assert spec.inversion is not None and spec.inversion.method == "null-text"
    runner = BatchRunner(smooth_model, height=SIZE, width=SIZE, steps=STEPS, scheduler="ddim")
    from_store = runner.run([spec])[0]
    core_spec = to_job_spec(p2p_payload(None), storage.get_bytes)
    core_spec.inversion = result.inversion
    from_core = runner.run([core_spec])[0]

    assert runs == []  # the edit loaded x_T and the embeddings; no inversion ran
    assert from_store.ok and from_core.ok, (from_store.error, from_core.error)
    assert (from_store.latents - from_core.latents).abs().max().item() <= TOL
    assert from_store.params["guidance_scale"] == result.inversion.guidance_scale
    assert (from_store.latents[1:] - from_store.latents[:1]).abs().max().item() > TOL  # the target is an edit


def test_edit_naming_an_unreadable_inversion_fails_on_its_field(storage):
    inversion_id = f"bad-{uuid.uuid4().hex[:8]}"
    storage.put_bytes(inversion_arrays_key(inversion_id), b"not safetensors at all")
    with pytest.raises(EditValidationError) as err:
        to_job_spec(p2p_payload(inversion_id), storage.get_bytes)
    assert err.value.field == "inversion_id"


# ---------------------------------------------------------------------------------------------- reuse key


def digest_for(request: InversionRequest, image_sha: str, **over) -> str:
    from service.inversion_cache import inversion_digest

    fields = dict(model=MODEL, image_sha256=image_sha, caption=request.caption, method=request.method,
                  steps=STEPS, guidance_scale=request.guidance_scale, scheduler=request.scheduler, size=SIZE)
    return inversion_digest(**{**fields, **over})


def test_a_finished_inversion_is_found_again_by_its_key_for_its_tenant_only(redis_url, storage, inverted, photo):
    import hashlib

    import redis

    from service.inversion_cache import find_inversion, forget_inversion, remember_inversion
    from service.keys import inversion_cache_key

    connection = redis.Redis.from_url(redis_url)
    request = InversionRequest(caption=CAPTION, method="ddim")
    image_sha = hashlib.sha256(photo.tobytes()).hexdigest()
    digest = digest_for(request, image_sha)
    result = inverted["ddim"]
    store_inversion(storage, result)
    remember_inversion(connection, "alice", digest, result.job_id, ttl_seconds=3600)

    assert find_inversion(connection, "alice", digest) == result.job_id
    assert 0 < connection.ttl(inversion_cache_key("alice", digest)) <= 3600
    assert find_inversion(connection, "bob", digest) is None  # another tenant never reuses it
    for changed in (dict(guidance_scale=1.0), dict(method="null-text"), dict(steps=STEPS + 1), dict(size=128),
                    dict(caption="a cat"), dict(model="tiny-sd"), dict(image_sha256="0" * 64)):
        assert digest_for(request, image_sha, **changed) != digest, changed
    # the hit is loadable as the edit's starting point
    spec = to_job_spec(p2p_payload(find_inversion(connection, "alice", digest)), storage.get_bytes)
    assert torch.equal(spec.inversion.x_t, result.inversion.x_t.float())
    forget_inversion(connection, "alice", digest)
    assert find_inversion(connection, "alice", digest) is None


def test_progress_reports_ddim_steps_then_inner_iterations(smooth_model, photo):
    from worker.runtime.inversions import progress_view

    seen: list = []
    request = InversionRequest(caption=CAPTION, method="null-text", num_inner_steps=3, early_stop_epsilon=0.0)
    [result] = run_inversions(smooth_model, [inversion_spec("p", request, photo)], size=SIZE, steps=STEPS,
                              on_progress=lambda p: seen.append((p.phase, p.done, progress_view(p))))
    assert result.ok, result.error
    ddim = [view for phase, _, view in seen if phase == "ddim"]
    assert [v.step for v in ddim] == list(range(1, STEPS + 1)) and all(v.total == STEPS for v in ddim)
    inner = [view for phase, _, view in seen if phase == "null-text"]
    assert inner and all(v.inner_total == 3 and 0 <= v.inner_iterations <= 3 for v in inner)
    assert max(v.inner_iterations for v in inner) >= 1
    done = [d for _, d, _ in seen]
    assert done == sorted(done)  # the bar never moves back
