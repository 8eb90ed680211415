"""The official InstructPix2Pix resize (ip2p.md §1.5) and input normalisation to upright 8-bit RGB."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageOps

from service.imaging import official_resize, official_resize_dims, to_rgb

OFFICIAL_TABLE = [  # ip2p.md §1.5, resolution 512
    ((512, 512), (512, 512)),
    ((640, 480), (512, 384)),
    ((1000, 700), (512, 384)),
    ((1920, 1080), (512, 320)),
    ((4032, 3024), (512, 384)),
    ((300, 200), (576, 384)),
    ((1000, 100), (640, 64)),
    ((256, 256), (512, 512)),
    ((513, 511), (512, 512)),
]


@pytest.mark.parametrize(("size", "expected"), OFFICIAL_TABLE)
def test_official_resize_dims_reproduces_the_table(size, expected):
    assert official_resize_dims(*size, 512) == expected


def test_portrait_is_the_transpose_and_resolution_scales():
    assert official_resize_dims(1080, 1920, 512) == (320, 512)
    assert official_resize_dims(200, 300, 512) == (384, 576)
    assert official_resize_dims(640, 480, 256) == (256, 192)
    for w, h in [(777, 333), (64, 64), (3000, 17)]:
        W, H = official_resize_dims(w, h, 512)
        assert W % 64 == 0 and H % 64 == 0 and W > 0 and H > 0


def test_official_resize_dims_rejects_nonsense():
    with pytest.raises(ValueError):
        official_resize_dims(0, 10, 512)
    with pytest.raises(ValueError):
        official_resize_dims(10, 10, 32)


def test_official_resize_is_a_lanczos_center_crop():
    img = Image.new("RGB", (1000, 700), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 700))  # a red band on the left edge: cropped away (4:3 from 10:7)
    img.paste((255, 0, 0), (980, 0, 1000, 700))
    out = official_resize(img, 512)
    assert out.size == (512, 384)
    assert out.getpixel((0, 192))[0] < 8 and out.getpixel((511, 192))[0] < 8  # no red left at the borders
    reference = ImageOps.fit(img, (512, 384), method=Image.Resampling.LANCZOS)
    assert out.tobytes() == reference.tobytes()
    same = Image.new("RGB", (512, 384), (1, 2, 3))
    assert official_resize(same, 512).tobytes() == same.tobytes()


def test_to_rgb_composites_transparency_over_white():
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert all(abs(v - 127) <= 1 for v in to_rgb(half).getpixel((0, 0)))
    la = Image.new("LA", (4, 4), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(transparent).mode == "RGB"


@pytest.mark.parametrize("mode,value,expected", [
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("RGB", (1, 2, 3), (1, 2, 3)),
])
def test_to_rgb_plain_modes(mode, value, expected):
    out = to_rgb(Image.new(mode, (3, 3), value))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == expected


def test_to_rgb_scales_16_bit_instead_of_clipping():
    img = Image.new("I;16", (3, 1))
    img.putpixel((0, 0), 65535)
    img.putpixel((1, 0), 32896)  # 128 × 257
    out = to_rgb(img)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (128, 128, 128)
    assert out.getpixel((2, 0)) == (0, 0, 0)
    assert to_rgb(Image.new("F", (2, 2), 0.5)).getpixel((0, 0))[0] in (127, 128)


def test_to_rgb_honours_exif_orientation():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left of the stored (sideways) picture
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display"
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", exif=exif.tobytes())
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    out = to_rgb(loaded)
    assert out.size == (20, 40)
    assert out.getpixel((10, 2))[0] > 200  # the red band is now on top
    assert out.getpixel((10, 37))[2] > 200
