"""Run N compatible editing jobs as ONE UNet batch per denoising step.

Why a custom loop instead of diffusers' pipelines: jobs in a batch differ in prompts, seeds, guidance
scales, P2P controllers, input images and sweeps, and each must come out exactly as if it ran alone.
So every job owns its state (latents, scheduler instance, generators, step index, controller) in a
``JobState``; ``BatchState`` only concatenates their UNet rows, makes one forward call with a per-row
timestep tensor and hands each job its slice back. Because nothing else is shared, jobs can leave (cancel,
failure, completion) or join between any two steps — step-level batching — without disturbing the others.

Nothing here knows about HTTP, queues or storage: ``on_step`` is the only way out during a run.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from worker.editing.jobs import (EditValidationError, IP2PJobSpec, JobCanceled, JobResult, JobSpec,
                                 P2PJobSpec)

OnStep = Callable[[str, int, int], Any]


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
    _null_text: torch.Tensor | None = field(default=None, repr=False)

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

    def new_scheduler(self):
        """A scheduler instance of this job alone, with timesteps set: Euler-a keeps a step index inside."""
        scheduler = self.model.new_scheduler(self.scheduler)
        scheduler.set_timesteps(self.steps, device=self.model.device)
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

    @abstractmethod
    def text_rows(self) -> torch.Tensor:
        """(num_rows, 77, D) encoder states: fixed for the job's lifetime, so the batch caches their concat."""

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
        latents = self.scheduler.step(eps, self.timestep(), self.latents, **self._step_kwargs,
                                      return_dict=False)[0]
        self.latents = self.after_step(latents)
        self.step_index += 1

    def params(self) -> dict[str, Any]:
        return self.ctx.params()


# ---------------------------------------------------------------------------------------------------
# Batch invariance


def _row_vector_linears(unet) -> list[torch.nn.Linear]:
    """The UNet's GEMMs whose row count is the batch size itself: the timestep-embedding MLP and the
    resnets' ``time_emb_proj`` (every other GEMM has batch × pixels or batch × tokens rows)."""
    return [module for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear) and (
        name.startswith(("time_embedding.", "add_embedding.", "class_embedding.")) or name.endswith("time_emb_proj"))]


class PerJobRowVectors:
    """Computes the batch-size-row GEMMs job by job, so a job's arithmetic does not depend on its batch mates.

    Why: CPU BLAS (MKL) picks its kernel by the row count M when M is small (1, 2–3, ≥4 give different
    roundings). A 1-ulp change in a timestep embedding grows to ~1e-4 in final latents over a few guided steps,
    which would break "batched == alone". Slicing these few tiny GEMMs per job costs nothing measurable and
    leaves a single job's computation exactly as diffusers does it.
    """

    def __init__(self, unet):
        self.segments: list[int] | None = None
        self._patched: list[tuple[torch.nn.Module, Any]] = []
        for module in _row_vector_linears(unet):
            own = module.__dict__.get("forward")  # an accelerate hook may already have replaced it
            module.forward = self._per_job(module.forward)
            self._patched.append((module, own))

    def _per_job(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def per_job_forward(x: torch.Tensor) -> torch.Tensor:
            segments = self.segments
            if not segments or len(segments) < 2 or x.shape[0] != sum(segments):
                return forward(x)
            return torch.cat([forward(rows) for rows in x.split(segments)])

        return per_job_forward

    def restore(self) -> None:
        for module, own in self._patched:
            if own is None:
                del module.forward
            else:
                module.forward = own
        self._patched = []


# ---------------------------------------------------------------------------------------------------
# Step-level batch


@dataclass
class StepReport:
    """What one ``BatchState.step`` did: which jobs moved a step, which failed (and left the batch)."""

    advanced: list[JobState] = field(default_factory=list)
    failed: list[tuple[JobState, Exception]] = field(default_factory=list)


class BatchState:
    """The jobs sharing the next UNet evaluations; jobs may join (``admit``) or leave (``remove``) between steps.

    Rows are laid out job after job in admission order; a P2P job's rows are [uncond × n, cond × n], so the
    attention router gets one (start, stop, controller) segment per job. Use as a context manager: P2P
    attention processors are installed on the UNet while any job has a controller, restored on exit.
    """

    def __init__(self, model):
        self.model = model
        self.jobs: list[JobState] = []
        self._router = None
        self._previous_processors: dict | None = None
        self._text_cache: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._row_vectors = PerJobRowVectors(model.unet)

    def __enter__(self) -> BatchState:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Give the UNet its own modules back (the model is shared with other batches and pipelines)."""
        self._row_vectors.restore()
        if self._previous_processors is not None:
            self.model.unet.set_attn_processor(self._previous_processors)
            self._previous_processors = None
            self._router = None

    def admit(self, job: JobState) -> None:
        if job.controller is not None and self._router is None:
            self._install_router()
        self.jobs.append(job)

    def remove(self, job: JobState) -> None:
        self.jobs = [j for j in self.jobs if j is not job]

    def __len__(self) -> int:
        return len(self.jobs)

    def _install_router(self) -> None:
        from worker.editing.processor import BatchAttentionRouter, install_p2p_processors

        self._router = BatchAttentionRouter()
        self._previous_processors = install_p2p_processors(self.model.unet, self._router)

    def _route(self, jobs: list[JobState]) -> None:
        if self._router is None:
            return
        segments, start = [], 0
        for job in jobs:
            segments.append((start, start + job.num_rows, job.controller))
            start += job.num_rows
        self._router.segments = segments

    def _text(self, jobs: list[JobState]) -> torch.Tensor:
        """Encoder states of all rows; rebuilt only when the batch's membership changes."""
        key = tuple(id(j) for j in jobs)
        if self._text_cache is None or self._text_cache[0] != key:
            self._text_cache = (key, torch.cat([j.text_rows() for j in jobs]))
        return self._text_cache[1]

    def _forward(self, jobs: list[JobState]) -> torch.Tensor:
        sample = torch.cat([j.model_input() for j in jobs])
        timesteps = torch.cat([j.row_timesteps() for j in jobs])
        self._route(jobs)
        self._row_vectors.segments = [n for j in jobs for n in j.row_groups]
        return self.model.unet(sample, timesteps, encoder_hidden_states=self._text(jobs), return_dict=False)[0]

    @torch.no_grad()
    def step(self) -> StepReport:
        """One UNet evaluation for every unfinished job, then each job's own guidance and scheduler step.

        A job whose own part fails (its controller, its guidance, non-finite latents) leaves the batch with
        its error; the others are untouched. A failure of the shared forward call fails every job in it.
        """
        report = StepReport()
        jobs = [j for j in self.jobs if not j.finished]
        if not jobs:
            return report
        try:
            noise_pred = self._forward(jobs)
        except Exception as exc:  # noqa: BLE001 — attributed to every job of the call, never swallowed
            err = BatchForwardError(f"batched UNet call failed ({len(jobs)} jobs): {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            report.failed = [(j, err) for j in jobs]
        else:
            for job, rows in zip(jobs, noise_pred.split([j.num_rows for j in jobs])):
                try:
                    job.advance(rows)
                except Exception as exc:  # noqa: BLE001 — one job's bug must not sink the batch
                    report.failed.append((job, exc))
                else:
                    report.advanced.append(job)
            report = self._fail_non_finite(report)
        for job, _ in report.failed:
            self.remove(job)
        return report

    @staticmethod
    def _fail_non_finite(report: StepReport) -> StepReport:
        """Move jobs whose latents went NaN/inf to ``failed`` (one device sync for the whole batch)."""
        if not report.advanced:
            return report
        finite = torch.stack([torch.isfinite(j.latents).all() for j in report.advanced]).tolist()
        still = []
        for job, ok in zip(report.advanced, finite):
            if ok:
                still.append(job)
            else:
                report.failed.append((job, NonFiniteLatentsError(
                    f"job {job.job_id}: latents are not finite after step {job.step_index}/{job.total_steps} "
                    "(guidance too large, or a numerical overflow)")))
        report.advanced = still
        return report


# ---------------------------------------------------------------------------------------------------
# Decoding


@torch.no_grad()
def decode(model, latents: torch.Tensor) -> tuple[np.ndarray, list]:
    """VAE decode as diffusers does (latents / scaling_factor, VaeImageProcessor): float pixels and PIL images.

    The float pixels (N, H, W, 3) in [0, 1] are returned too, because 8-bit images hide differences < 1/255.
    """
    vae = model.vae
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    if not bool(torch.isfinite(image).all()):
        raise NonFiniteLatentsError("decoded pixels are not finite (VAE overflow)")
    processor = model.pipe.image_processor
    pixels = processor.postprocess(image, output_type="np")
    return pixels, processor.numpy_to_pil(pixels)


# ---------------------------------------------------------------------------------------------------
# Runner


class BatchRunner:
    """Runs compatible jobs — same (model, kind, height, width, steps, scheduler) — as one UNet batch per step.

    ``run`` returns one ``JobResult`` per job, in order; a job's validation error, failure or cancellation
    is confined to its own result.
    """

    def __init__(self, model, *, height: int, width: int, steps: int, scheduler: str | None = None):
        factor = model.vae_scale_factor
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.model = model
        self.ctx = SamplingContext(model, height, width, steps, scheduler or model.spec.scheduler)

    @property
    def kind(self) -> str:
        return self.model.spec.kind

    def prepare(self, spec: JobSpec) -> JobState:
        """Validate a job and build its initial state (text encoding, x_T, image latents, controller)."""
        from worker.editing.ip2p import IP2PJobState
        from worker.editing.p2p import P2PJobState

        expected = {"text2image": P2PJobSpec, "instruct": IP2PJobSpec}[self.kind]
        if not isinstance(spec, expected):
            raise EditValidationError("model", f"model {self.model.spec.name!r} ({self.kind}) cannot run "
                                               f"a {type(spec).__name__}")
        state_cls = P2PJobState if isinstance(spec, P2PJobSpec) else IP2PJobState
        with torch.no_grad():
            return state_cls.create(spec, self.ctx)

    def run(self, jobs: Sequence[JobSpec], on_step: OnStep | None = None) -> list[JobResult]:
        results: list[JobResult | None] = [None] * len(jobs)
        slot: dict[int, int] = {}
        with self.model.lock, BatchState(self.model) as batch:
            for i, spec in enumerate(jobs):
                try:
                    job = self.prepare(spec)
                except Exception as exc:  # noqa: BLE001 — validation and setup errors belong to the job
                    results[i] = JobResult(job_id=spec.job_id, error=exc, params=self.ctx.params())
                    continue
                if job.finished:  # nothing to denoise (IP2P empty instruction)
                    results[i] = self.finish(job)
                    continue
                slot[id(job)] = i
                batch.admit(job)
            while len(batch):
                report = batch.step()
                for job, exc in report.failed:
                    results[slot[id(job)]] = self.failed(job, exc)
                for job in report.advanced:
                    try:
                        canceled = self._canceled(job, on_step)
                    except Exception as exc:  # noqa: BLE001 — a broken progress callback fails its job only
                        batch.remove(job)
                        results[slot[id(job)]] = self.failed(job, exc)
                        continue
                    if canceled:
                        batch.remove(job)
                        results[slot[id(job)]] = JobResult(job_id=job.job_id, canceled=True, params=job.params())
                    elif job.finished:
                        batch.remove(job)
                        results[slot[id(job)]] = self.finish(job)
        return results  # type: ignore[return-value]

    @staticmethod
    def _canceled(job: JobState, on_step: OnStep | None) -> bool:
        if on_step is None:
            return False
        try:
            return bool(on_step(job.job_id, job.step_index, job.total_steps))
        except JobCanceled:
            return True

    def finish(self, job: JobState) -> JobResult:
        """Decode a finished job and build its result; a decode failure fails only this job."""
        try:
            with torch.no_grad():
                return job.result(*job.final_images())
        except Exception as exc:  # noqa: BLE001
            return self.failed(job, exc)

    @staticmethod
    def failed(job: JobState, exc: Exception) -> JobResult:
        return JobResult(job_id=job.job_id, error=exc, params=job.params())

