"""Several outputs per request (``num_outputs`` / ``seeds``) and IP2P ``output_size`` (issue 13).

Core: a P2P job with seeds [a, b] is two groups (source + targets each) in the job's UNet rows; its outputs equal
two requests with seed a and seed b (fp32 latents and float pixels, <= 1e-4), alone and batched with another job.
IP2P: the seeds become the sweep's seed axis, translated from the request as the gateway resolves it.
End to end (HTTP gateway, in-process worker on tiny models, Redis, the S3 endpoint): counts, object names that
say which seed made which file, seeds in the record and in each file's parameters; refusals name the field;
``output_size`` gives the model's resize or the input's own size for a non-square input.
"""

from __future__ import annotations

import base64
import io
from datetime import UTC, datetime

import httpx
import numpy as np
import pytest
from gateway_support import gateway_app, gateway_settings, live, png  # noqa: F401  (fixtures)
from PIL import Image

from editserve.contract import MAX_OUTPUT_IMAGES, BatchKey, IP2PEditRequest, JobPayload
from service.edit_validation import ip2p_seeds
from service.imaging import official_resize_dims
from worker.editing.batch import BatchRunner
from worker.editing.jobs import LocalBlendSpec, P2PJobSpec
from worker.runtime.execute import to_job_spec
from worker.runtime.outputs import read_parameters

SIZE, STEPS, TOL = 64, 3, 1e-4
SCHED = "ddim"  # IP2P core check: several cells are one UNet call of 3k rows (the sweep's batching)


@pytest.fixture(scope="module", autouse=True)
def _models_before_the_gateway(worker_registry):
    """Load the tiny models before any in-process gateway starts: loaded after one (a -k selection of the
    end-to-end tests alone), diffusers' IP2P pipeline import fails in this process on CLIPImageProcessor."""
    return worker_registry


def p2p(job_id: str, **kw) -> P2PJobSpec:
    return P2PJobSpec(job_id, "a cat on a sofa", ["a lion on a sofa", "a tiger on a sofa"],
                      local_blend=LocalBlendSpec(["cat"], [["lion"], ["tiger"]]), reweight=[{"lion": 2.0}, {}],
                      guidance_scale=5.0, **kw)


def assert_close(a, b) -> None:
    assert a.ok and b.ok, (a.error, b.error)
    assert a.latents.shape == b.latents.shape
    assert (a.latents - b.latents).abs().max().item() <= TOL
    assert np.abs(a.pixels - b.pixels).max() <= TOL


def part(result, group: int, n: int):
    """Group ``group`` (n images) of a multi-seed result, as a result of its own."""
    from worker.editing.jobs import JobResult

    return JobResult(job_id=result.job_id, latents=result.latents[group * n:(group + 1) * n],
                     pixels=result.pixels[group * n:(group + 1) * n])


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_p2p_seeds_equal_one_request_per_seed_alone_and_batched(worker_registry, scheduler):
    """Alone: [a, b] equals a alone and b alone. Batched with another edit: equals the two single-seed requests
    batched with it (the same UNet call composition; see test_schedulers for batched vs alone). One torch thread,
    as the worker fixture runs (multi-threaded CPU kernels split work by row count: ~3e-4 apart under euler_a)."""
    runner = BatchRunner(worker_registry.get("tiny-sd"), height=SIZE, width=SIZE, steps=STEPS, scheduler=scheduler)
    alone = {seed: runner.run([p2p(f"s{seed}", seed=seed)])[0] for seed in (11, 12)}
    assert (alone[11].latents - alone[12].latents).abs().max().item() > 1e-2  # the seeds make different images
    many = runner.run([p2p("many", seed=11, seeds=[11, 12])])[0]
    assert many.ok, many.error
    assert many.latents.shape[0] == 6 and len(many.images) == 6
    assert many.labels == ["a cat on a sofa", "a lion on a sofa", "a tiger on a sofa"] * 2
    assert [many.params["seeds"], many.params["seed"]] == [[11, 12], 11]
    for group, seed in enumerate((11, 12)):
        assert_close(part(many, group, 3), alone[seed])

    other = P2PJobSpec("other", "a house", ["a castle"], seed=3, edit="none")
    batched_many, batched_other = runner.run([p2p("many", seed=11, seeds=[11, 12]), other])
    singles = runner.run([p2p("s11", seed=11), p2p("s12", seed=12), other])
    for group in range(2):
        assert_close(part(batched_many, group, 3), singles[group])
    assert_close(batched_other, singles[2])


def test_p2p_seeds_share_the_step_batch_as_rows(worker_registry):
    """One UNet call per step carries both groups: the job's rows are 2 × prompts × seeds."""
    runner = BatchRunner(worker_registry.get("tiny-sd"), height=SIZE, width=SIZE, steps=STEPS, scheduler="ddim")
    state = runner.prepare(p2p("rows", seed=1, seeds=[1, 2, 3]))
    assert state.num_rows == 2 * 3 * 3 and state.row_groups == [6, 6, 6]
    assert [rows for rows, _ in state.attention_segments()] == [6, 6, 6]
    assert len({id(ctrl) for _, ctrl in state.attention_segments()}) == 3  # one controller per group


def ip2p_payload(job_id: str, **fields) -> JobPayload:
    request = IP2PEditRequest(instruction="make it snowy", steps=STEPS, scheduler=SCHED, resolution=SIZE,
                              model="tiny-ip2p", **fields)
    key = BatchKey(model="tiny-ip2p", kind="ip2p", height=SIZE, width=SIZE, steps=STEPS, scheduler=SCHED)
    return JobPayload(id=job_id, tenant="t", request=request, batch_key=key, seeds=ip2p_seeds(request),
                      input_image_key="in", created_at=datetime.now(UTC))


def test_ip2p_seeds_equal_one_request_per_seed(worker_registry):
    model = worker_registry.get("tiny-ip2p")
    runner = BatchRunner(model, height=SIZE, width=SIZE, steps=STEPS, scheduler=SCHED)
    fetch = {"in": png(SIZE, SIZE, (40, 160, 90))}.__getitem__
    many = runner.run([to_job_spec(ip2p_payload("many", seeds=[21, 22]), fetch)])[0]
    alone = [runner.run([to_job_spec(ip2p_payload(f"s{s}", seed=s), fetch)])[0] for s in (21, 22)]
    assert len(many.images) == 2 and [c["seed"] for c in many.params["cells"]] == [21, 22]
    for i, single in enumerate(alone):
        assert_close(part(many, i, 1), single)
    # num_outputs from a seed: consecutive seeds, crossed with a guidance sweep (seed varies fastest)
    swept = ip2p_payload("swept", seed=7, num_outputs=2, sweep={"image_guidance": [1.0, 1.5]})
    assert swept.seeds == [7, 8, 7, 8]


# ------------------------------------------------------------------------------------------ end to end

P2P = {"kind": "p2p", "source_prompt": "a cat riding a bike", "target_prompts": ["a dog riding a bike"],
       "steps": 2, "height": 64, "width": 64}


def finished(client: httpx.Client, worker, body: dict, files=None) -> dict:
    if files is None:
        response = client.post("/v1/edits", json=body)
    else:
        response = client.post("/v1/edits", data={"request": __import__("json").dumps(body)}, files=files)
    assert response.status_code == 202, response.text
    edit_id = response.json()["id"]
    assert worker.run_once(5.0) is not None
    edit = client.get(f"/v1/edits/{edit_id}").json()
    assert edit["status"] == "succeeded", edit
    return edit


def names(edit: dict) -> list[str]:
    return [r["url"].split("?")[0].rsplit("/", 1)[1] for r in edit["results"]]


def fetch(url: str) -> bytes:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    return response.content


def test_p2p_seeds_end_to_end(live, make_worker):
    worker = make_worker()
    with live.client() as client:
        edit = finished(client, worker, dict(P2P, seeds=[3, 8]))
        counted = finished(client, worker, dict(P2P, seed=5, num_outputs=2))
    assert names(edit) == ["output-0-seed3-source.png", "output-1-seed3-target-1.png",
                           "output-2-seed8-source.png", "output-3-seed8-target-1.png"]
    assert [r["seed"] for r in edit["results"]] == [3, 3, 8, 8]
    assert [r["label"] for r in edit["results"]] == ["a cat riding a bike", "a dog riding a bike"] * 2
    assert edit["params"]["seeds"] == [3, 8]
    for result in edit["results"]:
        text = read_parameters(fetch(result["url"]))
        assert f"Seed: {result['seed']}," in text and text.splitlines()[0] == result["label"]
    images = [np.asarray(Image.open(io.BytesIO(fetch(r["url"]))), dtype=np.int16) for r in edit["results"]]
    assert np.abs(images[0] - images[2]).max() > 0  # each seed its own source
    assert counted["params"]["seeds"] == [5, 6] and [r["seed"] for r in counted["results"]] == [5, 5, 6, 6]


def test_ip2p_num_outputs_and_seeds_end_to_end(live, make_worker):
    worker = make_worker()
    image = base64.b64encode(png(64, 64)).decode()
    body = {"kind": "ip2p", "instruction": "make it snowy", "image": image, "resolution": 64, "steps": 2,
            "seeds": [4, 9], "sweep": {"image_guidance": [1.0, 1.5]}}
    with live.client() as client:
        edit = finished(client, worker, body)
    assert names(edit) == ["output-0-ig1-tg7.5-seed4.png", "output-1-ig1-tg7.5-seed9.png",
                           "output-2-ig1.5-tg7.5-seed4.png", "output-3-ig1.5-tg7.5-seed9.png"]
    assert [r["seed"] for r in edit["results"]] == [4, 9, 4, 9]
    assert edit["params"]["seeds"] == [4, 9, 4, 9]
    assert [c["seed"] for c in edit["params"]["cells"]] == [4, 9, 4, 9]
    assert "Seed: 9" in read_parameters(fetch(edit["results"][1]["url"]))


@pytest.mark.parametrize("body,field", [
    (dict(P2P, seeds=[1, 2], seed=1), "seeds"),
    (dict(P2P, seeds=[1, 2], num_outputs=3), "num_outputs"),
    (dict(P2P, num_outputs=MAX_OUTPUT_IMAGES), "num_outputs"),  # × 2 prompts: over the cap
    (dict(P2P, seeds=list(range(13))), "seeds"),
    (dict(P2P, num_outputs=0), "num_outputs"),
    (dict(P2P, seeds=[]), "seeds"),
    (dict(P2P, seeds=[-1]), "seeds.0"),
    ({"kind": "ip2p", "instruction": "x", "seeds": [1], "sweep": {"seeds": [2, 3]}}, "seeds"),
    ({"kind": "ip2p", "instruction": "x", "num_outputs": 2, "sweep": {"seeds": [2, 3]}}, "num_outputs"),
    ({"kind": "ip2p", "instruction": "x", "num_outputs": 13, "sweep": {"image_guidance": [1, 2]}}, "num_outputs"),
    ({"kind": "ip2p", "instruction": "x", "output_size": "original"}, "output_size"),
])
def test_conflicts_and_caps_are_refused_naming_the_field(live, body, field):
    with live.client() as client:
        response = client.post("/v1/edits", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


@pytest.mark.parametrize("output_size", ["model", "input", None])
def test_ip2p_output_size_for_a_non_square_input(live, make_worker, output_size):
    worker = make_worker()
    body = {"kind": "ip2p", "instruction": "make it snowy", "resolution": 128, "steps": 2, "seed": 1,
            "num_outputs": 2}
    if output_size is not None:
        body["output_size"] = output_size
    with live.client() as client:
        edit = finished(client, worker, body, files={"image": ("in.png", png(96, 64), "image/png")})
    model_size = official_resize_dims(96, 64, 128)
    assert model_size != (96, 64)
    expected = (96, 64) if output_size == "input" else model_size  # default: the model's resize (as before)
    assert edit["params"]["output_size"] == (output_size or "model")
    assert len(edit["results"]) == 2
    for result in edit["results"]:
        assert (result["width"], result["height"]) == expected
        data = fetch(result["url"])
        assert Image.open(io.BytesIO(data)).size == expected
        assert f"Size: {expected[0]}x{expected[1]}" in read_parameters(data)


def test_cli_flags_reach_the_worker(live, make_worker, tmp_path, capsys, monkeypatch):
    from editserve import cli

    monkeypatch.setenv("EDITSERVE_URL", live.url)
    source = tmp_path / "in.png"
    source.write_bytes(png(96, 64))
    assert cli.main(["edit", "p2p", "--source", "a cat", "--target", "a dog", "--steps", "2", "--size", "64",
                     "--seeds", "1,2", "--no-wait"]) == 0
    p2p_id = capsys.readouterr().out.strip()
    assert cli.main(["edit", "ip2p", "--image", str(source), "--instruction", "make it snowy", "--steps", "2",
                     "--resolution", "64", "--seed", "4", "--num-outputs", "2", "--output-size", "input",
                     "--no-wait"]) == 0
    ip2p_id = capsys.readouterr().out.strip()
    worker = make_worker()
    while worker.run_once(2.0) is not None:
        pass
    assert cli.main(["wait", p2p_id, "--out", str(tmp_path / "p2p")]) == 0
    assert [p.rsplit("-", 1)[0].split(f"{p2p_id}-")[1] for p in capsys.readouterr().out.split()] == [
        "output-0-seed1", "output-1-seed1-target", "output-2-seed2", "output-3-seed2-target"]
    assert cli.main(["wait", ip2p_id, "--out", str(tmp_path / "ip2p")]) == 0
    paths = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == [f"{ip2p_id}-output-0-ig1.5-tg7.5-seed4.png",
                                                    f"{ip2p_id}-output-1-ig1.5-tg7.5-seed5.png"]
    assert all(Image.open(p).size == (96, 64) for p in paths)


def test_step_batching_runs_a_seeds_edit_beside_a_single_seed_one(live, make_worker):
    """The step-level worker admits the seeds edit by its rows (2 × prompts × seeds) beside another edit; its
    seed-8 group comes out as the single seed-8 request does."""
    worker = make_worker(batching="step", row_budget=24, poll_interval_ms=5)
    try:
        with live.client() as client:
            ids = [client.post("/v1/edits", json=body).json()["id"]
                   for body in (dict(P2P, seeds=[3, 8]), dict(P2P, seed=8))]
            outcomes = worker.continuous.run_until_idle(300)
            assert outcomes == {i: "succeeded" for i in ids}
            many, single = (client.get(f"/v1/edits/{i}").json() for i in ids)
    finally:
        worker.continuous.close()
    assert len(many["results"]) == 4 and [r["seed"] for r in many["results"]] == [3, 3, 8, 8]
    for mine, theirs in zip(many["results"][2:], single["results"]):
        a, b = (np.asarray(Image.open(io.BytesIO(fetch(r["url"]))), dtype=np.int16) for r in (mine, theirs))
        assert np.abs(a - b).max() <= 1
