"""Step-level (continuous) batching in the worker: one running batch per model, jobs join and leave between steps.

Why: with request-level batching a new job waits for the whole running batch, and jobs of different step
counts or schedulers never share a UNet call. Here the worker keeps, per loaded model, one ``ContinuousBatch``
and between any two denoising steps it (1) claims queued compatible jobs, (2) admits some by the row policy
below, (3) runs one step, (4) retires finished, failed and canceled jobs to the finisher thread, which decodes
and uploads them while the batch goes on without them.

Compatible = same model, edit kind and latent size: a lane claims from its model's queues the jobs whose batch
tag matches ``service.queues.lane_tag`` (any steps and scheduler); an empty lane takes the heads.

Admission (``choose``), counted in UNet rows, not jobs:
- a lane holds at most ``row_budget`` rows; a high-priority job may exceed it by ``high_priority_overflow_rows``
  so that it joins at the very next step even when bulk work fills the batch;
- higher priority first; a job that does not fit blocks every lower-priority one (no starvation of big jobs);
- inside one priority, the tenant with the fewest rows running (and chosen) goes next, oldest job first.
Claimed jobs waiting for admission (``pending``) are already in the StartedJobRegistry and ``processing``, so
their heartbeats are renewed with the batch's and the reaper recovers them like running ones.

Crash safety is ``BatchProcessor``'s (start → mark_processing → … → mark terminal → RQ), applied per job.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field

from editserve.contract import ErrorType, job_error
from service import metrics
from service.queues import PRIORITIES, lane_tag, parse_queue_name
from worker.editing.continuous import ContinuousBatch, Retired, finish_states, result_of
from worker.editing.jobs import JobResult
from worker.runtime.batching import ClaimedJob, QueueClaimer
from worker.runtime.heartbeats import HeartbeatKeeper
from worker.runtime.processing import ActiveBatch, BatchProcessor, BatchReport, RunningJob, error_info
from worker.runtime.progress import StepReporter

log = logging.getLogger("editserve.worker")

LaneKey = tuple[str, int, int]  # (kind, height, width): what jobs of one model must share


def needs_inversion(job: RunningJob) -> bool:
    """An inversion job, or a photo edit with no finished inversion: work the step loop does not run."""
    from worker.editing.inversion import InversionSpec

    return isinstance(job.spec, InversionSpec) or isinstance(getattr(job.spec, "inversion", None), InversionSpec)


class LaneReporter(StepReporter):
    """``StepReporter`` whose step timing is the lane's (jobs of one batch are at different steps)."""

    def _on_new_step(self, step: int, now: float) -> None:
        pass

    def forget(self, job_id: str) -> None:
        """A settled job: its progress and cancel flag are no longer polled."""
        with self._lock:
            self._jobs.pop(job_id, None)


@dataclass
class Candidate:
    """A claimed and started job: admitted when ``choose`` says so."""

    job: RunningJob
    rows: int
    tenant: str
    priority: str
    enqueued_at: float  # epoch seconds
    state: object = None  # its JobState


def choose(candidates: list[Candidate], *, running_rows: int, tenant_rows: dict[str, int], budget: int,
           overflow: int) -> list[Candidate]:
    """The candidates to admit before the next step (see the module docstring for the policy)."""
    chosen: list[Candidate] = []
    rows = running_rows
    tenants = dict(tenant_rows)
    for priority in PRIORITIES:
        waiting = sorted((c for c in candidates if c.priority == priority), key=lambda c: c.enqueued_at)
        limit = budget + (overflow if priority == "high" else 0)
        while waiting:
            best = min(waiting, key=lambda c: (tenants.get(c.tenant, 0), c.enqueued_at))
            if rows and rows + best.rows > limit:
                return chosen  # blocks lower priorities: they must not take the rows it waits for
            waiting.remove(best)
            chosen.append(best)
            rows += best.rows
            tenants[best.tenant] = tenants.get(best.tenant, 0) + best.rows
    return chosen


@dataclass
class Lane:
    """One model's running batch, its admission buffer and the jobs being settled."""

    model: str
    key: LaneKey | None = None
    batch: ContinuousBatch | None = None
    batch_id: str = ""
    pending: list[Candidate] = field(default_factory=list)
    running: dict[int, tuple[Candidate, float]] = field(default_factory=dict)  # id(state) → (candidate, admitted)
    live: list[RunningJob] = field(default_factory=list)  # heartbeats: pending, running and finishing jobs
    reporter: LaneReporter | None = None
    keeper: HeartbeatKeeper | None = None  # renews ``live`` from its own thread while the lane makes progress

    @property
    def rows(self) -> int:
        return self.batch.rows if self.batch is not None else 0

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.running)


class ContinuousLoop:
    """Drives every lane one step per ``turn``; ``EditWorker`` calls it when ``worker.batching == "step"``."""

    def __init__(self, *, processor: BatchProcessor, claimer: QueueClaimer, models: list[str],
                 stopping: Callable[[], bool] = lambda: False):
        self.processor = processor
        self.claimer = claimer
        self.settings = processor.settings.worker
        self.lanes = {m: Lane(m) for m in models}
        self.stopping = stopping
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="editserve-finisher")
        self._finishing: list[Future] = []
        self.outcomes: dict[str, str] = {}  # edit id → outcome, of every job settled (tests and tools)

    @property
    def busy(self) -> bool:
        return any(lane.busy for lane in self.lanes.values())

    # ------------------------------------------------------------------ the loop
    def turn(self, timeout: float = 1.0) -> int:
        """Claim and admit, then one step of every lane with jobs; waits up to ``timeout`` when all are idle.
        Returns the number of lanes that stepped."""
        deadline = time.monotonic() + timeout
        poll = self.settings.poll_interval_ms / 1000
        while True:
            if not self.stopping():
                self._claim()
            stepped = sum(self._step(lane) for lane in self.lanes.values() if lane.busy)
            self._reap_finished()
            if stepped or self.stopping() or time.monotonic() >= deadline:
                return stepped
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    def run_until_idle(self, timeout: float = 300.0) -> dict[str, str]:
        """Turns until nothing is queued, running or being settled (tests and tools)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.turn(0.3) and not self.busy:
                self.wait_finished()
                if not self.busy:
                    break
        return self.outcomes

    def wait_finished(self) -> None:
        """Block until every retired job is settled, renewing the remaining jobs' heartbeats."""
        while self._finishing:
            wait_futures(self._finishing, timeout=1.0)
            for lane in self.lanes.values():
                if lane.reporter is not None:
                    lane.reporter.renew_heartbeats()
            self._reap_finished()

    def close(self) -> None:
        self.wait_finished()
        self._pool.shutdown(wait=True)
        for lane in self.lanes.values():
            if lane.reporter is not None:
                lane.reporter.close()
            if lane.keeper is not None:
                lane.keeper.stop()
            if lane.batch is not None:
                lane.batch.close()

    # ------------------------------------------------------------------ claims
    def _claim(self) -> None:
        names = self.claimer.queue_names()
        for lane in self.lanes.values():
            room = self.settings.row_budget - lane.rows - sum(c.rows for c in lane.pending)
            if room <= 0 and not self._high_waiting(names, lane):
                continue
            ours = [n for n in names if self._ours(n, lane)]
            if not ours:
                continue
            count = max(1, room // 4)
            pattern = lane_tag(lane.model, *lane.key) if lane.key is not None else None
            for claimed in self.claimer.claim(ours, 1 if pattern is None else count, pattern=pattern):
                self._start(lane, claimed)

    def _high_waiting(self, names: list[str], lane: Lane) -> bool:
        """A high-priority job may overflow the budget: peek whether one is queued for this lane."""
        conn = self.claimer.connection
        return any(parse_queue_name(n)[0] == "high" and self._ours(n, lane)  # type: ignore[index]
                   and conn.llen(f"rq:queue:{n}") for n in names) and not any(
            c.priority == "high" for c in lane.pending)

    @staticmethod
    def _ours(name: str, lane: Lane) -> bool:
        parsed = parse_queue_name(name)
        return parsed is not None and parsed[1] == lane.model

    def _start(self, lane: Lane, claimed: ClaimedJob) -> None:
        """RQ start, ``processing``, payload and state: the job becomes a candidate, or is settled at once."""
        processor = self.processor
        key = claimed.batch_key
        if lane.key is None:
            lane.key = (key.kind, key.height, key.width)
        job = RunningJob(claimed, processor.bridge.start(claimed.job, claimed.queue))
        self._reporter(lane)  # heartbeats of the lane (from now on, this job among them)
        if lane.batch is None or not lane.batch_id:
            lane.batch_id = uuid.uuid4().hex[:16]
        lane.live.append(job)
        size = len(lane.running) + len(lane.pending) + 1
        if not processor.store.mark_processing(job.id, batch_id=lane.batch_id, batch_size=size,
                                               worker=processor.worker_name):
            lane.live.remove(job)
            self.outcomes[job.id] = processor._skip(job)
            return
        processor._prepare(job)
        if job.error is None and needs_inversion(job):
            job.error = job_error(ErrorType.validation_error, "inverting a photo needs a worker with request "
                                  "batching (EDITSERVE_WORKER__BATCHING=request); step batching edits only from "
                                  "finished inversions (`inversion_id`)")
        candidate = Candidate(job, 0, job.payload.tenant if job.payload else "", claimed.priority,
                              job.payload.created_at.timestamp() if job.payload else time.time())
        if job.error is None:
            try:
                batch = self._batch(lane, key.height, key.width)
                candidate.state = batch.prepare(job.spec, steps=job.payload.batch_key.steps,  # type: ignore[union-attr]
                                                scheduler=job.payload.batch_key.scheduler)  # type: ignore[union-attr]
                candidate.rows = candidate.state.num_rows  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 — validation and setup errors belong to the job
                job.error = error_info(exc)
        if job.error is not None:
            self._settle(lane, [(candidate, time.monotonic())])
            return
        lane.pending.append(candidate)

    def _reporter(self, lane: Lane) -> LaneReporter:
        if lane.reporter is None:
            bridge = self.processor.bridge
            store = self.processor.store
            w = self.settings

            def renew() -> None:
                bridge.renew([(j.claimed.job, j.execution) for j in list(lane.live)])

            lane.keeper = HeartbeatKeeper(renew, interval=min(w.heartbeat_interval_seconds,
                                                              w.heartbeat_ttl_seconds / 3),
                                          stall_seconds=w.hung_batch_seconds).start()
            lane.reporter = LaneReporter(
                settings=self.settings, heartbeat=renew, keeper=lane.keeper,
                set_progress=store.set_progress, is_cancel_requested=store.is_cancel_requested,
                aborting=self.processor.aborting, mark_canceled=store.mark_canceled,
                put_preview=self.processor.put_preview, background=True)
            lane.reporter.begin()
        return lane.reporter

    def _batch(self, lane: Lane, height: int, width: int) -> ContinuousBatch:
        if lane.batch is None:
            lane.batch = ContinuousBatch(self.processor.registry.get(lane.model), height=height, width=width)
        return lane.batch

    # ------------------------------------------------------------------ one step
    def _step(self, lane: Lane) -> int:
        assert lane.batch is not None and lane.reporter is not None
        reporter = lane.reporter
        if self.processor.aborting():  # pending jobs go back to their queue with the running ones
            self._settle(lane, [(c, time.monotonic()) for c in lane.pending], aborted=True)
            lane.pending = []
        tenant_rows: dict[str, int] = {}
        for candidate, _ in lane.running.values():
            tenant_rows[candidate.tenant] = tenant_rows.get(candidate.tenant, 0) + candidate.rows
        admitted = choose(lane.pending, running_rows=lane.rows, tenant_rows=tenant_rows,
                          budget=self.settings.row_budget, overflow=self.settings.high_priority_overflow_rows)
        now = time.monotonic()
        for candidate in admitted:
            lane.pending.remove(candidate)
            lane.batch.admit(candidate.state)  # type: ignore[arg-type]
            lane.running[id(candidate.state)] = (candidate, now)
        metrics.admissions_per_step.labels(model=lane.model).observe(len(admitted))
        if not len(lane.batch):
            return 0
        reporter.renew_heartbeats()
        t0 = time.monotonic()
        outcome = lane.batch.step(reporter)
        metrics.running_rows.labels(model=lane.model).observe(outcome.rows)
        metrics.denoise_step_seconds.observe(time.monotonic() - t0)
        for candidate in admitted:
            kind = lane.key[0] if lane.key else "?"
            metrics.first_step_seconds.labels(model=lane.model, kind=kind).observe(
                max(0.0, time.time() - candidate.enqueued_at))
        if outcome.retired:
            self._retire(lane, outcome.retired)
        if self.settings.debug_step_delay_seconds:
            time.sleep(self.settings.debug_step_delay_seconds)
        if not lane.running and not lane.pending:
            lane.key, lane.batch_id = None, ""  # the next job may have another size: a fresh batch
            lane.batch.close()
            lane.batch = None
        return 1

    # ------------------------------------------------------------------ retiring
    def _retire(self, lane: Lane, retired: list[Retired]) -> None:
        entries = []
        for r in retired:
            candidate, admitted_at = lane.running.pop(id(r.job))
            candidate.job.result = result_of(r)
            entries.append((candidate, admitted_at))
        finished = [(c, t) for (c, t), r in zip(entries, retired) if r.how == "finished"]
        model = lane.batch.model  # type: ignore[union-attr]
        self._settle(lane, entries, decode=(model, finished))

    def _settle(self, lane: Lane, entries: list[tuple[Candidate, float]], *, aborted: bool = False,
                decode: tuple | None = None) -> None:
        """Decode (finished jobs, in shared VAE calls) and settle on the finisher thread; returns at once."""
        if aborted:
            for candidate, _ in entries:
                candidate.job.result = JobResult(job_id=candidate.job.id, canceled=True)

        def work() -> None:
            if lane.reporter is not None:  # previews of these jobs first: the record takes none once finished
                lane.reporter.flush_previews({c.job.id for c, _ in entries})
            if decode is not None and decode[1]:
                model, finished = decode
                for (candidate, _), result in zip(finished, finish_states(model, [c.state for c, _ in finished])):
                    candidate.job.result = result
                self.processor._score([c.job for c, _ in finished])  # CLIP scores, for the jobs that asked
            for candidate, admitted_at in entries:
                self._finish_one(lane, candidate, admitted_at)

        self._finishing.append(self._pool.submit(work))

    def _finish_one(self, lane: Lane, candidate: Candidate, admitted_at: float) -> None:
        job = candidate.job
        report = BatchReport(lane.batch_id or "-", 1, job.claimed.batch_key.queue_suffix(), 0.0)
        ran = ActiveBatch(report, [job], lane.live, lane.reporter, 0.0, admitted_at, admitted_at)  # type: ignore[arg-type]
        try:
            self.processor.finish(ran)
        finally:
            self.outcomes.update(report.outcomes)
            if lane.reporter is not None:
                lane.reporter.forget(job.id)

    def _reap_finished(self) -> None:
        still = []
        for future in self._finishing:
            if not future.done():
                still.append(future)
            elif future.exception() is not None:
                log.error("settling retired jobs crashed; they are left to the reaper", exc_info=future.exception())
        self._finishing = still
