"""Intermediate previews of a running job: small RGB images of its current x₀ estimate every k steps.

Why the linear approximation by default: SD-1.x latents are close to a linear image of RGB; the 4×3 factors
below (the ones ComfyUI and AUTOMATIC1111 use for "latent2rgb" previews) turn a (4, h, w) latent into a
rough (h, w, 3) picture with one matrix product, no VAE call, so a preview costs microseconds. A tiny
decoder (TAESD, diffusers ``AutoencoderTiny``) gives a real picture for a few ms when one is configured
(``WorkerSettings.preview_decoder``: a folder or hub id).

What is previewed: the scheduler's ``pred_original_sample`` (its x₀ estimate) when it gives one (DDIM,
Euler, Euler-ancestral, PNDM do not all: DPM-Solver/UniPC do not), else the current latent x_t.
Previews are at most ``PREVIEW_SIDE`` px on the long side (the latent upsampled to that, or TAESD's output
downsampled). Nothing here runs for a job whose ``preview_every`` is 0.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import torch

# rows: latent channels 0..3; columns: R, G, B (SD-1.x; ComfyUI's latent_formats.SD15.latent_rgb_factors)
LATENT_RGB_FACTORS = torch.tensor([
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
])
PREVIEW_SIDE = 128  # long side of a preview, px
MAX_PREVIEW_EVERY = 1000


def due(step: int, total: int, every: int) -> bool:
    """Whether the step just finished (1-based ``step`` of ``total``) gets a preview: every ``every`` steps,
    never the last (the result itself follows)."""
    return every > 0 and step < total and step % every == 0


def latent_to_rgb(latent: torch.Tensor) -> np.ndarray:
    """(4, h, w) latent (as the sampler holds it, scaled) → (h, w, 3) uint8 via the linear factors, then
    (x + 1) / 2 clamped to [0, 1]."""
    if latent.dim() != 3 or latent.shape[0] != LATENT_RGB_FACTORS.shape[0]:
        raise ValueError(f"need a (4, h, w) latent, got {tuple(latent.shape)}")
    rgb = torch.einsum("chw,cr->hwr", latent.detach().float().cpu(), LATENT_RGB_FACTORS)
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).numpy()


@lru_cache(maxsize=2)
def _tiny_decoder(source: str):
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(source).eval()


def preview_images(latents: torch.Tensor, decoder: str | None = None) -> list:
    """One small PIL image per sample of ``latents`` (samples, 4, h, w)."""
    from PIL import Image

    h, w = latents.shape[-2:]
    scale = PREVIEW_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if decoder:
        vae = _tiny_decoder(decoder)
        with torch.no_grad():
            pixels = vae.to(latents.device).decode(latents.to(vae.dtype), return_dict=False)[0]
        arrays = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a).resize(size, Image.BILINEAR) for a in arrays]
    return [Image.fromarray(latent_to_rgb(x)).resize(size, Image.BILINEAR) for x in latents]


def preview_webp(images: list) -> bytes:
    """The job's previews side by side (source, then targets / cells) as one small WebP."""
    from PIL import Image

    width, height = sum(i.width for i in images), max(i.height for i in images)
    canvas = Image.new("RGB", (width, height), "black")
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width
    buffer = io.BytesIO()
    canvas.save(buffer, format="WEBP", quality=70)
    return buffer.getvalue()
