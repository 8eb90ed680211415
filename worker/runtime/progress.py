"""The ``on_step`` callback of one batch: heartbeats, progress, cancel checks and step timing.

Why throttled: ``on_step`` runs once per job per denoising step — with 8 jobs and 20 ms steps that is 400
calls a second. Heartbeats are renewed for the whole batch at most every ``heartbeat_interval_seconds``,
progress and cancel flags per job at most every few hundred ms. Redis errors are logged, never raised:
``BatchRunner`` fails a job whose callback raises, and a Redis blip must not fail an edit (a missed
heartbeat only matters if it lasts for the whole TTL, and then the reaper's recovery is the right answer).

Why a helper thread (``background=True``, the worker's default): each progress write is a Lua call plus, when
due, a read-render-publish of the edit, each cancel check a round trip; done inline they stalled the
denoising loop for every job of the batch (bench/service_bench.py; figures in bench/results/). The
loop now only records the latest step; the helper writes progress and reads cancel flags at the same
throttled rates, and the loop picks a cancel up at its next step. Heartbeats are renewed by the batch's
``HeartbeatKeeper`` thread (a step may outlast the TTL); each call here touches it, so they stop when the
loop stops making progress, and the reaper recovers a hung batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service import metrics
from service.config import WorkerSettings
from worker.runtime.heartbeats import HeartbeatKeeper

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass
class _PerJob:
    progress_at: float = float("-inf")
    cancel_checked_at: float = float("-inf")
    canceled: bool = False
    step: int = 0
    total: int = 0
    reported_step: int = -1
    cancel_marked: bool = False


@dataclass
class StepReporter:
    """Call it as ``on_step(job_id, step, total)``; True means "stop this job" (cancel or worker abort)."""

    settings: WorkerSettings
    heartbeat: Callable[[], None]
    set_progress: Callable[[str, int, int], None]
    is_cancel_requested: Callable[[str], bool]
    aborting: Callable[[], bool] = lambda: False
    mark_canceled: Callable[[str], None] | None = None  # the edit's status, written as soon as the job stops
    clock: Clock = time.monotonic
    background: bool = False  # progress writes and cancel checks on a helper thread (see module docstring)
    _jobs: dict[str, _PerJob] = field(default_factory=dict)
    _heartbeat_at: float = float("-inf")
    _step: int = 0
    _step_started_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _to_mark: list[str] = field(default_factory=list)
    keeper: HeartbeatKeeper | None = None  # renews from its own thread; every renewal point here touches it
    # store one preview (edit id, step, total, WebP bytes): S3 object + the edit's ``preview`` field
    put_preview: Callable[[str, int, int, bytes], None] | None = None
    _previews: list[tuple[str, int, int, list]] = field(default_factory=list)  # (job, step, total, PIL images)

    @property
    def heartbeat_interval(self) -> float:
        return min(self.settings.heartbeat_interval_seconds, self.settings.heartbeat_ttl_seconds / 3)

    def begin(self) -> None:
        """Mark the start of the denoising loop (for step timing) and renew heartbeats now."""
        self._step, self._step_started_at = 0, self.clock()
        self.renew_heartbeats(force=True)
        if self.background and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="editserve-progress", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the helper thread after one last flush of the latest progress (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()

    def __call__(self, job_id: str, step: int, total: int) -> bool:
        now = self.clock()
        if step > self._step:
            self._on_new_step(step, now)
        self.renew_heartbeats()
        with self._lock:
            state = self._jobs.setdefault(job_id, _PerJob())
            state.step, state.total = step, total
        if self._thread is None:  # inline: the same throttled work on this thread
            self._report_progress(job_id, state, now)
        if self.aborting():
            return True
        if self._thread is None:
            self._check_cancel(job_id, state, now)
        if state.canceled and not state.cancel_marked:
            self._cancel_now(job_id, state)
        return state.canceled

    def preview(self, job_id: str, step: int, total: int, images: list) -> None:
        """A job's preview (the runner calls this only for jobs that asked, at their preview steps): encoded (a
        small WebP) and stored on the helper thread (inline without one). A failure is logged, never raised."""
        if self.put_preview is None:
            return
        item = (job_id, step, total, images)
        if self._thread is None:
            self._quietly(self._store_preview, *item)
        else:
            with self._lock:
                self._previews.append(item)

    def flush_previews(self, job_ids: set[str]) -> None:
        """Store these jobs' queued previews on the calling thread now: a job retired from a long-lived (step-level)
        batch is marked succeeded by the finisher, and a preview stored after that would be refused (the record
        takes previews only while ``processing``)."""
        with self._lock:
            mine = [item for item in self._previews if item[0] in job_ids]
            self._previews = [item for item in self._previews if item[0] not in job_ids]
        for item in mine:
            self._quietly(self._store_preview, *item)

    def _store_preview(self, job_id: str, step: int, total: int, images: list) -> None:
        from worker.editing.previews import preview_webp

        self.put_preview(job_id, step, total, preview_webp(images))

    def _cancel_now(self, job_id: str, state: _PerJob) -> None:
        """The runner drops the job on this True: its edit becomes ``canceled`` now, not when the batch ends.

        Decided here, on the loop's thread, because only this return value stops the job: marking where the
        helper thread reads the flag could cancel an edit whose last step had already run. The batch's
        finishing marks it again, a no-op then (transitions are guarded)."""
        state.cancel_marked = True
        if self.mark_canceled is None:
            return
        if self._thread is None:
            self._quietly(self.mark_canceled, job_id)
        else:
            with self._lock:
                self._to_mark.append(job_id)

    def _report_progress(self, job_id: str, state: _PerJob, now: float, *, final: bool = False) -> None:
        step, total = state.step, state.total
        if step == state.reported_step:
            return
        if final or step >= total or now - state.progress_at >= self.settings.progress_min_interval_seconds:
            state.progress_at, state.reported_step = now, step
            self._quietly(self.set_progress, job_id, step, total)

    def _check_cancel(self, job_id: str, state: _PerJob, now: float) -> None:
        if not state.canceled and now - state.cancel_checked_at >= self.settings.cancel_check_interval_seconds:
            state.cancel_checked_at = now
            state.canceled = bool(self._quietly(self.is_cancel_requested, job_id))

    def _run(self) -> None:
        """Helper thread: progress and cancel flags of the jobs still denoising, at their throttled rates."""
        tick = max(0.01, min(self.settings.progress_min_interval_seconds,
                             self.settings.cancel_check_interval_seconds or 0.25) / 2)
        while True:
            stopping = self._stop.wait(tick)
            now = self.clock()
            with self._lock:
                jobs = list(self._jobs.items())
                to_mark, self._to_mark = self._to_mark, []
                previews, self._previews = self._previews, []
            for job_id in to_mark:
                self._quietly(self.mark_canceled, job_id)
            for item in previews:
                self._quietly(self._store_preview, *item)
            for job_id, state in jobs:
                self._report_progress(job_id, state, now, final=stopping)
                if not stopping and state.step < state.total:
                    self._check_cancel(job_id, state, now)
            if stopping:
                return

    def canceled(self, job_id: str) -> bool:
        """Whether the job stopped because its edit asked to (as opposed to a worker abort)."""
        return job_id in self._jobs and self._jobs[job_id].canceled

    def renew_heartbeats(self, force: bool = False) -> None:
        if self.keeper is not None:
            self.keeper.touch()
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
