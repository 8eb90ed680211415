"""What every editing method builds on: the per-job state contract, the sampling context, decoding, errors.

Why a module of its own: a method (``p2p``, ``ip2p``) subclasses ``JobState`` and imports only this; the
batch and the runner, which pick a method's state class from ``methods.METHODS``, sit above the methods.
A base that imported its subclasses would make every new method touch the base.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from worker.editing import previews
from worker.editing.jobs import JobResult, JobSpec


class NonFiniteLatentsError(RuntimeError):
    """A job's latents (or decoded pixels) stopped being finite: fp16 overflow, absurd guidance, a bad edit."""


class BatchForwardError(RuntimeError):
    """The shared UNet call failed, so no job in the batch can be told apart as the cause."""


# ---------------------------------------------------------------------------------------------------
# Sampling context shared by the jobs of one batch key


@dataclass
class SamplingContext:
    """The batch key's fixed part (model, size, steps, scheduler) plus caches every job may reuse."""

    model: Any  # worker.models.registry.LoadedModel
    height: int
    width: int
    steps: int
    scheduler: str
    tensor_controllers: bool = False  # P2P decisions as step-indexed device tensors (captured/compiled steps)
    _null_text: torch.Tensor | None = field(default=None, repr=False)
    _negative_texts: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # read once: diffusers' ``ModelMixin.device``/``.dtype`` walk every submodule on each access
        self.device: torch.device = self.model.device
        self.dtype: torch.dtype = self.model.dtype

    @property
    def latent_size(self) -> tuple[int, int]:
        f = self.model.vae_scale_factor
        return self.height // f, self.width // f

    @property
    def latent_channels(self) -> int:
        return self.model.vae.config.latent_channels

    def null_text(self) -> torch.Tensor:
        """The "" embedding (1, 77, D): the unconditional text of CFG, not zeros (both methods were trained so)."""
        if self._null_text is None:
            self._null_text = self.model.encode_text([""])
        return self._null_text

    def unconditional_text(self, negative_prompt: str = "") -> torch.Tensor:
        """The unconditional text embedding (1, 77, D): "" unless a negative prompt replaces it; cached, since
        jobs of one batch often share theirs."""
        if not negative_prompt:
            return self.null_text()
        if negative_prompt not in self._negative_texts:
            self._negative_texts[negative_prompt] = self.model.encode_text([negative_prompt])
        return self._negative_texts[negative_prompt]

    def new_scheduler(self):
        """A scheduler instance of this job alone, with timesteps set: Euler-a keeps a step index inside."""
        scheduler = self.model.new_scheduler(self.scheduler)
        scheduler.set_timesteps(self.steps, device=self.device)
        return scheduler

    def params(self) -> dict[str, Any]:
        return {"model": self.model.spec.name, "height": self.height, "width": self.width, "steps": self.steps,
                "scheduler": self.scheduler}


def seeded_generator(seed: int) -> torch.Generator:
    """CPU generators only: the same seed gives the same noise on every device (diffusers' randn_tensor)."""
    return torch.Generator("cpu").manual_seed(int(seed))


def scheduler_step_kwargs(scheduler, generators: Sequence[torch.Generator]) -> dict[str, Any]:
    """What ``scheduler.step`` accepts of (generator, eta): PNDM takes neither, DDIM and Euler-a do.

    A list of generators makes ``randn_tensor`` draw each sample's ancestral noise from its own generator.
    """
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators[0] if len(generators) == 1 else list(generators)
    return kwargs


def hand_preview(job: JobState, on_step) -> None:
    """A preview the job made in its last step goes to ``on_step.preview(job_id, step, total, images)`` when the
    callback has that method (the worker's ``StepReporter``); otherwise it is dropped."""
    preview = job.take_preview() if job.preview is not None else None
    sink = getattr(on_step, "preview", None)
    if preview is not None and sink is not None:
        sink(job.job_id, preview[0], job.total_steps, preview[1])


# ---------------------------------------------------------------------------------------------------
# Per-job state


class JobState(ABC):
    """One job's whole denoising state; the batch only borrows its UNet rows for each forward call.

    Subclasses define the row layout (``text_rows``/``model_input``), how rows combine into one noise
    prediction per sample (``guide``), and the result. Samples are the job's independent images:
    P2P prompts or IP2P sweep cells.
    """

    spec: JobSpec
    ctx: SamplingContext
    latents: torch.Tensor  # (samples, 4, h, w), model dtype
    controller: Any = None  # P2P AttentionController, None otherwise
    per_step_text: bool = False  # True when ``text_rows`` changes every step (P2P from an inversion)

    def __init__(self, spec: JobSpec, ctx: SamplingContext, generators: list[torch.Generator]):
        self.spec = spec
        self.ctx = ctx
        self.generators = generators
        self.scheduler = ctx.new_scheduler()
        self.timesteps = self.scheduler.timesteps
        self.step_index = 0
        self._step_kwargs = scheduler_step_kwargs(self.scheduler, generators)

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def total_steps(self) -> int:
        """UNet evaluations this job needs (PNDM makes one more than the requested steps)."""
        return len(self.timesteps)

    @property
    def finished(self) -> bool:
        return self.step_index >= self.total_steps

    @property
    @abstractmethod
    def num_rows(self) -> int:
        """UNet batch rows this job contributes to each step."""

    @property
    def row_groups(self) -> list[int]:
        """Row counts that would be one UNet call if the job ran alone, sample by sample where samples are
        independent (IP2P cells): the unit whose arithmetic must not depend on batch mates."""
        return [self.num_rows]

    def attention_segments(self) -> list[tuple[int, Any]]:
        """(rows, controller) runs of this job's rows, in order: the attention router's segments (a job of several
        P2P groups has one controller per group)."""
        return [(self.num_rows, self.controller)]

    @abstractmethod
    def text_rows(self) -> torch.Tensor:
        """(num_rows, 77, D) encoder states for the current step; the batch caches their concat unless a job
        sets ``per_step_text``."""

    @abstractmethod
    def model_input(self) -> torch.Tensor:
        """(num_rows, C, h, w) UNet input for the current step (scheduler-scaled)."""

    @abstractmethod
    def guide(self, noise_pred: torch.Tensor) -> torch.Tensor:
        """Combine this job's ``num_rows`` predictions into one noise estimate per sample."""

    @abstractmethod
    def result(self, pixels: np.ndarray, images: list) -> JobResult:
        """The finished job's result given its decoded float pixels and PIL images."""

    def final_images(self) -> tuple[np.ndarray, list]:
        """Decoded float pixels and PIL images of the final latents."""
        return decode(self.ctx.model, self.latents)

    def timestep(self) -> torch.Tensor:
        return self.timesteps[self.step_index]

    def row_timesteps(self) -> torch.Tensor:
        return self.timestep().reshape(1).expand(self.num_rows)

    def after_step(self, latents: torch.Tensor) -> torch.Tensor:
        """Hook after the scheduler step (P2P local blend)."""
        return latents

    def advance(self, noise_pred: torch.Tensor) -> None:
        """Guidance, this job's scheduler step, the after-step hook; then the job is one step further."""
        eps = self.guide(noise_pred)
        out = self.scheduler.step(eps, self.timestep(), self.latents, **self._step_kwargs, return_dict=False)
        self.latents = self.after_step(out[0])
        self.step_index += 1
        every = getattr(self.spec, "preview_every", 0) or 0
        if every and previews.due(self.step_index, self.total_steps, every):
            x0 = out[1] if len(out) > 1 and isinstance(out[1], torch.Tensor) else self.latents
            self.preview = (self.step_index, previews.preview_images(x0, getattr(self.spec, "preview_decoder", None)))

    preview: tuple[int, list] | None = None  # (step, PIL images) made by ``advance``, until ``take_preview``

    def take_preview(self) -> tuple[int, list] | None:
        preview, self.preview = self.preview, None
        return preview

    def params(self) -> dict[str, Any]:
        return self.ctx.params()


# ---------------------------------------------------------------------------------------------------
# Decoding


DecodeOutcome = tuple[np.ndarray, list] | Exception


def _to_images(model, image: torch.Tensor) -> DecodeOutcome:
    """VaeImageProcessor postprocess to float pixels (N, H, W, 3) in [0, 1] and PIL images; 8-bit images
    alone would hide differences below 1/255, so the pixels are kept for callers and tests."""
    if not bool(torch.isfinite(image).all()):
        return NonFiniteLatentsError("decoded pixels are not finite (VAE overflow)")
    processor = model.pipe.image_processor
    pixels = processor.postprocess(image, output_type="np")
    return pixels, processor.numpy_to_pil(pixels)


def _vae_decode(model, latents: torch.Tensor) -> torch.Tensor:
    """As diffusers decodes: ``vae.decode(latents / scaling_factor)``."""
    vae = model.vae
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]


def _chunks(items: list[torch.Tensor], max_images: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of at most ``max_images`` images (a larger job is a group of its own)."""
    groups: list[list[torch.Tensor]] = [[]]
    for latents in items:
        if groups[-1] and sum(x.shape[0] for x in groups[-1]) + latents.shape[0] > max_images:
            groups.append([])
        groups[-1].append(latents)
    return [g for g in groups if g]


@torch.no_grad()
def decode_many(model, latents: list[torch.Tensor], max_images: int = 8) -> list[DecodeOutcome]:
    """Decode several jobs' latents in shared VAE calls; each job gets its (pixels, images) or its own error.

    Why shared calls: at small sizes the decoder is dominated by per-call overhead, so jobs finishing on the
    same step decode far cheaper together. A failing call is retried job by job to keep errors attributable.
    """
    outcomes: list[DecodeOutcome] = []
    for group in _chunks(latents, max_images):
        try:
            decoded = _vae_decode(model, torch.cat(group))
        except Exception as exc:  # noqa: BLE001 — e.g. out of memory: find out whose
            if len(group) == 1:
                outcomes.append(exc)
            else:
                outcomes.extend(outcome for item in group for outcome in decode_many(model, [item], max_images))
            continue
        for part in decoded.split([x.shape[0] for x in group]):
            try:
                outcomes.append(_to_images(model, part))
            except Exception as exc:  # noqa: BLE001
                outcomes.append(exc)
    return outcomes


def decode(model, latents: torch.Tensor) -> tuple[np.ndarray, list]:
    """One job's float pixels and PIL images, decoded as diffusers does."""
    outcome = decode_many(model, [latents])[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def finish_states(model, jobs: list[JobState], decode_batch: int = 8) -> list[JobResult]:
    """Decode finished jobs (shared VAE calls) and build their results; a failure is its own job's only."""
    diffused = [job for job in jobs if job.latents is not None]
    outcomes = dict(zip(map(id, diffused), decode_many(model, [j.latents for j in diffused], decode_batch)))
    results = []
    for job in jobs:
        try:
            outcome = outcomes[id(job)] if id(job) in outcomes else job.final_images()
            if isinstance(outcome, Exception):
                raise outcome
            with torch.no_grad():
                results.append(job.result(*outcome))
        except Exception as exc:  # noqa: BLE001
            results.append(JobResult(job_id=job.job_id, error=exc, params=job.params()))
    return results
