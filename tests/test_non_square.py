"""Non-square work end to end: the official IP2P resize gives 512×384-like shapes, so every layer must keep height
and width apart. Core (IP2P and P2P against diffusers at 64×128), worker (in-process, real Redis and S3) and
gateway (HTTP submit, official resize, presigned downloads). A height/width swap anywhere changes a shape, an
orientation or a latent and fails here. Shapes: 64 px high, 128 px wide -> latents 8×16 -> blend grid 2×4,
attention maps 8×16 (``attention_maps.map_grid``: the latent itself at this size).
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from fastapi.testclient import TestClient
from gateway_support import gateway_app, gateway_settings  # noqa: F401  (fixtures)
from PIL import Image

from editserve.contract import EditStatus
from service.imaging import official_resize, official_resize_dims
from worker.editing.batch import BatchRunner
from worker.editing.ip2p import encode_image_latents
from worker.editing.jobs import EditValidationError, IP2PCell, IP2PJobSpec, LocalBlendSpec, P2PJobSpec

HEIGHT, WIDTH, STEPS, TOL = 64, 128, 3, 1e-4
LATENT = (HEIGHT // 8, WIDTH // 8)
RED, BLUE = (220, 20, 20), (20, 20, 220)


def two_colour(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: a transposed or mirrored copy is told apart at once."""
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return Image.fromarray(pixels)


def assert_left_red_right_blue(image: Image.Image) -> None:
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    w = pixels.shape[1]
    assert np.abs(pixels[:, : w // 4] - RED).max() <= 8
    assert np.abs(pixels[:, 3 * w // 4 :] - BLUE).max() <= 8


# --- the official resize ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size,resolution,expected", [
    ((4032, 3024), 512, (512, 384)), ((3024, 4032), 512, (384, 512)),
    ((200, 100), 128, (128, 64)), ((100, 200), 128, (64, 128)), ((1600, 1200), 256, (256, 192)),
])
def test_official_resize_keeps_orientation(size, resolution, expected):
    assert official_resize_dims(*size, resolution) == expected
    resized = official_resize(two_colour(*size), resolution)
    assert resized.size == expected
    if expected[0] > expected[1]:
        assert_left_red_right_blue(resized)


# --- core: IP2P ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ip2p_model(tiny_models):
    from service.config import Settings
    from worker.models.registry import ModelRegistry

    return ModelRegistry(Settings(models_dir=tiny_models["tiny-ip2p"].parent)).get("tiny-ip2p")


@pytest.fixture(scope="module")
def wide_input() -> Image.Image:
    return official_resize(two_colour(200, 100), 128)


def test_ip2p_non_square_matches_diffusers(ip2p_model, wide_input):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    runner = BatchRunner(ip2p_model, height=HEIGHT, width=WIDTH, steps=STEPS, scheduler="euler_a")
    cell = IP2PCell(7.5, 1.5, 21)
    result = runner.run([IP2PJobSpec("wide", wide_input, "make it snowy", [cell])])[0]
    assert result.ok, result.error
    assert result.latents.shape == (1, 4, *LATENT)
    assert result.pixels.shape == (1, HEIGHT, WIDTH, 3)
    assert result.images[0].size == (WIDTH, HEIGHT)
    assert result.params["height"] == HEIGHT and result.params["width"] == WIDTH

    pipe = StableDiffusionInstructPix2PixPipeline(**{**ip2p_model.pipe.components,
                                                     "scheduler": ip2p_model.new_scheduler("euler_a")})
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("make it snowy", image=wide_input, num_inference_steps=STEPS, guidance_scale=7.5,
                     image_guidance_scale=1.5, generator=torch.Generator().manual_seed(21),
                     output_type="latent").images
    assert reference.shape == result.latents.shape
    assert (result.latents - reference.float()).abs().max().item() <= TOL


def test_ip2p_image_latents_keep_orientation(ip2p_model, wide_input):
    latents = encode_image_latents(ip2p_model, wide_input)
    assert latents.shape == (1, 4, *LATENT)
    portrait = encode_image_latents(ip2p_model, wide_input.transpose(Image.Transpose.TRANSPOSE))
    assert portrait.shape == (1, 4, LATENT[1], LATENT[0])


def test_ip2p_refuses_an_input_of_the_transposed_size(ip2p_model, wide_input):
    runner = BatchRunner(ip2p_model, height=HEIGHT, width=WIDTH, steps=STEPS, scheduler="euler_a")
    portrait = wide_input.transpose(Image.Transpose.TRANSPOSE)  # 64 wide, 128 high
    result = runner.run([IP2PJobSpec("tall", portrait, "make it snowy", [IP2PCell(7.5, 1.5, 1)])])[0]
    assert isinstance(result.error, EditValidationError) and result.error.field == "image"


def test_ip2p_empty_instruction_returns_the_wide_input(ip2p_model, wide_input):
    runner = BatchRunner(ip2p_model, height=HEIGHT, width=WIDTH, steps=STEPS, scheduler="euler_a")
    result = runner.run([IP2PJobSpec("same", wide_input, "  ", [IP2PCell(7.5, 1.5, 1)])])[0]
    assert result.images[0].size == (WIDTH, HEIGHT) and result.pixels.shape == (1, HEIGHT, WIDTH, 3)
    assert_left_red_right_blue(result.images[0])


# --- core: P2P -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_runner(sd_model):
    return BatchRunner(sd_model, height=HEIGHT, width=WIDTH, steps=STEPS, scheduler="ddim")


def test_p2p_non_square_zero_injection_matches_diffusers(wide_runner, sd_model):
    from diffusers import StableDiffusionPipeline

    spec = P2PJobSpec("zero", "a cat riding a bicycle", ["a dog riding a bicycle"], seed=5,
                      cross_replace_steps=0.0, self_replace_steps=0.0)
    ours = wide_runner.run([spec])[0]
    assert ours.ok, ours.error
    pipe = StableDiffusionPipeline(**{**sd_model.pipe.components, "scheduler": sd_model.new_scheduler("ddim")})
    pipe.set_progress_bar_config(disable=True)
    x_t = randn_tensor((1, 4, *LATENT), generator=torch.Generator().manual_seed(5))
    reference = pipe(spec.prompts, latents=x_t.expand(2, -1, -1, -1), height=HEIGHT, width=WIDTH,
                     num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent").images
    assert ours.latents.shape == reference.shape == (2, 4, *LATENT)
    assert (ours.latents - reference).abs().max().item() <= TOL


def test_p2p_non_square_maps_blend_and_images(wide_runner):
    spec = P2PJobSpec("wide", "a cat on a sofa", ["a dog on a sofa"], seed=3, attention_map_prompts=[0, 1],
                      local_blend=LocalBlendSpec(["cat"], [["dog"]], threshold=0.5))
    result = wide_runner.run([spec])[0]
    assert result.ok, result.error
    assert result.latents.shape == (2, 4, *LATENT)
    assert [image.size for image in result.images] == [(WIDTH, HEIGHT)] * 2
    assert result.pixels.shape == (2, HEIGHT, WIDTH, 3)
    for maps in result.attention_maps:
        assert maps.maps.shape == (len(maps.tokens), *LATENT)  # map_grid(8×16) = 8×16 (blend: its own 2×4)
        grid = Image.open(io.BytesIO(maps.grid_png))
        assert grid.width > grid.height  # each tile is wider than high


# --- worker and gateway ----------------------------------------------------------------------------------

def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def download(url: str) -> bytes:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    return response.content


def test_gateway_and_worker_keep_wide_ip2p_wide(gateway_app, make_worker):
    client = TestClient(gateway_app)
    image = base64.b64encode(png_bytes(two_colour(200, 100))).decode()
    response = client.post("/v1/edits", json={"kind": "ip2p", "instruction": "make it snowy", "image": image,
                                              "resolution": 128, "steps": 2, "seed": 4})
    assert response.status_code == 202, response.text
    edit_id = response.json()["id"]
    store = gateway_app.state.services.jobstore
    payload = store.load_payload(edit_id)
    assert (payload.batch_key.height, payload.batch_key.width) == (HEIGHT, WIDTH)
    stored = Image.open(io.BytesIO(gateway_app.state.services.storage.get_bytes(payload.input_image_key)))
    assert stored.size == (WIDTH, HEIGHT)
    assert_left_red_right_blue(stored)

    worker = make_worker()
    report = worker.run_once(5.0)
    assert report is not None and set(report.outcomes) == {edit_id}
    edit = client.get(f"/v1/edits/{edit_id}").json()
    assert edit["status"] == EditStatus.succeeded.value, edit
    assert edit["params"]["height"] == HEIGHT and edit["params"]["width"] == WIDTH
    [result] = edit["results"]
    assert (result["width"], result["height"]) == (WIDTH, HEIGHT)
    assert Image.open(io.BytesIO(download(result["url"]))).size == (WIDTH, HEIGHT)


def test_gateway_and_worker_keep_wide_p2p_wide(gateway_app, make_worker):
    client = TestClient(gateway_app)
    response = client.post("/v1/edits", json={"kind": "p2p", "source_prompt": "a cat on a sofa",
                                              "target_prompts": ["a dog on a sofa"], "height": HEIGHT,
                                              "width": WIDTH, "steps": 2, "seed": 9, "attention_maps": [1]})
    assert response.status_code == 202, response.text
    edit_id = response.json()["id"]
    worker = make_worker()
    assert worker.run_once(5.0) is not None
    edit = client.get(f"/v1/edits/{edit_id}").json()
    assert edit["status"] == EditStatus.succeeded.value, edit
    assert edit["params"]["height"] == HEIGHT and edit["params"]["width"] == WIDTH
    assert [(r["width"], r["height"]) for r in edit["results"]] == [(WIDTH, HEIGHT)] * 2
    for result in edit["results"]:
        assert Image.open(io.BytesIO(download(result["url"]))).size == (WIDTH, HEIGHT)
    [maps] = edit["attention_maps"]
    array = np.load(io.BytesIO(download(maps["array_url"])))
    assert array.shape == (len(maps["tokens"]), *LATENT)
