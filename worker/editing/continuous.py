"""A running batch that jobs join and leave between any two denoising steps (step-level batching).

Why on top of ``BatchState``: it already keeps every job's state apart (latents, scheduler instance, step
index, controller) and makes one UNet call per step over whatever jobs it holds. What ``BatchRunner`` adds —
one fixed set of jobs run to completion with one (steps, scheduler) — is what this replaces: each job here
gets its own ``SamplingContext``, so step count, scheduler, guidance and edit mode may differ inside one
batch; only the model and the latent size must match (the rows are concatenated into one tensor).

A job's rows stay together: a P2P job's [uncond × n, cond × n] rows and its controller, an IP2P job's three
branches per cell — ``BatchState`` routes attention per job segment. Jobs whose row count changes between
phases (inversion, then editing) call ``rows_changed`` after their phase switch: the text rows are rebuilt.

Decoding is not done here on purpose: ``step`` hands back the retired jobs' states and the caller decodes
them (``finish``) wherever it likes — the worker does it on its finisher thread, so a job that ends does not
hold the others for its VAE call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.editing.base import JobState, SamplingContext, finish_states, hand_preview
from worker.editing.batch import BatchState
from worker.editing.jobs import JobCanceled, JobResult, JobSpec
from worker.editing.methods import method_for

__all__ = ["ContinuousBatch", "Retired", "StepOutcome", "finish_states"]

OnStep = Callable[[str, int, int], Any]


@dataclass
class Retired:
    """A job that left the batch at this step: ``finished`` (decode it), ``failed`` (``error``) or ``canceled``."""

    job: JobState
    how: str
    error: Exception | None = None


@dataclass
class StepOutcome:
    rows: int = 0  # UNet rows of this step's forward call
    advanced: int = 0  # jobs that moved one step
    retired: list[Retired] = field(default_factory=list)


class ContinuousBatch:
    """The running batch of one model at one latent size; ``admit`` and ``step`` are called by one thread."""

    def __init__(self, model, *, height: int, width: int):
        factor = model.vae_scale_factor
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
        self.model = model
        self.height, self.width = height, width
        self.state = BatchState(model)
        self._contexts: dict[tuple[int, str], SamplingContext] = {}

    # ------------------------------------------------------------------ membership
    def context(self, steps: int, scheduler: str | None) -> SamplingContext:
        """One context per (steps, scheduler), sharing the "" embedding: jobs differ only by what they own."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        key = (steps, scheduler or self.model.spec.scheduler)
        if key not in self._contexts:
            ctx = SamplingContext(self.model, self.height, self.width, *key)
            if self._contexts:
                ctx._null_text = next(iter(self._contexts.values()))._null_text
            self._contexts[key] = ctx
        return self._contexts[key]

    def prepare(self, spec: JobSpec, *, steps: int, scheduler: str | None = None) -> JobState:
        """Validate a job and build its initial state; errors (``EditValidationError``...) are the job's own."""
        ctx = self.context(steps, scheduler)
        method = method_for(self.model.spec.kind, spec, self.model.spec.name)
        with torch.no_grad():
            return method.state.create(spec, ctx)

    def admit(self, job: JobState) -> None:
        """Join at the next step (the job starts at its own step 0, with its own scheduler)."""
        self.state.admit(job)

    def remove(self, job: JobState) -> None:
        self.state.remove(job)

    def rows_changed(self) -> None:
        """A job's row layout changed (a phase switch): rebuild the batch's text rows at the next step."""
        self.state._text_cache = None

    @property
    def jobs(self) -> list[JobState]:
        return list(self.state.jobs)

    @property
    def rows(self) -> int:
        return sum(job.num_rows for job in self.state.jobs)

    def __len__(self) -> int:
        return len(self.state)

    def close(self) -> None:
        self.state.close()

    # ------------------------------------------------------------------ one step
    def step(self, on_step: OnStep | None = None) -> StepOutcome:
        """One UNet call for every job, then each job's own step; finished, failed and canceled jobs leave.

        ``on_step(job_id, step, total)`` after each job's step may cancel it (True or ``JobCanceled``); a
        callback that raises anything else fails its job alone."""
        outcome = StepOutcome(rows=self.rows)
        for job in [j for j in self.state.jobs if j.finished]:  # admitted with nothing to denoise
            self.remove(job)
            outcome.retired.append(Retired(job, "finished"))
        with self.model.lock:
            report = self.state.step()
        outcome.advanced = len(report.advanced)
        outcome.retired += [Retired(job, "failed", exc) for job, exc in report.failed]
        for job in report.advanced:
            try:
                canceled = _canceled(job, on_step)
            except Exception as exc:  # noqa: BLE001 — a broken progress callback fails its job only
                self.remove(job)
                outcome.retired.append(Retired(job, "failed", exc))
                continue
            if canceled:
                self.remove(job)
                outcome.retired.append(Retired(job, "canceled"))
            elif job.finished:
                self.remove(job)
                outcome.retired.append(Retired(job, "finished"))
        return outcome


def _canceled(job: JobState, on_step: OnStep | None) -> bool:
    if on_step is None:
        return False
    hand_preview(job, on_step)
    try:
        return bool(on_step(job.job_id, job.step_index, job.total_steps))
    except JobCanceled:
        return True


def result_of(retired: Retired) -> JobResult | None:
    """The result of a failed or canceled job; None for a finished one (``finish_states`` decodes those)."""
    job = retired.job
    if retired.how == "canceled":
        return JobResult(job_id=job.job_id, canceled=True, params=job.params())
    if retired.how == "failed":
        return JobResult(job_id=job.job_id, error=retired.error, params=job.params())
    return None
