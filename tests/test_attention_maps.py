"""worker/editing/attention_maps.py exactly: tile sizes, grey scaling, grid layout, captions (pure, no model)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from worker.editing.attention_maps import _fit, render_token_grid, tile_size, to_grey


def grid(tokens, maps) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(render_token_grid(tokens, maps))).convert("RGB"))


def test_tile_size_is_16_px_per_cell_between_64_and_256():
    assert [tile_size(s) for s in (1, 4, 5, 8, 15, 16, 17, 64)] == [64, 64, 80, 128, 240, 256, 256, 256]
    assert isinstance(tile_size(5), int)


def test_grey_scales_by_the_map_peak_and_rounds():
    out = to_grey(np.array([[0.0, 1.0], [2.0, 4.0]]))
    assert out.dtype == np.uint8 and out.tolist() == [[0, 64], [128, 255]]
    assert to_grey(np.array([[-1.0, 0.5], [1.0, np.nan]])).tolist() == [[0, 128], [255, 0]]
    assert to_grey(np.array([[1e-3, 2e-3]])).tolist() == [[128, 255]]  # small peaks still scale to 255


def test_grey_of_a_map_without_a_positive_peak_is_black():
    for m in (np.zeros((2, 3)), -np.ones((2, 3)), np.full((2, 3), np.nan)):
        out = to_grey(m)
        assert out.dtype == np.uint8 and out.shape == (2, 3) and not out.any()
    assert to_grey(np.zeros((0, 0))).shape == (0, 0)


def test_grid_layout_for_non_square_maps_and_many_tokens():
    # 12 tokens of 2×4 maps: 10 columns, 2 rows; tiles 64 wide (16 px × 4 cells) and 32 high
    maps = np.zeros((12, 2, 4))
    maps[11] = 1.0
    picture = grid([str(i) for i in range(12)], maps)
    cell_w, cell_h = 64 + 4, 32 + 18 + 4
    assert picture.shape == (2 * cell_h, 10 * cell_w, 3)
    # token 11 sits in row 1, column 1, white; token 10 (row 1, column 0) black
    y, x = cell_h + 2, cell_w + 2
    assert (picture[y : y + 32, x : x + 64] == 255).all()
    assert (picture[y : y + 32, 2 : 2 + 64] == 0).all()
    assert (picture[y + 32 : y + 34, x : x + 64] == 255).all()  # below the tile: the white caption area


def test_a_single_token_grid_is_one_cell():
    picture = grid(["cat"], np.ones((1, 4, 4)))
    assert picture.shape == (64 + 18 + 4, 64 + 4, 3)
    assert (picture[2:66, 2:66] == 255).all() and (picture[0:2] == 255).all()


def test_tall_maps_give_tall_tiles():
    picture = grid(["a", "b"], np.ones((2, 8, 2)))
    assert picture.shape == (128 + 18 + 4, 2 * (32 + 4), 3)


def test_maps_that_do_not_match_the_tokens_are_refused():
    with pytest.raises(ValueError) as err:
        render_token_grid(["a"], np.zeros((2, 4, 4)))
    assert str(err.value) == "need maps of shape (tokens=1, h, w), got (2, 4, 4)"
    with pytest.raises(ValueError):
        render_token_grid(["a"], np.zeros((4, 4)))


def test_captions_are_drawn_and_long_ones_are_cut_with_an_ellipsis():
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    assert _fit("cat", draw, font, 64) == "cat"
    long = "a-very-long-token-caption"
    cut = _fit(long, draw, font, 64)
    assert cut.endswith("...") and long.startswith(cut[:-3]) and draw.textlength(cut, font=font) <= 64
    assert draw.textlength(long[: len(cut) - 2] + "...", font=font) > 64  # the longest prefix that fits
    assert _fit(long, draw, font, 0) == "..."
    exact = draw.textlength("cat", font=font)
    assert _fit("cat", draw, font, exact) == "cat"  # a caption exactly as wide as its tile fits
    picture = grid(["cat"], np.zeros((1, 4, 4)))
    assert (picture[66:86, 2:66] < 128).any()  # the caption is drawn in black under the tile


def test_a_very_thin_map_keeps_a_one_pixel_tile():
    assert grid(["a"], np.ones((1, 256, 1))).shape == (256 + 18 + 4, 1 + 4, 3)
    assert grid(["a"], np.ones((1, 1, 256))).shape == (1 + 18 + 4, 256 + 4, 3)


def test_cut_captions_keep_the_longest_prefix_that_fits_at_every_width():
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    long = "a-very-long-token-caption"
    for width in range(10, 120, 3):
        cut = _fit(long, draw, font, width)
        if cut == long:
            continue
        prefix = cut[:-3]
        assert draw.textlength(cut, font=font) <= width or prefix == ""
        assert draw.textlength(long[: len(prefix) + 1] + "...", font=font) > width


def test_the_caption_sits_two_pixels_under_its_tile():
    picture = grid(["cat"], np.zeros((1, 4, 4)))
    expected = Image.new("RGB", (64 + 4, 64 + 18 + 4), "white")
    draw = ImageDraw.Draw(expected)
    draw.text((2, 2 + 64 + 2), "cat", fill="black", font=ImageFont.load_default())
    assert (picture[66:] == np.asarray(expected)[66:]).all()


def test_grey_is_computed_in_float64_whatever_the_map_dtype():
    # float32 maps (what the controllers store): in float32 this value lands on the other side of .5
    m = np.array([[401.89252, 694.79724]], dtype=np.float32)
    assert to_grey(m).tolist() == [[147, 255]]


def test_a_zero_map_is_black_without_dividing_by_zero():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not to_grey(np.zeros((2, 2))).any()
