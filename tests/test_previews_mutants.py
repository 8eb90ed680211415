"""Previews without a gateway: when one is due, the latent→RGB factors at the clamps, the preview's size for any
aspect, a tiny decoder's pixels mapped from [−1, 1], and the side-by-side WebP. test_previews.py checks the same
end to end (SSE, GET) at seconds per test."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from worker.editing import previews
from worker.editing.previews import PREVIEW_SIDE, due, latent_to_rgb, preview_images, preview_webp


def test_due_every_k_steps_before_the_last():
    assert [s for s in range(1, 11) if due(s, 10, 3)] == [3, 6, 9]
    assert [s for s in range(1, 11) if due(s, 10, 1)] == list(range(1, 10))  # the last step is the result itself
    assert [s for s in range(1, 9) if due(s, 8, 4)] == [4]
    assert not any(due(s, 10, 0) for s in range(1, 11)) and not any(due(s, 10, -2) for s in range(1, 11))


def test_latent_to_rgb_clamps_black_and_refuses_other_shapes():
    latent = torch.zeros(4, 1, 2, dtype=torch.float16)
    latent[3, 0, 0] = 10.0  # channel 3 alone is strongly negative in every colour: black
    assert latent_to_rgb(latent).tolist() == [[[0, 0, 0], [128, 128, 128]]]
    for shape in [(3, 2, 2), (1, 4, 2, 2), (2, 4)]:
        with pytest.raises(ValueError, match=rf"got \({', '.join(map(str, shape))}\)"):
            latent_to_rgb(torch.zeros(shape))


@pytest.mark.parametrize("h,w,size", [(8, 16, (128, 64)), (16, 8, (64, 128)), (1, 300, (128, 1)),
                                      (300, 1, (1, 128)), (4, 4, (128, 128))])
def test_preview_size_keeps_the_aspect_with_the_long_side_at_preview_side(h, w, size):
    images = preview_images(torch.zeros(2, 4, h, w))
    assert [i.size for i in images] == [size] * 2 and images[0].mode == "RGB"


def test_linear_preview_shows_each_sample_without_ringing():
    latents = torch.zeros(2, 4, 2, 2)
    latents[1, 0] = torch.tensor([[0.2, -0.2], [-0.2, 0.2]])  # a grey-level checkerboard in sample 1 only
    flat, board = (np.asarray(i).astype(int) for i in preview_images(latents))
    assert (flat == 128).all()
    corners = latent_to_rgb(latents[1]).astype(int)
    assert board.min() >= corners.min() and board.max() <= corners.max()  # bilinear: no over- or undershoot
    assert board[0, 0].tolist() == corners[0, 0].tolist() and board.std() > 1


class Decoder:
    """A tiny decoder on another device and dtype (as TAESD on the GPU in fp16): refuses latents not moved and
    converted. Decodes red −3 and green 3 (clamped to 0 and 255) and blue ±0.2 in alternate columns
    ((1 ± 0.2) · 127.5 = 153 or 102)."""

    def __init__(self):
        self.device, self.dtype = "elsewhere", torch.float64

    def to(self, device):
        self.device = device
        return self

    def decode(self, latents, return_dict=True):
        assert latents.device == self.device and latents.dtype == self.dtype
        n, _, h, w = latents.shape
        pixels = torch.zeros(n, 3, 8 * h, 8 * w, dtype=self.dtype)
        pixels[:, 0], pixels[:, 1] = -3.0, 3.0
        pixels[:, 2, :, 0::2], pixels[:, 2, :, 1::2] = 0.2, -0.2
        return (pixels,) if not return_dict else {"sample": pixels}


def test_a_tiny_decoder_maps_its_pixels_from_minus_one_one(monkeypatch):
    loaded = []
    monkeypatch.setattr(previews, "_tiny_decoder", lambda source: loaded.append(source) or Decoder())
    images = preview_images(torch.zeros(3, 4, 2, 4), "folder/taesd")
    assert loaded == ["folder/taesd"] and len(images) == 3
    assert images[0].size == (PREVIEW_SIDE, PREVIEW_SIDE // 2) and images[0].mode == "RGB"
    rgb = np.asarray(images[2]).astype(int)
    assert (rgb[..., 0] == 0).all() and (rgb[..., 1] == 255).all()
    blue = rgb[..., 2]
    assert blue.min() >= 102 and blue.max() <= 153 and {102, 153} <= set(blue[0].tolist())  # bilinear: no ringing


def test_preview_webp_puts_the_images_side_by_side_on_black():
    colours = [(255, 255, 255), (100, 100, 100), (200, 200, 200)]  # grey levels: WebP keeps luma sharper
    images = [Image.new("RGB", size, c) for size, c in zip([(30, 20), (20, 40), (10, 10)], colours)]
    webp = Image.open(io.BytesIO(preview_webp(images)))
    assert webp.format == "WEBP" and webp.size == (60, 40)
    pixels = np.asarray(webp.convert("RGB")).astype(int)

    def near(y, x, colour):
        return np.abs(pixels[y, x] - colour).max() <= 40  # lossy

    assert near(10, 15, colours[0]) and near(20, 40, colours[1]) and near(5, 55, colours[2])
    assert near(0, 0, colours[0]) and near(0, 31, colours[1]) and near(1, 51, colours[2])  # no gap before any
    assert near(35, 15, (0, 0, 0)) and near(30, 55, (0, 0, 0))  # black below the shorter ones
