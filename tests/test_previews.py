"""Intermediate previews (issue 13) end to end: the real gateway over HTTP (SSE and GET), an in-process worker
on tiny models (request-level and step-level runners), Redis and the S3 endpoint; and the linear
latent→RGB approximation on known latents."""

from __future__ import annotations

import io
import json
import threading

import httpx
import numpy as np
import pytest
import torch
from gateway_support import gateway_app, gateway_settings, live  # noqa: F401  (fixtures)
from PIL import Image

from worker.editing.previews import PREVIEW_SIDE, due, latent_to_rgb

P2P = {"kind": "p2p", "source_prompt": "a cat riding a bike", "target_prompts": ["a dog riding a bike"],
       "steps": 5, "seed": 5, "height": 64, "width": 64}


def test_latent_to_rgb_on_known_latents():
    latent = torch.zeros(4, 2, 3)
    latent[0, 0, 0] = 1.0  # channel 0 alone: its factors (0.3512, 0.2297, 0.3227)
    latent[3, 1, 2] = 1.0  # channel 3 alone: (-0.2120, -0.2616, -0.7177)
    latent[:, 0, 1] = torch.tensor([10.0, 10.0, 0.0, 0.0])  # clamps at white
    rgb = latent_to_rgb(latent)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [172, 157, 169]  # round((f + 1) / 2 · 255)
    assert rgb[1, 2].tolist() == [100, 94, 36]
    assert rgb[0, 1].tolist() == [255, 255, 255]
    assert rgb[1, 0].tolist() == [128, 128, 128]  # a zero latent is mid grey
    assert [s for s in range(1, 8) if due(s, 7, 3)] == [3, 6] and not any(due(s, 7, 0) for s in range(1, 8))


def stream_events(live, edit_id: str, events: list, subscribed: threading.Event) -> None:
    with httpx.Client(base_url=live.url, timeout=120) as client:
        with client.stream("GET", f"/v1/edits/{edit_id}/events") as response:
            name = None
            for line in response.iter_lines():
                if line.startswith("event:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    events.append((name, json.loads(line.split(":", 1)[1])))
                    subscribed.set()


def run_with_stream(live, worker, body: dict, run) -> tuple[dict, list]:
    with live.client() as client:
        created = client.post("/v1/edits", json=body)
        assert created.status_code == 202, created.text
        edit_id = created.json()["id"]
        events: list = []
        subscribed = threading.Event()
        reader = threading.Thread(target=stream_events, args=(live, edit_id, events, subscribed), daemon=True)
        reader.start()
        assert subscribed.wait(30)  # the stream is open (first status sent) before the worker starts
        run(worker)
        reader.join(60)
        assert not reader.is_alive()
        return client.get(f"/v1/edits/{edit_id}").json(), events


def check_preview(url: str, outputs: int) -> None:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "WEBP" and image.size == (outputs * PREVIEW_SIDE, PREVIEW_SIDE)  # side by side
    assert np.asarray(image).std() > 1.0  # a picture, not a flat fill


@pytest.mark.parametrize("batching,outputs", [("request", 1), ("step", 1), ("request", 2)])
def test_previews_arrive_over_sse_at_the_promised_steps_and_in_get(live, make_worker, batching, outputs):
    worker = make_worker(batching=batching)
    run = (lambda w: w.run_once(5.0)) if batching == "request" else (lambda w: w.continuous.run_until_idle(120))
    try:
        edit, events = run_with_stream(live, worker, dict(P2P, preview_every=2, num_outputs=outputs), run)
    finally:
        if worker.continuous is not None:
            worker.continuous.close()
    assert edit["status"] == "succeeded", edit
    previews = [data["preview"] for name, data in events if name == "preview"]
    assert [p["step"] for p in previews] == [2, 4]  # every 2 of 5 steps, the last step is the result itself
    assert all(p["total"] == 5 for p in previews)
    assert len({p["url"].split("?")[0] for p in previews}) == 2  # each step its own picture
    for p in previews:
        check_preview(p["url"], outputs=2 * outputs)  # every image of the edit (seed groups too)
    assert edit["preview"]["step"] == 4  # GET: the latest preview
    check_preview(edit["preview"]["url"], outputs=2 * outputs)


def test_an_edit_without_the_option_gets_no_preview(live, make_worker):
    worker = make_worker()
    edit, events = run_with_stream(live, worker, P2P, lambda w: w.run_once(5.0))
    assert edit["status"] == "succeeded" and edit["preview"] is None
    assert [name for name, _ in events if name == "preview"] == []
    assert all(data["preview"] is None for _, data in events)


def test_preview_every_is_bounded_and_named_in_errors(live):
    with live.client() as client:
        for value, field in [(6, "preview_every"), (-1, "preview_every"), (201, "preview_every")]:
            response = client.post("/v1/edits", json=dict(P2P, preview_every=value))
            assert response.status_code == 422, response.text
            assert response.json()["error"]["field"] == field


def test_cli_and_sdk_send_preview_every(live, capsys, monkeypatch):
    from editserve import cli
    from editserve.client import Client

    monkeypatch.setenv("EDITSERVE_URL", live.url)
    assert cli.main(["edit", "p2p", "--source", "a cat", "--target", "a dog", "--steps", "4", "--size", "64",
                     "--preview-every", "2", "--maps-overlay", "--no-wait"]) == 0
    edit_id = capsys.readouterr().out.strip()
    params = Client(live.url).get(edit_id).params
    assert params["preview_every"] == 2 and params["attention_maps"] is True and params["attention_maps_overlay"]
    edit = Client(live.url).submit_ip2p(Image.new("RGB", (64, 64), "red"), "make it snowy", steps=3,
                                        resolution=64, preview_every=1)
    assert edit.params["preview_every"] == 1
    assert cli.main(["edit", "p2p", "--source", "a", "--target", "b", "--steps", "2", "--preview-every", "3",
                     "--no-wait"]) == 2  # refused before sending, the field named
    assert "preview_every" in capsys.readouterr().err


def test_a_configured_tiny_decoder_makes_the_preview(tmp_path):
    from diffusers import AutoencoderTiny

    from worker.editing.previews import preview_images

    AutoencoderTiny().save_pretrained(tmp_path / "taesd")  # random weights: the wiring is what is checked
    latents = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(0))
    decoded = preview_images(latents, str(tmp_path / "taesd"))
    linear = preview_images(latents)
    assert [i.size for i in decoded] == [i.size for i in linear] == [(PREVIEW_SIDE, PREVIEW_SIDE // 2)] * 2
    assert np.abs(np.asarray(decoded[0], float) - np.asarray(linear[0], float)).mean() > 5


def test_ip2p_previews_show_every_cell(live, make_worker):
    import base64

    from gateway_support import png

    worker = make_worker()
    body = {"kind": "ip2p", "instruction": "make it snowy", "image": base64.b64encode(png(64, 64)).decode(),
            "resolution": 64, "steps": 3, "seed": 2, "preview_every": 1,
            "sweep": {"image_guidance": [1.0, 1.5], "text_guidance": [7.5]}}
    edit, events = run_with_stream(live, worker, body, lambda w: w.run_once(5.0))
    assert edit["status"] == "succeeded", edit
    previews = [data["preview"] for name, data in events if name == "preview"]
    assert [p["step"] for p in previews] == [1, 2]
    check_preview(previews[-1]["url"], outputs=2)  # one tile per sweep cell
