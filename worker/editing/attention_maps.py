"""Per-token cross-attention pictures for people (P2P paper Fig. 4), comparable across one job's prompts.

Why one scale per job: a reweight multiplies a word's attention, and pictures each normalised by their own
max would hide exactly that (every tile reaches white). ``job_peak`` gives the one 0–255 scale every grid
of a job is drawn on: the largest value of any *word* map (start and end tokens left out: the start token
takes most of the attention everywhere and would make every word map black; its tile saturates instead).

Why which resolution (``map_grid``): the reference reads 16×16 maps at 512 px (latent/4). Smaller images
have small latents, where latent/4 is a 4×4 blur (128 px); there the maps come from the finest level that
still has at least 16 cells on the long side, and latent/1 when none has (64 and 128 px: the latent itself).
Tiles are upsampled bilinearly. The ``.npy`` arrays are the raw averages (see ``AttentionMaps``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

COLUMNS = 10
CAPTION_PX = 18
TITLE_PX = 16  # the prompt, above the tiles
MIN_TILE, MAX_TILE = 64, 256
MEANINGFUL_CELLS = 16  # the reference's 16×16 at 512 px
OVERLAY_MIX = 0.5  # overlay tile = (1 − mix) · image + mix · heat colour


def map_grid(latent_size: tuple[int, int]) -> tuple[int, int]:
    """Cells (h, w) of the maps shown for a latent: latent/4 when that has ≥ 16 cells on the long side
    (the reference's 16×16 at 512 px, 32×32 at 1024 px), else latent/2 (256 px → 16×16), else the latent
    itself (128 px → 16×16, 64 px → 8×8). UNets of SD-1.x shape have cross-attention at latent/1, /2, /4."""
    h, w = int(latent_size[0]), int(latent_size[1])
    for divisor in (4, 2):
        if max(h, w) // divisor >= MEANINGFUL_CELLS:
            return max(1, h // divisor), max(1, w // divisor)
    return max(1, h), max(1, w)


def tile_size(side: int) -> int:
    """Upsampled tile edge: 16 px per map cell, within 64..256 (4×4 maps → 64 px, 16×16 → 256)."""
    return int(min(MAX_TILE, max(MIN_TILE, 16 * side)))


def word_peak(maps: np.ndarray) -> float:
    """Largest value of the word maps (tokens 1..n-2 of (tokens, h, w): start and end left out)."""
    m = np.nan_to_num(np.asarray(maps, dtype=np.float64))
    words = m[1:-1] if m.shape[0] > 2 else m
    return float(words.max()) if words.size else 0.0


def job_peak(all_maps: Sequence[np.ndarray]) -> float:
    """The one scale of every grid of a job: the largest word-map value over all its prompts."""
    return max((word_peak(m) for m in all_maps), default=0.0)


def to_grey(map_2d: np.ndarray, peak: float | None = None) -> np.ndarray:
    """Scale one map to 0–255 by ``peak`` (the job's shared scale; its own max when None). Values below 0
    (a negative reweight) clip to black, above ``peak`` to white."""
    m = np.nan_to_num(np.asarray(map_2d, dtype=np.float64))
    if peak is None:
        peak = m.max() if m.size else 0.0
    if peak <= 0:
        return np.zeros(m.shape, dtype=np.uint8)
    return (np.clip(m / peak, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def heat(grey: np.ndarray) -> np.ndarray:
    """A black → red → yellow → white colour for 0..255 (uint8 (h, w) → (h, w, 3))."""
    v = grey.astype(np.float64) / 255.0
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (rgb * 255.0).round().astype(np.uint8)


def layout(count: int, h: int, w: int, title: bool) -> dict:
    """Where things are in a grid: tile size, cell size, columns/rows, the top of the first row."""
    tile = tile_size(max(h, w))
    tile_w = max(1, round(tile * w / max(h, w)))
    tile_h = max(1, round(tile * h / max(h, w)))
    columns = max(1, min(COLUMNS, count))
    rows = max(1, -(-count // columns))
    return {"tile_w": tile_w, "tile_h": tile_h, "cell_w": tile_w + 4, "cell_h": tile_h + CAPTION_PX + 4,
            "columns": columns, "rows": rows, "top": TITLE_PX if title else 0}


def tile_box(k: int, count: int, h: int, w: int, title: bool = True) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of tile k in a grid of ``count`` (h, w) maps."""
    g = layout(count, h, w, title)
    x = (k % g["columns"]) * g["cell_w"] + 2
    y = g["top"] + (k // g["columns"]) * g["cell_h"] + 2
    return x, y, x + g["tile_w"], y + g["tile_h"]


def render_token_grid(tokens: Sequence[str], maps: np.ndarray, *, peak: float | None = None,
                      title: str | None = None, image=None) -> bytes:
    """A PNG grid: one tile per token (maps is (tokens, h, w)), each captioned with its decoded token.

    ``peak``: the value drawn white (the job's ``job_peak``; each map's own max when None). ``title``: a line
    above the tiles (the prompt). ``image``: a PIL image to overlay, mixed with the heat-coloured map in
    each tile (without it tiles are grey)."""
    from PIL import Image, ImageDraw, ImageFont

    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] != len(tokens):
        raise ValueError(f"need maps of shape (tokens={len(tokens)}, h, w), got {maps.shape}")
    count, h, w = maps.shape
    g = layout(count, h, w, title is not None)
    tile_w, tile_h = g["tile_w"], g["tile_h"]
    canvas = Image.new("RGB", (g["columns"] * g["cell_w"], g["top"] + g["rows"] * g["cell_h"]), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title is not None:
        draw.text((2, 2), _fit(title, draw, font, canvas.width - 4), fill="black", font=font)
    base = None if image is None else np.asarray(image.convert("RGB").resize((tile_w, tile_h)), dtype=np.float64)
    for k, (token, map_2d) in enumerate(zip(tokens, maps)):
        x, y, _, _ = tile_box(k, count, h, w, title is not None)
        grey = Image.fromarray(to_grey(map_2d, peak)).resize((tile_w, tile_h), Image.BILINEAR)
        if base is None:
            picture = grey.convert("RGB")
        else:
            mixed = (1 - OVERLAY_MIX) * base + OVERLAY_MIX * heat(np.asarray(grey))
            picture = Image.fromarray(mixed.round().clip(0, 255).astype(np.uint8))
        canvas.paste(picture, (x, y))
        draw.text((x, y + tile_h + 2), _fit(token, draw, font, tile_w), fill="black", font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _fit(text: str, draw, font, width: int) -> str:
    """Shorten a caption with an ellipsis until it fits under its tile."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
