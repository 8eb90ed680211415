"""Attention-map grids that can be compared (issue 13): one colour scale per job, the prompt as a title, an
optional overlay on the generated image, maps at ``attention_maps.map_grid`` (tiny-sd, real UNet maps)."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from gateway_support import gateway_app, gateway_settings, live  # noqa: F401  (fixtures)
from PIL import Image

from worker.editing.attention_maps import OVERLAY_MIX, TITLE_PX, heat, map_grid, tile_box
from worker.editing.jobs import P2PJobSpec
from worker.editing.words import token_indices

SIZE, STEPS = 128, 3


def grid_of(attn) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(attn.grid_png)).convert("RGB"), dtype=np.float64)


def tile(picture: np.ndarray, k: int, maps: np.ndarray) -> np.ndarray:
    left, top, right, bottom = tile_box(k, maps.shape[0], *maps.shape[1:])
    return picture[top:bottom, left:right]


def reweight_spec(**extra) -> P2PJobSpec:
    return P2PJobSpec("rw", "a red car", ["a red car"], seed=8, edit="reweight", reweight=[{"red": 4.0}],
                      cross_replace_steps=1.0, self_replace_steps=0.0, attention_map_prompts=[0, 1], **extra)


@pytest.fixture(scope="module")
def plain(runner):
    result = runner.run([reweight_spec()])[0]
    assert result.ok, result.error
    return result


def test_map_resolution_is_the_documented_level():
    assert map_grid((64, 64)) == (16, 16)  # 512 px: the reference's 16×16 (latent/4)
    assert map_grid((128, 128)) == (32, 32)  # 1024 px: latent/4
    assert map_grid((32, 32)) == (16, 16)  # 256 px: latent/2
    assert map_grid((16, 16)) == (16, 16)  # 128 px: the latent itself, not a 4×4 blur
    assert map_grid((8, 8)) == (8, 8) and map_grid((16, 8)) == (16, 8)


def test_reweighted_word_is_brighter_on_the_jobs_one_scale(plain, sd_model):
    source, target = plain.attention_maps
    assert source.maps.shape == (5, 16, 16) and target.maps.shape == (5, 16, 16)  # 128 px → 16×16 maps
    red = token_indices("a red car", "red", sd_model.tokenizer)[0]
    assert target.maps[red].mean() > 3.0 * source.maps[red].mean()  # the raw arrays: ×4 on the word
    source_tile, target_tile = tile(grid_of(source), red, source.maps), tile(grid_of(target), red, target.maps)
    assert target_tile.mean() > 2.0 * source_tile.mean()  # on one scale the boost shows
    others = [k for k in range(1, 4) if k != red]
    for k in others:  # unweighted words look the same in both grids
        assert abs(tile(grid_of(source), k, source.maps).mean() - tile(grid_of(target), k, target.maps).mean()) < 2


def test_each_grid_carries_its_prompt_as_a_title(plain):
    for attn in plain.attention_maps:
        picture = grid_of(attn)
        _, top, _, bottom = tile_box(0, attn.maps.shape[0], *attn.maps.shape[1:])
        assert top == TITLE_PX + 2 and picture.shape[0] > bottom  # taller than the tiles: title + captions
        strip = picture[:TITLE_PX]
        assert (strip < 128).any() and (strip == 255).mean() > 0.5  # dark text on the white strip


def test_overlay_mixes_each_tile_with_the_generated_image(runner, plain):
    overlaid = runner.run([reweight_spec(attention_overlay=True)])[0]
    assert overlaid.ok, overlaid.error
    for index, (attn, bare) in enumerate(zip(overlaid.attention_maps, plain.attention_maps)):
        np.testing.assert_allclose(attn.maps, bare.maps, rtol=1e-5, atol=1e-7)  # same run, same maps
        picture, bare_picture = grid_of(attn), grid_of(bare)
        assert np.abs(picture - bare_picture).mean() > 10  # the overlay is not the grey grid
        k = 2
        over, grey = tile(picture, k, attn.maps), tile(bare_picture, k, bare.maps)[..., 0].astype(np.uint8)
        h, w = over.shape[:2]
        image = np.asarray(overlaid.images[index].convert("RGB").resize((w, h)), dtype=np.float64)
        expected = (1 - OVERLAY_MIX) * image + OVERLAY_MIX * heat(grey)
        assert np.abs(over - expected).mean() < 2.0  # mixed with that prompt's image


def test_overlay_end_to_end_through_the_gateway(live, make_worker):  # noqa: F811
    worker = make_worker()
    body = {"kind": "p2p", "source_prompt": "a cat riding a bike", "target_prompts": ["a dog riding a bike"],
            "steps": 2, "seed": 5, "height": 64, "width": 64, "attention_maps": [1], "attention_maps_overlay": True}
    with live.client() as client:
        created = client.post("/v1/edits", json=body)
        assert created.status_code == 202, created.text
        assert worker.run_once(5.0) is not None
        edit = client.get(f"/v1/edits/{created.json()['id']}").json()
    assert edit["status"] == "succeeded", edit
    (attn,) = edit["attention_maps"]
    maps = np.load(io.BytesIO(httpx.get(attn["array_url"], timeout=10).content))
    assert maps.shape == (len(attn["tokens"]), 8, 8)  # 64 px: the 8×8 latent itself
    picture = np.asarray(Image.open(io.BytesIO(httpx.get(attn["grid_url"], timeout=10).content)).convert("RGB"))
    left, top, right, bottom = tile_box(2, maps.shape[0], 8, 8)
    assert (picture[:TITLE_PX] < 128).any()  # the title
    colours = picture[top:bottom, left:right].astype(int)
    assert (np.abs(colours[..., 0] - colours[..., 2]) > 8).any()  # coloured (mixed), not a grey tile
