"""The ``on_step`` callback of one batch: heartbeats, progress, cancel checks and step timing.

Why throttled: ``on_step`` runs once per job per denoising step — with 8 jobs and 20 ms steps that is 400
calls a second. Heartbeats are renewed for the whole batch at most every ``heartbeat_interval_seconds``,
progress and cancel flags per job at most every few hundred ms. Redis errors are logged, never raised:
``BatchRunner`` fails a job whose callback raises, and a Redis blip must not fail an edit (a missed
heartbeat only matters if it lasts for the whole TTL, and then the reaper's recovery is the right answer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service import metrics
from service.config import WorkerSettings

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass
class _PerJob:
    progress_at: float = float("-inf")
    cancel_checked_at: float = float("-inf")
    canceled: bool = False


@dataclass
class StepReporter:
    """Call it as ``on_step(job_id, step, total)``; True means "stop this job" (cancel or worker abort)."""

    settings: WorkerSettings
    heartbeat: Callable[[], None]
    set_progress: Callable[[str, int, int], None]
    is_cancel_requested: Callable[[str], bool]
    aborting: Callable[[], bool] = lambda: False
    clock: Clock = time.monotonic
    _jobs: dict[str, _PerJob] = field(default_factory=dict)
    _heartbeat_at: float = float("-inf")
    _step: int = 0
    _step_started_at: float | None = None

    @property
    def heartbeat_interval(self) -> float:
        return min(self.settings.heartbeat_interval_seconds, self.settings.heartbeat_ttl_seconds / 3)

    def begin(self) -> None:
        """Mark the start of the denoising loop (for step timing) and renew heartbeats now."""
        self._step, self._step_started_at = 0, self.clock()
        self.renew_heartbeats(force=True)

    def __call__(self, job_id: str, step: int, total: int) -> bool:
        now = self.clock()
        if step > self._step:
            self._on_new_step(step, now)
        self.renew_heartbeats()
        state = self._jobs.setdefault(job_id, _PerJob())
        if now - state.progress_at >= self.settings.progress_min_interval_seconds or step >= total:
            state.progress_at = now
            self._quietly(self.set_progress, job_id, step, total)
        if self.aborting():
            return True
        if not state.canceled and now - state.cancel_checked_at >= self.settings.cancel_check_interval_seconds:
            state.cancel_checked_at = now
            state.canceled = bool(self._quietly(self.is_cancel_requested, job_id))
        return state.canceled

    def canceled(self, job_id: str) -> bool:
        """Whether the job stopped because its edit asked to (as opposed to a worker abort)."""
        return job_id in self._jobs and self._jobs[job_id].canceled

    def renew_heartbeats(self, force: bool = False) -> None:
        now = self.clock()
        if force or now - self._heartbeat_at >= self.heartbeat_interval:
            self._heartbeat_at = now
            self._quietly(self.heartbeat)

    def _on_new_step(self, step: int, now: float) -> None:
        """First callback of a new step: the batched step just ended. Step 1 also carries job setup: skipped."""
        if self._step_started_at is not None and self._step >= 1:
            metrics.denoise_step_seconds.observe(now - self._step_started_at)
        self._step, self._step_started_at = step, now
        if self.settings.debug_step_delay_seconds:
            time.sleep(self.settings.debug_step_delay_seconds)
            self._step_started_at = self.clock()

    @staticmethod
    def _quietly(fn: Callable, *args):
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 — see module docstring
            log.warning("on_step: %s failed: %s", getattr(fn, "__name__", fn), exc)
            return None
