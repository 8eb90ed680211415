"""InstructPix2Pix sampling: the ungated three-branch guidance, image conditioning, and one job's state.

Semantics follow the official code where diffusers differs (docs/design-notes.md): the formula is always applied,
so s_T = 1 or s_I < 1 mean what they say instead of silently switching guidance off. Inside diffusers'
gate (s_T > 1 and s_I >= 1) results equal ``StableDiffusionInstructPix2PixPipeline`` for the same seed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from worker.editing.base import JobState, SamplingContext, seeded_generator
from worker.editing.jobs import EditValidationError, IP2PCell, IP2PJobSpec, JobResult


def ip2p_guidance(cond: torch.Tensor, image_only: torch.Tensor, uncond: torch.Tensor,
                  text_scale: float | torch.Tensor, image_scale: float | torch.Tensor) -> torch.Tensor:
    """e = u + s_T·(c − i) + s_I·(i − u): affine weights (1 − s_I, s_I − s_T, s_T) on (u, i, c).

    Written in diffusers' operation order so in-gate results match its pipeline to the last bit.
    """
    return uncond + text_scale * (cond - image_only) + image_scale * (image_only - uncond)


def split_branches(noise_pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows are [cond(text+image), image-only, uncond] per cell — the branch order of the official code and
    diffusers; cells are contiguous triples so each cell's rows can be computed like a lone diffusers call."""
    cond, image_only, uncond = noise_pred.unflatten(0, (-1, 3)).unbind(1)
    return cond, image_only, uncond


def preprocess_image(model, image, device=None, dtype=None) -> torch.Tensor:
    """PIL RGB → (1, 3, H, W) in [−1, 1] on the model's device, via diffusers' own VaeImageProcessor."""
    pixels = model.pipe.image_processor.preprocess(image)
    return pixels.to(device=device or model.device, dtype=dtype or model.dtype)


@torch.no_grad()
def encode_image_latents(model, image, device=None, dtype=None) -> torch.Tensor:
    """Posterior MODE of the VAE, NOT multiplied by scaling_factor: what the released checkpoint was trained on."""
    return model.vae.encode(preprocess_image(model, image, device, dtype)).latent_dist.mode()


def validate_ip2p(spec: IP2PJobSpec, ctx: SamplingContext) -> None:
    if not spec.cells:
        raise EditValidationError("cells", "at least one (text_guidance, image_guidance, seed) cell is required")
    for cell in spec.cells:
        for name in ("text_guidance", "image_guidance"):
            if not math.isfinite(float(getattr(cell, name))):
                raise EditValidationError(name, f"must be a finite number, got {getattr(cell, name)}")
    size = getattr(spec.image, "size", None)
    if size != (ctx.width, ctx.height):
        raise EditValidationError("image", f"image is {size}, the batch runs at {ctx.width}x{ctx.height}: "
                                           "resize it first (service.imaging.official_resize)")
    if getattr(spec.image, "mode", None) != "RGB":
        raise EditValidationError("image", f"image mode must be RGB, got {getattr(spec.image, 'mode', None)} "
                                           "(service.imaging.to_rgb)")


def cell_scales(cells: list[IP2PCell], device, dtype) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """Guidance scales as python floats for one cell (diffusers' exact fp16 arithmetic), else (k, 1, 1, 1)."""
    if len(cells) == 1:
        return float(cells[0].text_guidance), float(cells[0].image_guidance)
    scales = torch.tensor([[c.text_guidance, c.image_guidance] for c in cells], dtype=torch.float32)
    scales = scales.to(device=device, dtype=dtype).view(len(cells), 2, 1, 1, 1)
    return scales[:, 0], scales[:, 1]


def cell_params(cells: list[IP2PCell]) -> list[dict[str, Any]]:
    return [{"seed": c.seed, "text_guidance": c.text_guidance, "image_guidance": c.image_guidance} for c in cells]


def cell_label(cell: IP2PCell) -> str:
    return f"text {cell.text_guidance:g} / image {cell.image_guidance:g} / seed {cell.seed}"


class IP2PJobState(JobState):
    """One IP2P job: k cells (a sweep) share the image latent; each cell has its own seed and generator.

    Rows: per cell the triple [cond, image-only, uncond] with text [T, "", ""] and image channels
    [img, img, zeros]. One scheduler serves the k cells (they always share timesteps); ancestral noise
    comes from each cell's own generator, drawn exactly as diffusers draws it for a batch of one.
    """

    spec: IP2PJobSpec

    @classmethod
    def create(cls, spec: IP2PJobSpec, ctx: SamplingContext) -> JobState:
        validate_ip2p(spec, ctx)
        if not spec.instruction.strip():
            return UnchangedImageJob(spec, ctx)
        return cls(spec, ctx)

    def __init__(self, spec: IP2PJobSpec, ctx: SamplingContext):
        super().__init__(spec, ctx, [seeded_generator(c.seed) for c in spec.cells])
        model = ctx.model
        k = len(spec.cells)
        image_latent = encode_image_latents(model, spec.image, ctx.device, ctx.dtype)
        self._image_rows = torch.cat([image_latent, image_latent, torch.zeros_like(image_latent)]).repeat(k, 1, 1, 1)
        text = model.encode_text([spec.instruction])
        negative = ctx.unconditional_text(spec.negative_prompt)
        self._text_rows = torch.cat([text, negative, negative]).repeat(k, 1, 1)
        shape = (k, ctx.latent_channels, *ctx.latent_size)
        self.latents = randn_tensor(shape, generator=self.generators,
                                    device=ctx.device, dtype=ctx.dtype) * self.scheduler.init_noise_sigma
        self._text_scale, self._image_scale = cell_scales(spec.cells, ctx.device, ctx.dtype)

    @property
    def num_rows(self) -> int:
        return 3 * len(self.spec.cells)

    @property
    def row_groups(self) -> list[int]:
        return [3] * len(self.spec.cells)

    def text_rows(self) -> torch.Tensor:
        return self._text_rows

    def model_input(self) -> torch.Tensor:
        noisy = self.scheduler.scale_model_input(self.latents.repeat_interleave(3, dim=0), self.timestep())
        return torch.cat([noisy, self._image_rows], dim=1)  # scaling applies to the noisy half only

    def guide(self, noise_pred: torch.Tensor) -> torch.Tensor:
        return ip2p_guidance(*split_branches(noise_pred), self._text_scale, self._image_scale)

    def params(self) -> dict[str, Any]:
        return {**self.ctx.params(), "instruction": self.spec.instruction, "cells": cell_params(self.spec.cells)}

    def result(self, pixels: np.ndarray, images: list) -> JobResult:
        return JobResult(job_id=self.job_id, images=images, labels=[cell_label(c) for c in self.spec.cells],
                         latents=self.latents.float().cpu(), pixels=pixels, params=self.params())


class UnchangedImageJob(JobState):
    """Empty instruction: the official app returns the (resized) input without diffusion; so do we."""

    spec: IP2PJobSpec
    latents = None

    def __init__(self, spec: IP2PJobSpec, ctx: SamplingContext):
        self.spec = spec
        self.ctx = ctx
        self.step_index = 0

    @property
    def finished(self) -> bool:
        return True

    @property
    def num_rows(self) -> int:
        return 0

    def text_rows(self) -> torch.Tensor:
        raise RuntimeError("an unchanged-image job never enters the UNet batch")

    def model_input(self) -> torch.Tensor:
        raise RuntimeError("an unchanged-image job never enters the UNet batch")

    def guide(self, noise_pred: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("an unchanged-image job never enters the UNet batch")

    def final_images(self) -> tuple[np.ndarray, list]:
        k = len(self.spec.cells)
        pixels = np.asarray(self.spec.image, dtype=np.float32)[None].repeat(k, axis=0) / 255.0
        return pixels, [self.spec.image.copy() for _ in range(k)]

    def params(self) -> dict[str, Any]:
        return {**self.ctx.params(), "instruction": self.spec.instruction, "cells": cell_params(self.spec.cells),
                "diffusion": False}

    def result(self, pixels: np.ndarray, images: list) -> JobResult:
        return JobResult(job_id=self.job_id, images=images, labels=["unchanged (empty instruction)"] * len(images),
                         pixels=pixels, params=self.params())
