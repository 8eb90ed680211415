"""Input-image normalisation shared by the gateway and the worker: Pillow only, never torch.

The gateway imports this to validate and echo sizes before anything is queued, so it must stay light.
``official_resize`` reproduces InstructPix2Pix's ``edit_cli.py`` exactly (docs/design-notes.md): diffusers keeps the
input size, which runs a 12 MP photo at 12 MP; the official rule caps the long side near ``resolution``.
"""

from __future__ import annotations

import math

from PIL import Image, ImageOps

_TRANSPARENT_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WHITE = (255, 255, 255)


def official_resize_dims(width: int, height: int, resolution: int = 512) -> tuple[int, int]:
    """Output (W, H) of the official resize: multiples of 64 whose *short* side was rounded up.

    The float arithmetic is the official code's, step for step, so edge cases (4032×3024 → 512×384,
    300×200 → 576×384, 1000×100 → 640×64) come out exactly as the reference computes them.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if resolution < 64:
        raise ValueError(f"resolution must be at least 64, got {resolution}")
    factor = resolution / max(width, height)
    factor = math.ceil(min(width, height) * factor / 64) * 64 / min(width, height)
    return int((width * factor) // 64) * 64, int((height * factor) // 64) * 64


def fitting_resolution(width: int, height: int, resolution: int, max_side: int) -> int | None:
    """The largest resolution <= ``resolution`` (in steps of 64) whose official resize has no side above
    ``max_side``, or None when none has (the aspect ratio is too extreme for the model).

    Why: the official rule rounds the *short* side up to 64, so the long side is not bounded by ``resolution``:
    a 1000x1 picture becomes 64000x64. Stepping down keeps ordinary pictures (300x200 at 512 -> 576x384 is
    one step over a 512 limit) and refuses only what cannot fit.
    """
    for candidate in range(resolution, 63, -64):
        if max(official_resize_dims(width, height, candidate)) <= max_side:
            return candidate
    return None


def official_resize(img: Image.Image, resolution: int = 512) -> Image.Image:
    """Scale and center-crop to ``official_resize_dims`` with LANCZOS, as ``ImageOps.fit`` does officially."""
    size = official_resize_dims(img.width, img.height, resolution)
    if img.size == size:
        return img.copy()
    return ImageOps.fit(img, size, method=Image.Resampling.LANCZOS)


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Transparent pixels become white (not black): what users see in a viewer is what gets edited."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale to 8 bits by *scaling*; ``convert("L")`` would clip everything above 255."""
    if img.mode == "F":
        _lo, hi = img.getextrema()
        scale = 255.0 if hi <= 1.0 else 1.0  # float images are either [0, 1] or already 0..255
        return img.point(lambda v: v * scale).convert("L")
    as_int = img.convert("I")  # I;16, I;16B, I;16L, I
    _lo, hi = as_int.getextrema()
    if hi <= 255:
        return as_int.convert("L")
    return as_int.point(lambda v: v * (1 / 257)).convert("L")


def to_rgb(img: Image.Image) -> Image.Image:
    """An upright 8-bit RGB copy of any Pillow image: diffusers misreads RGBA as latents and fails on "L".

    EXIF orientation is applied first (phone photos are stored sideways), then: alpha modes and palettes
    with transparency are composited over white; CMYK/YCbCr/L/1 convert directly; 16/32-bit and float
    grayscale are rescaled to 8 bits.
    """
    img = ImageOps.exif_transpose(img)  # always a new image: no second copy below (decode memory)
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        return _composite_on_white(img)
    if img.mode in _TRANSPARENT_MODES:
        return _composite_on_white(img)
    if img.mode.startswith("I") or img.mode == "F":
        return _high_bit_depth_to_l(img).convert("RGB")
    return img.convert("RGB")


def square_photo(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square, resize to ``size`` (the null-text reference's ``load_512``, as the worker's
    ``photo_tensor`` does it for a square: on this output that is the identity). Photos to invert go through it."""
    w, h = image.size
    if w > h:
        box = ((w - h) // 2, 0, (w - h) // 2 + h, h)
    else:
        box = (0, (h - w) // 2, w, (h - w) // 2 + w)
    return image.crop(box).resize((size, size), Image.Resampling.LANCZOS)
