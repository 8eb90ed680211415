"""Run N compatible editing jobs as ONE UNet batch per denoising step.

Why a custom loop instead of diffusers' pipelines: jobs in a batch differ in prompts, seeds, guidance
scales, P2P controllers, input images and sweeps, and each must come out exactly as if it ran alone.
So every job owns its state (latents, scheduler instance, generators, step index, controller) in a
``JobState`` (``base``); ``BatchState`` only concatenates their UNet rows, makes one forward call with a
per-row timestep tensor and hands each job its slice back. Because nothing else is shared, jobs can leave
(cancel, failure, completion) or join between any two steps — step-level batching — without disturbing
the others. The runner picks each job's state class from ``methods.METHODS``: this module sits above the
methods, which import only ``base``.

Nothing here knows about HTTP, queues or storage: ``on_step`` is the only way out during a run.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import torch

from worker.editing.acceleration import StepAcceleration, accelerated_unet
from worker.editing.base import (
    BatchForwardError,
    JobState,
    NonFiniteLatentsError,
    SamplingContext,
    finish_states,
    hand_preview,
)
from worker.editing.buckets import padding_for
from worker.editing.jobs import JobCanceled, JobResult, JobSpec
from worker.editing.methods import method_for

__all__ = ["BatchForwardError", "BatchRunner", "BatchState", "NonFiniteLatentsError", "OnStep", "StepReport"]

OnStep = Callable[[str, int, int], Any]


# ---------------------------------------------------------------------------------------------------
# Batch invariance


_ROW_VECTOR_LINEARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _row_vector_linears(unet) -> list[torch.nn.Linear]:
    """The UNet's GEMMs whose row count is the batch size itself: the timestep-embedding MLP and the
    resnets' ``time_emb_proj`` (every other GEMM has batch × pixels or batch × tokens rows). Found once per
    UNet: walking its modules costs milliseconds, per run."""
    if unet not in _ROW_VECTOR_LINEARS:
        _ROW_VECTOR_LINEARS[unet] = [
            module for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear) and (
                name.startswith(("time_embedding.", "add_embedding.", "class_embedding."))
                or name.endswith("time_emb_proj"))]
    return _ROW_VECTOR_LINEARS[unet]


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
        for module in _row_vector_linears(unet) if unet is not None else ():
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

    def __init__(self, model, *, row_buckets: Sequence[int] = (), unet: Callable[..., Any] | None = None):
        self.model = model
        self.row_buckets = tuple(row_buckets)  # pad each call's rows up to its bucket (buckets.bucket_for)
        self.unet = model.unet if unet is None else unet  # a compiled UNet may stand in (acceleration)
        self._padding_text: torch.Tensor | None = None
        self.jobs: list[JobState] = []
        self._router = None
        self._previous_processors: dict | None = None
        self._text_cache: tuple[tuple[JobState, ...], torch.Tensor] | None = None
        # a compiled UNet would guard on the per-job segments (a recompile per membership): eager only
        self._row_vectors = PerJobRowVectors(model.unet if unet is None else None)
        self._finite_checks: deque[FiniteCheck] = deque()
        self.finite_check_lag = 0  # steps a check may stay pending on CPU (tests exercise the GPU bookkeeping)

    def __enter__(self) -> Self:
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
        if self._router is None and any(ctrl is not None and getattr(ctrl, "needs_hook", True)
                                        for _, ctrl in job.attention_segments()):
            self._install_router()
        self.jobs.append(job)

    def remove(self, job: JobState) -> None:
        self.jobs = [j for j in self.jobs if j is not job]

    def __len__(self) -> int:
        return len(self.jobs)

    def _install_router(self) -> None:
        from worker.editing.processor import install_shared_p2p_processors

        self._router, self._previous_processors = install_shared_p2p_processors(self.model.unet)

    def _route(self, jobs: list[JobState]) -> None:
        if self._router is None:
            return
        segments, start = [], 0
        for job in jobs:
            for rows, controller in job.attention_segments():
                segments.append((start, start + rows, controller))
                start += rows
        self._router.segments = segments

    def _text(self, jobs: list[JobState]) -> torch.Tensor:
        """Encoder states of all rows; rebuilt only when the batch's membership changes."""
        if any(j.per_step_text for j in jobs):
            self._text_cache = None
            return torch.cat([j.text_rows() for j in jobs])
        members = tuple(jobs)  # the jobs themselves, not ids: a departed job's id may be reused by a newcomer
        cached = self._text_cache
        if cached is None or len(cached[0]) != len(members) or any(a is not b for a, b in zip(cached[0], members)):
            self._text_cache = (members, torch.cat([j.text_rows() for j in jobs]))
        return self._text_cache[1]

    def _forward(self, jobs: list[JobState], inputs: list[torch.Tensor]) -> torch.Tensor:
        timesteps = torch.cat([j.row_timesteps() for j in jobs])
        self._route(jobs)
        groups = [n for j in jobs for n in j.row_groups]
        sample, text = torch.cat(inputs), self._text(jobs)
        rows = sample.shape[0]
        pad = padding_for(rows, self.row_buckets)
        if pad:  # padding rows: their own row-vector group, outside every attention segment, dropped below
            sample = torch.cat([sample, sample.new_zeros((pad, *sample.shape[1:]))])
            timesteps = torch.cat([timesteps, timesteps[-1:].expand(pad)])
            text = torch.cat([text, self._pad_text(text, pad)])
            groups.append(pad)
        self._row_vectors.segments = groups
        return self.unet(sample, timesteps, encoder_hidden_states=text, return_dict=False)[0][:rows]

    def _pad_text(self, text: torch.Tensor, pad: int) -> torch.Tensor:
        cached = self._padding_text
        if cached is None or cached.shape[0] < pad or cached.shape[1:] != text.shape[1:]:
            cached = self._padding_text = text.new_zeros((max(self.row_buckets), *text.shape[1:]))
        return cached[:pad]

    @torch.no_grad()
    def step(self) -> StepReport:
        """One UNet evaluation for every unfinished job, then each job's own guidance and scheduler step.

        A job whose own part fails (its controller, its guidance, non-finite latents) leaves the batch with
        its error; the others are untouched. A failure of the shared forward call fails every job in it.
        """
        report = StepReport()
        jobs, inputs = [], []
        for job in self.jobs:
            if job.finished:
                continue
            try:
                inputs.append(job.model_input())
            except Exception as exc:  # noqa: BLE001 — e.g. its controller refused the step
                report.failed.append((job, exc))
            else:
                jobs.append(job)
        if jobs:
            try:
                noise_pred = self._forward(jobs, inputs)
            except Exception as exc:  # noqa: BLE001 — attributed to every job of the call, never swallowed
                err = BatchForwardError(f"batched UNet call failed ({len(jobs)} jobs): {type(exc).__name__}: {exc}")
                err.__cause__ = exc
                report.failed.extend((j, err) for j in jobs)
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

    def _fail_non_finite(self, report: StepReport) -> StepReport:
        """Move jobs whose latents went NaN/inf to ``failed``, without stalling the GPU.

        Reading a GPU flag on the host waits for every queued kernel: once per step that serialises Python's
        kernel launches with the GPU's work (measured: a P2P pair 1.22× diffusers' time on an H200). So the
        flags of a step are copied to pinned memory asynchronously and read once their CUDA event has
        completed, usually a step later; a job that went non-finite loses at most a few steps before it fails
        with the step it was caught at. Before any job finishes (it is decoded next) every pending check is
        read. On the CPU the flags are read at once.
        """
        if report.advanced:
            self._finite_checks.append(FiniteCheck.queue(report.advanced, self.finite_check_lag))
        must_know = any(job.finished for job in report.advanced)
        bad: dict[int, tuple[JobState, int]] = {}
        while self._finite_checks and (must_know or self._finite_checks[0].ready()):
            for job, step in self._finite_checks.popleft().non_finite():
                bad.setdefault(id(job), (job, step))
        for check in self._finite_checks:
            check.tick()
        if not bad:
            return report
        still = []
        for job in report.advanced:
            if id(job) in bad:
                report.failed.append((job, NonFiniteLatentsError(
                    f"job {job.job_id}: latents are not finite after step {bad[id(job)][1]}/{job.total_steps} "
                    "(guidance too large, or a numerical overflow)")))
            else:
                still.append(job)
        report.advanced = still
        return report


@dataclass
class FiniteCheck:
    """One step's "are these jobs' latents finite?" flags, on their way from the device to the host."""

    jobs: list[tuple[JobState, int]]  # (job, step it had just finished)
    flags: torch.Tensor  # host bool tensor, filled asynchronously on CUDA
    event: Any = None  # torch.cuda.Event recorded after the copy; None when the flags are already here
    lag: int = 0  # CPU only: steps to stay pending (tests)

    @classmethod
    def queue(cls, jobs: list[JobState], lag: int = 0) -> FiniteCheck:
        flags = torch.stack([torch.isfinite(job.latents).all() for job in jobs])
        tagged = [(job, job.step_index) for job in jobs]
        if flags.device.type != "cuda":
            return cls(tagged, flags, lag=lag)
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(tagged, host, event)

    def ready(self) -> bool:
        return self.event.query() if self.event is not None else self.lag <= 0

    def tick(self) -> None:
        self.lag -= 1

    def non_finite(self) -> list[tuple[JobState, int]]:
        """The jobs whose flag is False (waits for the copy if it is still running)."""
        if self.event is not None:
            self.event.synchronize()
        return [tagged for tagged, ok in zip(self.jobs, self.flags.tolist()) if not ok]


# ---------------------------------------------------------------------------------------------------
# Runner


class BatchRunner:
    """Runs compatible jobs — same (model, kind, height, width, steps, scheduler) — as one UNet batch per step.

    ``run`` returns one ``JobResult`` per job, in order; a job's validation error, failure or cancellation
    is confined to its own result.
    """

    def __init__(self, model, *, height: int, width: int, steps: int, scheduler: str | None = None,
                 decode_batch: int = 8, tensor_controllers: bool = False,
                 acceleration: StepAcceleration | None = None):
        factor = model.vae_scale_factor
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.model = model
        self.decode_batch = max(1, decode_batch)  # images per VAE call when jobs finish together
        self.acceleration = acceleration
        self.unet = accelerated_unet(model, acceleration)  # None: the model's own eager UNet
        tensor_controllers = tensor_controllers or self.unet is not None
        self.ctx = SamplingContext(model, height, width, steps, scheduler or model.spec.scheduler,
                                   tensor_controllers=tensor_controllers)

    @property
    def kind(self) -> str:
        return self.model.spec.kind

    def new_batch(self) -> BatchState:
        """A ``BatchState`` with this runner's row buckets and (compiled) UNet."""
        buckets = self.acceleration.row_buckets if self.acceleration is not None else ()
        return BatchState(self.model, row_buckets=buckets, unet=self.unet)

    def prepare(self, spec: JobSpec) -> JobState:
        """Validate a job and build its initial state (text encoding, x_T, image latents, controller)."""
        method = method_for(self.kind, spec, self.model.spec.name)
        with torch.no_grad():
            return method.state.create(spec, self.ctx)

    def run(self, jobs: Sequence[JobSpec], on_step: OnStep | None = None) -> list[JobResult]:
        """All jobs to completion as one batch; ``on_step(job_id, step, total)`` after each job's step may
        cancel that job (return True or raise ``JobCanceled``). Results come back in the jobs' order."""
        results: list[JobResult | None] = [None] * len(jobs)
        slot: dict[JobState, int] = {}  # by identity: JobState keeps object hashing
        with self.model.lock, self.new_batch() as batch:
            for i, spec in enumerate(jobs):
                try:
                    job = self.prepare(spec)
                except Exception as exc:  # noqa: BLE001 — validation and setup errors belong to the job
                    results[i] = JobResult(job_id=spec.job_id, error=exc, params=self.ctx.params())
                    continue
                if job.finished:  # nothing to denoise (IP2P empty instruction)
                    results[i] = self.finish([job])[0]
                    continue
                slot[job] = i
                batch.admit(job)
            while len(batch):
                report = batch.step()
                for job, exc in report.failed:
                    results[slot[job]] = self.failed(job, exc)
                done = []
                for job in report.advanced:
                    try:
                        canceled = self._canceled(job, on_step)
                    except Exception as exc:  # noqa: BLE001 — a broken progress callback fails its job only
                        batch.remove(job)
                        results[slot[job]] = self.failed(job, exc)
                        continue
                    if canceled:
                        batch.remove(job)
                        results[slot[job]] = JobResult(job_id=job.job_id, canceled=True, params=job.params())
                    elif job.finished:
                        batch.remove(job)
                        done.append(job)
                for job, result in zip(done, self.finish(done)):
                    results[slot[job]] = result
        return results  # type: ignore[return-value]

    @staticmethod
    def _canceled(job: JobState, on_step: OnStep | None) -> bool:
        if on_step is None:
            return False
        hand_preview(job, on_step)
        try:
            return bool(on_step(job.job_id, job.step_index, job.total_steps))
        except JobCanceled:
            return True

    def finish(self, jobs: list[JobState]) -> list[JobResult]:
        """Decode jobs that finished together (shared VAE calls) and build their results; a decode or
        result failure fails only its own job."""
        return finish_states(self.model, jobs, self.decode_batch)

    @staticmethod
    def failed(job: JobState, exc: Exception) -> JobResult:
        return JobResult(job_id=job.job_id, error=exc, params=job.params())

