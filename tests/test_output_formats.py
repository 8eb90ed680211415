"""``output_format`` / ``output_quality`` (issue 13) end to end: real gateway over HTTP, an in-process worker on
tiny models, Redis and the S3 endpoint; the files carry AUTOMATIC1111-style ``parameters`` and S3 names that
say what each output is; the SDK's download keeps those names."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from gateway_support import gateway_app, gateway_settings, live, png  # noqa: F401  (fixtures)
from PIL import Image

from editserve.client import Client
from worker.runtime.outputs import encode_image, read_parameters

P2P = {"kind": "p2p", "source_prompt": "a cat riding a bike", "target_prompts": ["a dog riding a bike"],
       "steps": 2, "seed": 5, "height": 64, "width": 64, "negative_prompt": "blurry"}
FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}


def finished(client: httpx.Client, worker, body: dict) -> dict:
    response = client.post("/v1/edits", json=body)
    assert response.status_code == 202, response.text
    edit_id = response.json()["id"]
    assert worker.run_once(5.0) is not None
    edit = client.get(f"/v1/edits/{edit_id}").json()
    assert edit["status"] == "succeeded", edit
    return edit


def fetch(url: str) -> httpx.Response:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    return response


@pytest.mark.parametrize("fmt", ["webp", "jpeg", "png"])
def test_p2p_outputs_in_the_asked_format_carry_their_parameters(live, make_worker, fmt, tmp_path):
    worker = make_worker()
    with live.client() as client:
        edit = finished(client, worker, dict(P2P, output_format=fmt, output_quality=70))
    ext = "jpg" if fmt == "jpeg" else fmt
    names = [r["url"].split("?")[0].rsplit("/", 1)[1] for r in edit["results"]]
    assert names == [f"output-0-source.{ext}", f"output-1-target-1.{ext}"]  # the result list order kept
    for result, prompt in zip(edit["results"], ["a cat riding a bike", "a dog riding a bike"]):
        response = fetch(result["url"])
        assert response.headers["content-type"] == f"image/{fmt}"
        image = Image.open(io.BytesIO(response.content))
        assert image.format == FORMATS[fmt] and image.size == (64, 64)
        text = read_parameters(response.content)
        assert text is not None and text.splitlines()[0] == prompt
        assert text.splitlines()[1] == "Negative prompt: blurry"
        assert "Steps: 2, Sampler: ddim, CFG scale: 7.5, Seed: 5, Size: 64x64, Model: tiny-sd" in text

    paths = Client(live.url).download(edit["id"], tmp_path, attention_maps=False)
    assert sorted(p.name for p in paths) == sorted(f"{edit['id']}-{name}" for name in names)


def test_ip2p_sweep_cells_are_named_by_cell_and_embed_their_guidance(live, make_worker):
    worker = make_worker()
    image = base64.b64encode(png(64, 64)).decode()
    body = {"kind": "ip2p", "instruction": "make it snowy", "image": image, "resolution": 64, "steps": 2,
            "seed": 2, "output_format": "webp", "sweep": {"image_guidance": [1.0, 1.5], "text_guidance": [7.5]}}
    with live.client() as client:
        edit = finished(client, worker, body)
    names = [r["url"].split("?")[0].rsplit("/", 1)[1] for r in edit["results"]]
    expected = [f"output-{r['index']}-ig{r['image_guidance']:g}-tg{r['text_guidance']:g}-seed{r['seed']}.webp"
                for r in edit["results"]]
    assert names == expected and len(set(names)) == 2
    for result in edit["results"]:
        data = fetch(result["url"]).content
        assert Image.open(io.BytesIO(data)).format == "WEBP"
        text = read_parameters(data)
        assert text.splitlines()[0] == "make it snowy"
        assert f"Image CFG scale: {result['image_guidance']:g}, Seed: {result['seed']}" in text


def test_quality_changes_lossy_bytes_and_bad_formats_are_refused_by_field(live):
    picture = Image.effect_noise((64, 64), 64).convert("RGB")
    for fmt in ("webp", "jpeg"):
        assert len(encode_image(picture, fmt, 20, "p")) < len(encode_image(picture, fmt, 95, "p"))
    with live.client() as client:
        for field, value in (("output_format", "gif"), ("output_quality", 0), ("output_quality", 101)):
            response = client.post("/v1/edits", json=dict(P2P, **{field: value}))
            assert response.status_code == 422, response.text
            assert response.json()["error"]["field"] == field


def test_cli_format_flags_reach_the_worker_and_downloads_keep_the_names(live, make_worker, tmp_path, capsys,
                                                                        monkeypatch):
    from editserve import cli

    monkeypatch.setenv("EDITSERVE_URL", live.url)
    assert cli.main(["edit", "p2p", "--source", "a cat", "--target", "a dog", "--steps", "2", "--seed", "3",
                     "--size", "64", "--format", "jpeg", "--quality", "60", "--no-wait"]) == 0
    edit_id = capsys.readouterr().out.strip()
    assert make_worker().run_once(5.0) is not None
    assert cli.main(["wait", edit_id, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / f"{edit_id}-output-0-source.jpg"), str(tmp_path / f"{edit_id}-output-1-target-1.jpg")]
    data = (tmp_path / f"{edit_id}-output-1-target-1.jpg").read_bytes()
    assert Image.open(io.BytesIO(data)).format == "JPEG" and read_parameters(data).startswith("a dog\n")
