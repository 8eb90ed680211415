"""Per-token cross-attention pictures for people (P2P paper Fig. 4)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

COLUMNS = 10
CAPTION_PX = 18
MIN_TILE, MAX_TILE = 64, 256


def tile_size(side: int) -> int:
    """Upsampled tile edge: 16 px per map cell, within 64..256 (4×4 maps → 64 px, SD's 16×16 → 256)."""
    return int(min(MAX_TILE, max(MIN_TILE, 16 * side)))


def to_grey(map_2d: np.ndarray) -> np.ndarray:
    """Scale one map to 0–255 by its own max (negative values, e.g. after reweighting, clip to 0)."""
    m = np.nan_to_num(np.asarray(map_2d, dtype=np.float64))
    peak = m.max() if m.size else 0.0
    if peak <= 0:
        return np.zeros(m.shape, dtype=np.uint8)
    return (np.clip(m / peak, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def render_token_grid(tokens: Sequence[str], maps: np.ndarray) -> bytes:
    """A PNG grid: one tile per token (maps is (tokens, h, w)), each captioned with its decoded token."""
    from PIL import Image, ImageDraw, ImageFont

    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] != len(tokens):
        raise ValueError(f"need maps of shape (tokens={len(tokens)}, h, w), got {maps.shape}")
    count, h, w = maps.shape
    tile = tile_size(max(h, w))
    tile_w = max(1, round(tile * w / max(h, w)))
    tile_h = max(1, round(tile * h / max(h, w)))
    columns = max(1, min(COLUMNS, count))
    rows = max(1, -(-count // columns))
    cell_w, cell_h = tile_w + 4, tile_h + CAPTION_PX + 4
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, (token, map_2d) in enumerate(zip(tokens, maps)):
        x, y = (k % columns) * cell_w + 2, (k // columns) * cell_h + 2
        picture = Image.fromarray(to_grey(map_2d)).resize((tile_w, tile_h)).convert("RGB")
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
