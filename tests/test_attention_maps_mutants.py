"""worker/editing/attention_maps.py, the parts people compare grids by: map resolution, the job's one scale, the
heat colours, titles, the overlay and the grid geometry (pure numpy/PIL, no model)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from worker.editing.attention_maps import (
    CAPTION_PX,
    TITLE_PX,
    heat,
    job_peak,
    map_grid,
    render_token_grid,
    tile_box,
    to_grey,
    word_peak,
)


def picture(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


@pytest.mark.parametrize(("latent", "grid"), [
    ((64, 64), (16, 16)), ((64, 60), (16, 15)), ((60, 60), (30, 30)), ((63, 63), (31, 31)), ((32, 32), (16, 16)),
    ((31, 31), (31, 31)), ((64, 2), (16, 1)), ((32, 1), (16, 1)), ((16, 1), (16, 1)), ((8, 64), (2, 16)),
    ((4, 64), (1, 16)), ((1, 8), (1, 8)),
])
def test_map_grid_is_the_finest_level_with_16_cells_on_the_long_side_and_never_empty(latent, grid):
    assert map_grid(latent) == grid


def test_the_word_peak_leaves_out_the_start_and_end_tokens():
    maps = np.zeros((4, 2, 2))
    maps[0], maps[3] = 0.9, 0.8  # start and end tokens take most of the attention
    maps[1, 0, 0], maps[2, 1, 1] = 0.2, 0.3
    assert word_peak(maps) == 0.3
    assert word_peak(maps[:3]) == 0.2  # three tokens: the middle one is the only word
    assert word_peak(maps[:2]) == 0.9  # no word between them: all tokens count
    assert word_peak(np.full((3, 1, 1), np.nan)) == 0.0 and word_peak(np.zeros((0, 2, 2))) == 0.0


def test_the_job_peak_is_the_largest_word_peak_of_its_prompts():
    a, b = np.zeros((3, 1, 1)), np.zeros((3, 1, 1))
    a[1], b[1] = 0.25, 0.5
    assert job_peak([a, b]) == 0.5 and job_peak([b, a]) == 0.5
    assert job_peak([]) == 0.0


def test_grey_on_a_given_peak_clips_above_it_and_below_zero():
    assert to_grey(np.array([[0.25, 0.5, 2.0, -1.0]]), peak=0.5).tolist() == [[128, 255, 255, 0]]
    assert not to_grey(np.ones((2, 2)), peak=0.0).any() and not to_grey(np.ones((2, 2)), peak=-1.0).any()


def test_heat_runs_black_red_yellow_white():
    out = heat(np.array([[0, 51, 85, 170, 255]], dtype=np.uint8))
    assert out.dtype == np.uint8
    assert out[0].tolist() == [[0, 0, 0], [153, 0, 0], [255, 0, 0], [255, 255, 0], [255, 255, 255]]
    assert heat(np.array([[128]], dtype=np.uint8))[0, 0].tolist() == [255, 129, 0]


def test_tile_boxes_sit_in_a_ten_column_grid_under_the_title():
    tile_h = 32 + CAPTION_PX + 4  # 2×4 maps: tiles 64×32
    assert tile_box(0, 12, 2, 4) == (2, TITLE_PX + 2, 66, TITLE_PX + 34)  # a title by default
    assert tile_box(0, 12, 2, 4, title=False) == (2, 2, 66, 34)
    assert tile_box(9, 12, 2, 4, title=False) == (9 * 68 + 2, 2, 9 * 68 + 66, 34)
    assert tile_box(11, 12, 2, 4, title=False) == (68 + 2, tile_h + 2, 68 + 66, tile_h + 34)
    assert tile_box(2, 3, 4, 4, title=False) == (2 * 68 + 2, 2, 2 * 68 + 66, 66)  # three tokens: one row


def test_a_titled_grid_draws_the_prompt_above_the_tiles_on_the_given_scale():
    maps = np.full((2, 4, 4), 0.25)
    png = render_token_grid(["a", "b"], maps, peak=0.5, title="a cat riding a bike " * 4)
    out = picture(png)
    assert out.shape == (TITLE_PX + 64 + CAPTION_PX + 4, 2 * 68, 3)
    strip = out[:TITLE_PX]
    assert (strip < 128).any() and (strip[:, -2:] == 255).all()  # a long title is cut before the edge
    left, top, right, bottom = tile_box(1, 2, 4, 4)
    assert (out[top:bottom, left:right] == 128).all()  # 0.25 on the job's scale of 0.5: mid grey
    untitled = picture(render_token_grid(["a", "b"], maps, peak=0.5))
    assert (untitled[2:66, 2:66] == 128).all() and untitled.shape[0] == 64 + CAPTION_PX + 4


def test_an_overlay_mixes_the_image_half_and_half_with_the_heat_colour():
    maps = np.zeros((2, 4, 4))
    maps[1] = 1.0
    image = Image.new("RGBA", (32, 16), (0, 0, 200, 255))  # any mode, resized to the tile whatever its size
    out = picture(render_token_grid(["a", "b"], maps, image=image))
    boxes = [tile_box(k, 2, 4, 4, title=False) for k in (0, 1)]
    cold, hot = (out[top:bottom, left:right] for left, top, right, bottom in boxes)
    assert (cold == [0, 0, 100]).all()  # heat(0) is black
    assert (hot == [128, 128, 228]).all()  # heat(255) is white


def test_the_title_is_drawn_two_pixels_in_from_the_top_left():
    out = picture(render_token_grid(["a"], np.zeros((1, 4, 4)), title="a cat"))
    expected = Image.new("RGB", (68, TITLE_PX), "white")
    ImageDraw.Draw(expected).text((2, 2), "a cat", fill="black", font=ImageFont.load_default())
    assert (out[:TITLE_PX] == np.asarray(expected)).all()


def test_tiles_are_upsampled_bilinearly():
    """The module's promise: a smooth bilinear blow-up of each map (not nearest or bicubic, which rings)."""
    m = np.array([[[0.0, 1.0], [1.0, 0.25]]])
    out = picture(render_token_grid(["a"], m, peak=1.0))
    expected = np.asarray(Image.fromarray(to_grey(m[0], 1.0)).resize((64, 64), Image.BILINEAR))
    assert (out[2:66, 2:66] == expected[..., None]).all()
