"""One gathered batch, end to end: start → translate → run → upload → finish each job on its own.

Why the ordering matters for "nothing lost, nothing twice":
- every job is in the StartedJobRegistry (``RqBridge.start``) before anything can fail, so a crash from
  here on is found by the reaper;
- an edit's terminal status is written (``JobStore.mark_*``, guarded against double completion) *before*
  its RQ job leaves the registry, so a crash in between leaves a stale entry the reaper only tidies up;
- a job that fails on its own (payload, validation, NaN, its upload) fails alone; a failure of the whole
  batched call is retried in halves before any job is failed (it may be one job's fault, or memory).

Why the uploads start together: when a batch's finishing begins, every successful job's PNG encoding and S3
PUTs are handed to a small thread pool at once, and the finish loop (still one job at a time, in order: the
JobStore mark, then RQ) only waits for each job's own uploads, renewing heartbeats meanwhile. Done one
object after another they were the largest service cost of a batch (bench/service_bench.py; figures in
bench/results/).

Why ``start``, ``run`` and ``finish`` are separate steps: the worker loop starts the next batch, then hands
the batch that just ran to its finisher thread (``finishing``), then runs the next one; ``process`` does all
three on the caller's thread. A job whose finishing raises (a bug, Redis failing midway) is failed alone and
the others still finish; if even that fails, its heartbeats stop and the reaper re-runs or tidies it.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field

from pydantic import ValidationError
from rq.executions import Execution

from editserve.contract import TERMINAL_STATUSES, BatchKey, ErrorInfo, ErrorType, JobPayload, job_error
from service import metrics
from service.config import Settings
from service.jobstore import EditNotFound, JobStore
from service.inversion_cache import remember_inversion
from service.keys import edit_key
from service.storage import Storage, StorageError, inversion_arrays_key, preview_key
from worker.editing.acceleration import StepAcceleration
from worker.editing.batch import BatchForwardError, BatchRunner, NonFiniteLatentsError
from worker.editing.jobs import EditValidationError, JobResult, JobSpec
from worker.models.registry import ModelRegistry
from worker.runtime.batching import ClaimedJob
from worker.runtime.execute import to_job_spec
from worker.runtime.heartbeats import HeartbeatKeeper
from worker.runtime.inversions import SAFETENSORS, inversion_bytes, store_inversion
from worker.runtime.progress import StepReporter
from worker.runtime.rqbridge import RqBridge, settle
from worker.runtime.outputs import OutputPlan
from worker.runtime.uploads import upload_outputs, upload_outputs_through_outage
from worker.scoring.attach import attach_scores

log = logging.getLogger("editserve.worker")

UPLOAD_THREADS = 8  # S3 PUTs (and PNG encoding, which releases the GIL) of one batch in flight at once
TERMINAL_VALUES = frozenset(s.value for s in TERMINAL_STATUSES)
TERMINAL_OR_MISSING = TERMINAL_VALUES | {"missing"}


def log_event(event: str, **fields) -> None:
    """One JSON line per event: batch and per-job outcomes are grep- and log-pipeline-friendly."""
    log.info(json.dumps({"event": event, **fields}, default=str, separators=(",", ":")))


@dataclass
class RunningJob:
    claimed: ClaimedJob
    execution: Execution
    payload: JobPayload | None = None
    spec: JobSpec | None = None
    result: JobResult | None = None
    error: ErrorInfo | None = None  # decided before the run (payload, translation)
    upload: Future | None = None  # its outputs' uploads, started as soon as the run ended
    inverted: object = None  # a P2P edit of a photo: the inversion the worker ran for it (stored on success)

    @property
    def id(self) -> str:
        return self.claimed.id


@dataclass
class BatchReport:
    batch_id: str
    size: int
    batch_key: str
    seconds: float
    # edit id → succeeded/failed/canceled/requeued/skipped, or abandoned (its finishing failed: left to the reaper)
    outcomes: dict[str, str] = field(default_factory=dict)


@dataclass
class ActiveBatch:
    """One gathered batch from ``start`` to ``finish``: its jobs, their heartbeats, its report."""

    report: BatchReport  # skipped jobs already in its outcomes
    jobs: list[RunningJob]  # the jobs to run and finish, in claim order
    live: list[RunningJob]  # the jobs whose heartbeats are renewed: shrinks as they are settled
    reporter: StepReporter  # renews ``live``'s heartbeats; its helper thread only runs during the run
    gather_ms: float
    started_at: float  # monotonic
    run_started_at: float  # monotonic; set again when the run starts
    keeper: HeartbeatKeeper | None = None  # renews ``live``'s heartbeats from start until finished (or crashed)

    @property
    def batch_id(self) -> str:
        return self.report.batch_id

    @property
    def size(self) -> int:
        return self.report.size

    @property
    def heartbeat_interval(self) -> float:
        return self.reporter.heartbeat_interval

    def renew_heartbeats(self) -> None:
        """Throttled; for whoever holds the batch between its steps (e.g. while it waits for the finisher)."""
        self.reporter.renew_heartbeats()


def error_info(exc: BaseException) -> ErrorInfo:
    """What the client sees: the field for validation errors, a stable type, and a one-line message."""
    if isinstance(exc, EditValidationError):
        return job_error(ErrorType.validation_error, exc.message, field=exc.field)
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or None
        return job_error(ErrorType.invalid_payload, first.get("msg", str(exc)), field=where)
    if isinstance(exc, NonFiniteLatentsError):
        return job_error(ErrorType.non_finite_output, str(exc))
    if isinstance(exc, StorageError):
        return job_error(ErrorType.storage_error, str(exc))
    return job_error(ErrorType.inference_error, f"{type(exc).__name__}: {exc}")


class BatchProcessor:
    def __init__(self, *, settings: Settings, registry: ModelRegistry, store: JobStore, storage: Storage,
                 bridge: RqBridge, worker_name: str, aborting: Callable[[], bool] = lambda: False):
        self.settings = settings
        self.registry = registry
        self.store = store
        self.storage = storage
        self.bridge = bridge
        self.worker_name = worker_name
        self.aborting = aborting
        self._upload_pool: ThreadPoolExecutor | None = None

    def acceleration(self, model) -> StepAcceleration:
        """Compilation, CUDA graphs and row buckets for ``model``'s device, from ``settings.worker``."""
        return StepAcceleration.from_settings(self.settings.worker, model.device)

    # ------------------------------------------------------------------ the batch
    def process(self, claimed: list[ClaimedJob]) -> BatchReport:
        """Start, run and finish one batch on this thread (the worker loop finishes on its finisher thread)."""
        return self.finish(self.run(self.start(claimed)))

    def start(self, claimed: list[ClaimedJob]) -> ActiveBatch:
        """Every job into the StartedJobRegistry and ``processing`` (or skipped), payloads translated."""
        t0 = time.monotonic()
        gather_ms = round((time.time() - claimed[0].claimed_at) * 1000, 1)  # first claim → batch start
        batch_id = uuid.uuid4().hex[:16]
        jobs = [RunningJob(c, self.bridge.start(c.job, c.queue)) for c in claimed]
        live = list(jobs)  # heartbeats go to these only: a settled job's Execution must not be recreated
        w = self.settings.worker

        def renew() -> None:
            self.bridge.renew([(j.claimed.job, j.execution) for j in list(live)])

        keeper = HeartbeatKeeper(renew, interval=min(w.heartbeat_interval_seconds, w.heartbeat_ttl_seconds / 3),
                                 stall_seconds=w.hung_batch_seconds).start()
        reporter = StepReporter(
            settings=self.settings.worker,
            heartbeat=renew,
            keeper=keeper,
            set_progress=self.store.set_progress,
            is_cancel_requested=self.store.is_cancel_requested,
            aborting=self.aborting,
            mark_canceled=self.store.mark_canceled,
            put_preview=self.put_preview,
            background=True)
        report = BatchReport(batch_id, len(jobs), claimed[0].batch_key.queue_suffix(), 0.0)
        metrics.batch_size.labels(model=claimed[0].batch_key.model).observe(len(jobs))

        runnable = []
        try:
            for job in jobs:
                if self.store.mark_processing(job.id, batch_id=batch_id, batch_size=len(jobs),
                                              worker=self.worker_name):
                    runnable.append(job)
                else:
                    live.remove(job)
                    report.outcomes[job.id] = self._skip(job)
            for job in runnable:
                self._prepare(job)
        except BaseException:
            keeper.stop()  # the batch never started: the reaper recovers its jobs
            raise
        return ActiveBatch(report, runnable, live, reporter, gather_ms, t0, t0, keeper)

    def run(self, batch: ActiveBatch) -> ActiveBatch:
        """The denoising run, one group per batch key; the jobs stay processing until ``finish``."""
        batch.run_started_at = time.monotonic()
        try:
            for key, group in self._groups(batch.jobs).items():
                self._run_group(key, group, batch.reporter)
        except BaseException:
            if batch.keeper is not None:  # the batch is lost: its heartbeats stop, the reaper re-runs its jobs
                batch.keeper.stop()
            raise
        finally:
            batch.reporter.close()
        return batch


    def finish(self, ran: ActiveBatch) -> BatchReport:
        """Settle each job in order (its uploads, the JobStore mark, RQ), renewing the rest's heartbeats."""
        try:
            return self._finish_batch(ran)
        finally:
            if ran.keeper is not None:
                ran.keeper.stop()

    def _finish_batch(self, ran: ActiveBatch) -> BatchReport:
        report, t_finish = ran.report, time.monotonic()
        self.start_uploads(ran)
        for job in ran.jobs:
            ran.reporter.renew_heartbeats()
            try:
                outcome = self._finish(job, report.batch_id, run_started=ran.run_started_at, reporter=ran.reporter)
            except Exception as exc:  # noqa: BLE001 — one job's finishing must not sink the others'
                outcome = self._finish_crashed(job, exc)
            report.outcomes[job.id] = outcome
            ran.live.remove(job)  # settled, or abandoned: either way its heartbeats stop
        now = time.monotonic()
        report.seconds = round(now - ran.started_at, 4)
        counts = dict(Counter(report.outcomes.values()))
        log_event("batch", batch_id=report.batch_id, size=report.size, key=report.batch_key, seconds=report.seconds,
                  gather_ms=ran.gather_ms, run_seconds=round(now - ran.run_started_at, 4),
                  finish_seconds=round(now - t_finish, 4), outcomes=counts, worker=self.worker_name)
        return report

    def _groups(self, jobs: list[RunningJob]) -> dict[BatchKey, list[RunningJob]]:
        """Runnable jobs by the batch key their payload names (a mis-routed job still runs, in its own group)."""
        groups: dict[BatchKey, list[RunningJob]] = {}
        for job in jobs:
            if job.error is None and job.payload is not None:
                groups.setdefault(job.payload.batch_key, []).append(job)
        return groups

    # ------------------------------------------------------------------ per job, before the run
    def put_preview(self, edit_id: str, step: int, total: int, data: bytes) -> None:
        """One preview: its own S3 object (``preview-{step}.webp``), then the edit's ``preview`` field + event."""
        key = preview_key(edit_id, step)
        self.storage.put_bytes(key, data, "image/webp")
        self.store.set_preview(edit_id, step, total, key)

    def _prepare(self, job: RunningJob) -> None:
        """Payload and core spec; any error here is this job's alone."""
        try:
            job.payload = self.store.load_payload(job.id)
            job.spec = to_job_spec(job.payload, self.storage.get_bytes)
            if getattr(job.spec, "preview_every", 0):  # inversion specs have no previews
                job.spec.preview_decoder = self.settings.worker.preview_decoder
        except (ValidationError, EditValidationError) as exc:
            job.error = error_info(exc)
        except StorageError as exc:
            job.error = job_error(ErrorType.storage_error, str(exc), field="image")
        except EditNotFound:
            job.error = job_error(ErrorType.invalid_payload, "the edit record is gone")
        except Exception as exc:  # noqa: BLE001 — e.g. a decompression bomb as input: still this job's alone
            job.error = job_error(ErrorType.invalid_input, f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ the run
    def _run_group(self, key: BatchKey, group: list[RunningJob], reporter: StepReporter) -> None:
        if key.model not in self.registry.loaded():
            for job in group:
                job.error = job_error(ErrorType.validation_error,
                                      f"model {key.model!r} is not served by worker {self.worker_name}", field="model")
            return
        if key.kind == "inversion":
            self._run_inversions(key, group, reporter)
            return
        try:
            model = self.registry.get(key.model)
            runner = BatchRunner(model, height=key.height, width=key.width, steps=key.steps,
                                 scheduler=key.scheduler, acceleration=self.acceleration(model))
        except ValueError as exc:
            for job in group:
                job.error = job_error(ErrorType.validation_error, str(exc))
            return
        reporter.begin()
        group = self._invert_first(key, model, group, reporter)
        results = run_with_split(runner, [j.spec for j in group], reporter)  # type: ignore[misc]
        for job in group:
            job.result = results[job.id]
        self._score(group)

    def _run_inversions(self, key: BatchKey, group: list[RunningJob], reporter: StepReporter) -> None:
        """Inversion jobs of one key share every UNet call (``InversionRunner``); each job's progress is its
        DDIM steps and null-text inner iterations (``progress_detail``) plus the generic step/total in work units
        (so ``Edit.progress`` moves evenly); the reporter's cancel answer stops a job at its next step."""
        from worker.editing.inversion import InversionResult, InversionRunner
        from worker.runtime.inversions import progress_view

        try:
            runner = InversionRunner(self.registry.get(key.model), height=key.height, width=key.width,
                                     steps=key.steps, scheduler=key.scheduler)
        except ValueError as exc:
            for job in group:
                job.error = job_error(ErrorType.validation_error, str(exc))
            return

        def on_progress(progress) -> bool:
            try:
                self.store.set_progress_detail(progress.job_id, progress_view(progress).model_dump_json())
            except Exception as exc:  # noqa: BLE001 — a Redis blip must not fail the job (see StepReporter)
                log.warning("inversion %s: progress detail not written: %s", progress.job_id, exc)
            return reporter(progress.job_id, progress.done, progress.total)

        reporter.begin()
        log_event("inversion_batch", jobs=[j.id for j in group], key=key.queue_suffix(), worker=self.worker_name)
        metrics.inversion_jobs_total.labels(model=key.model).inc(len(group))
        try:
            results = runner.run([j.spec for j in group], on_progress)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 — the shared call failed: every job of it fails alone
            log.exception("inversion batch of %d jobs failed", len(group))
            results = [InversionResult(job_id=j.id, error=exc) for j in group]
        for job, result in zip(group, results):
            job.result = result  # type: ignore[assignment]

    def _invert_first(self, key: BatchKey, model, group: list[RunningJob], reporter: StepReporter) -> list[RunningJob]:
        """P2P edits of photos with no finished inversion: invert them first, together (``InversionRunner``),
        inline in this batch; each then edits from its in-memory inversion. Returns the jobs still to run."""
        from worker.editing.inversion import InversionRunner, InversionSpec

        pending = [j for j in group if isinstance(getattr(j.spec, "inversion", None), InversionSpec)]
        if not pending:
            return group
        log_event("inversion_batch", jobs=[j.id for j in pending], key=key.queue_suffix(), inline=True,
                  worker=self.worker_name)
        metrics.inversion_jobs_total.labels(model=key.model).inc(len(pending))
        try:
            results = InversionRunner(model, height=key.height, width=key.width, steps=key.steps,
                                      scheduler=key.scheduler, reconstruct=False).run(
                [j.spec.inversion for j in pending], lambda p: reporter(p.job_id, 0, key.steps))  # type: ignore
        except Exception as exc:  # noqa: BLE001 — the shared call failed: those jobs fail, the others run
            log.exception("inline inversion of %d jobs failed", len(pending))
            results = [None] * len(pending)
            for job in pending:
                job.error = job_error(ErrorType.inference_error, f"inversion: {type(exc).__name__}: {exc}")
        for job, result in zip(pending, results):
            if result is None:
                continue
            if result.canceled:
                job.result = JobResult(job_id=job.id, canceled=True)
            elif result.error is not None:
                job.error = error_info(result.error)
            else:
                job.spec.inversion = job.inverted = result.inversion  # type: ignore[union-attr]
        return [j for j in group if j.error is None and j.result is None]

    def _score(self, group: list[RunningJob]) -> None:
        """CLIP scores for the jobs that asked (``metrics``), all of the group's in one scoring pass."""
        asked = [j for j in group if getattr(j.spec, "score", False) and j.result is not None and j.result.ok]
        if not asked:
            return
        try:
            attach_scores(self.registry.clip_scorer(), [(j.spec, j.result) for j in asked])  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 — the scores were asked for: those jobs fail, the others go on
            log.exception("CLIP scoring failed for %d jobs", len(asked))
            for job in asked:
                job.error = ErrorInfo(type="scoring_error", message=f"{type(exc).__name__}: {exc}", field="metrics")

    # ------------------------------------------------------------------ per job, after the run
    def _finish(self, job: RunningJob, batch_id: str, *, run_started: float, reporter: StepReporter) -> str:
        owned = self.bridge.owns(job.claimed.job, job.execution)  # False: reaped while we were running
        outcome, error = self._settle_edit(job, run_started, reporter)
        self._settle_rq(job, outcome, error, owned, batch_id)
        log_event("job", edit_id=job.id, batch_id=batch_id, outcome=outcome, kind=job.claimed.batch_key.kind,
                  owned=owned, error=error.model_dump() if error else None)
        return outcome

    def _finish_crashed(self, job: RunningJob, exc: Exception) -> str:
        """Finishing ``job`` raised: fail it alone (the JobStore's guard keeps an outcome already written) and
        finish its RQ job to match the edit. If that fails too, give the job up to the reaper: its heartbeats
        stop now, and the reaper re-runs it (still processing) or tidies its RQ job (already terminal)."""
        log.error("edit %s: finishing failed", job.id, exc_info=exc)
        error = job_error(ErrorType.worker_error, f"finishing the edit failed: {type(exc).__name__}: {exc}")
        try:
            owned = self.bridge.owns(job.claimed.job, job.execution)
            self.store.mark_failed(job.id, error)
            status = self._edit_status(job.id)
            if owned and status not in TERMINAL_OR_MISSING:
                raise RuntimeError(f"the edit is still {status} after mark_failed")
            if owned:
                settle(self.bridge.connection, job.claimed.job, "failed" if status == "missing" else status,
                       f"{error.type}: {error.message}")
            self.bridge.release(job.claimed.job, job.execution)
        except Exception:  # noqa: BLE001 — Redis is failing: the reaper's recovery is the right answer
            log.exception("edit %s: left to the reaper", job.id)
            log_event("job", edit_id=job.id, outcome="abandoned", error=error.model_dump())
            return "abandoned"
        outcome = status if status in TERMINAL_VALUES else "failed"
        log_event("job", edit_id=job.id, outcome=outcome, owned=owned, error=error.model_dump())
        return outcome

    def _settle_edit(self, job: RunningJob, run_started: float,
                     reporter: StepReporter) -> tuple[str, ErrorInfo | None]:
        """Write the edit's outcome through the JobStore (whose transition guard ignores a second completion)."""
        result = job.result
        error = job.error
        if error is None and result is None:
            error = job_error(ErrorType.inference_error, "the batch produced no result for this edit")
        if error is None and result is not None and result.canceled:
            if self.aborting() and not reporter.canceled(job.id):
                return self._requeue(job), None
            self.store.mark_canceled(job.id)
            return "canceled", None
        if error is None and result is not None and result.error is not None:
            error = error_info(result.error)
        if error is None:
            error = self._upload_and_succeed(job, run_started, reporter)
        if error is not None:
            self.store.mark_failed(job.id, error)
            return "failed", error
        return "succeeded", None

    def _settle_rq(self, job: RunningJob, outcome: str, error: ErrorInfo | None, owned: bool, batch_id: str) -> None:
        """Finish the RQ job like RQ would (Result, registries), unless another attempt owns it now."""
        c = job.claimed
        if not owned or outcome == "requeued":
            self.bridge.release(c.job, job.execution)
        elif outcome == "succeeded":
            summary = {"batch_id": batch_id, "outputs": len(job.result.images)}  # type: ignore[union-attr]
            self.bridge.succeed(c.job, c.queue, job.execution, summary)
        elif outcome == "canceled":
            self.bridge.cancel(c.job, c.queue, job.execution)
        elif outcome == "skipped":
            status = self._edit_status(job.id)
            settle(self.bridge.connection, c.job, "failed" if status == "missing" else status, f"edit {status}")
            self.bridge.release(c.job, job.execution)
        else:
            self.bridge.fail(c.job, c.queue, job.execution, self._exc_string(job, error))

    def start_uploads(self, batch: ActiveBatch) -> None:
        """Start every successful job's uploads not started yet, in parallel; ``_upload_and_succeed`` waits for
        its own (``finish`` calls this first)."""
        for job in batch.jobs:
            result = job.result
            if job.upload is None and job.error is None and result is not None and result.error is None \
                    and not result.canceled:
                if self._upload_pool is None:
                    self._upload_pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="editserve-upload")
                if is_inversion(job):
                    job.upload = self._upload_pool.submit(store_inversion, self.storage, result)
                    continue
                job.upload = self._upload_pool.submit(
                    upload_outputs_through_outage, self.storage, job.spec, result,
                    window_seconds=self.settings.worker.result_upload_window_seconds, plan=OutputPlan(job.payload))

    @staticmethod
    def _uploaded(job: RunningJob, reporter: StepReporter) -> tuple[list[dict], list[dict]]:
        """This job's started uploads' result, renewing the batch's heartbeats while S3 retries with backoff."""
        assert job.upload is not None
        while not wait_futures([job.upload], timeout=reporter.heartbeat_interval).done:
            reporter.renew_heartbeats()
        return job.upload.result()

    def _upload_and_succeed(self, job: RunningJob, run_started: float, reporter: StepReporter) -> ErrorInfo | None:
        if is_inversion(job):
            return self._store_inversion_and_succeed(job, run_started, reporter)
        try:
            if job.upload is not None:
                results, maps = self._uploaded(job, reporter)
            else:
                results, maps = upload_outputs(self.storage, job.spec, job.result,  # type: ignore[arg-type]
                                               before_each=reporter.renew_heartbeats, plan=OutputPlan(job.payload))
            stored = None
            if job.inverted is not None:  # the photo's inversion, for later edits of the same photo and caption
                reporter.renew_heartbeats()
                self.storage.put_bytes(inversion_arrays_key(job.id), inversion_bytes(job.inverted), SAFETENSORS)
                stored = {"arrays_key": inversion_arrays_key(job.id)}
        except StorageError as exc:
            return error_info(exc)
        except Exception as exc:  # noqa: BLE001 — encoding one job's outputs must not sink the batch
            return job_error(ErrorType.output_error, f"{type(exc).__name__}: {exc}")
        payload = job.payload
        if self.store.mark_succeeded(job.id, results=results, attention_maps=maps, inversion=stored,
                                     run_seconds=time.monotonic() - run_started) \
                and stored is not None and payload.inversion_digest:
            remember_inversion(self.store.redis, payload.tenant, payload.inversion_digest, job.id,
                               self.store.retention_seconds)
        return None

    def _store_inversion_and_succeed(self, job: RunningJob, run_started: float,
                                     reporter: StepReporter) -> ErrorInfo | None:
        """x_T + per-step embeddings (safetensors) and the reconstruction in S3, then succeeded, then the reuse
        key (``remember_inversion``) so equal requests and photo edits start from it."""
        result = job.result
        try:
            stored = self._uploaded(job, reporter) if job.upload is not None else \
                store_inversion(self.storage, result, before_each=reporter.renew_heartbeats)  # type: ignore[arg-type]
        except StorageError as exc:
            return error_info(exc)
        except Exception as exc:  # noqa: BLE001 — one job's objects must not sink the batch
            return job_error(ErrorType.output_error, f"{type(exc).__name__}: {exc}")
        results = []
        if stored.get("reconstruction_key"):
            image = result.images[0]  # type: ignore[union-attr]
            results.append({"key": stored["reconstruction_key"], "index": 0, "label": "reconstruction",
                            "width": image.width, "height": image.height})
        payload = job.payload
        if self.store.mark_succeeded(job.id, results=results, attention_maps=[], inversion=stored,
                                     run_seconds=time.monotonic() - run_started) and payload.inversion_digest:
            remember_inversion(self.store.redis, payload.tenant, payload.inversion_digest, job.id,
                               self.store.retention_seconds)
        return None

    def _requeue(self, job: RunningJob) -> str:
        """Worker abort: give the edit back to its queue (counts as an attempt) — or cancel it if asked to."""
        if self.store.mark_requeued(job.id, f"worker {self.worker_name} aborted mid-batch"):
            self.store.reenqueue(job.id, at_front=True)
            return "requeued"
        return "canceled" if self._edit_status(job.id) == "canceled" else "skipped"

    def _edit_status(self, edit_id: str) -> str:
        return (self.store.redis.hget(edit_key(edit_id), "status") or b"missing").decode()

    def _skip(self, job: RunningJob) -> str:
        """The edit is no longer queued (canceled, finished by a presumed-dead worker, or already running)."""
        c = job.claimed
        status = self._edit_status(job.id)
        if status in TERMINAL_OR_MISSING:
            settle(self.bridge.connection, c.job, "failed" if status == "missing" else status,
                   f"edit already {status}")
        self.bridge.release(c.job, job.execution)
        log_event("job", edit_id=job.id, outcome="skipped", status=status)
        return "skipped"

    @staticmethod
    def _exc_string(job: RunningJob, error: ErrorInfo | None) -> str:
        if error is None:
            return "failed"
        exc = job.result.error if job.result is not None else None
        trace = "".join(traceback.format_exception(exc)) if isinstance(exc, BaseException) else ""
        return f"{error.type}: {error.message}" + (f" (field {error.field})" if error.field else "") + \
            ("\n" + trace if trace else "")


def is_inversion(job: RunningJob) -> bool:
    return job.payload is not None and job.payload.request.kind == "inversion"


def run_with_split(runner: BatchRunner, specs: list[JobSpec], on_step) -> dict[str, JobResult]:
    """Run ``specs`` as one batch; jobs lost to a failure of the shared call are retried in halves.

    ``BatchRunner`` reports a failed batched UNet call as ``BatchForwardError`` on every job of the call; an
    exception escaping ``run`` (out of memory while preparing, say) counts the same. Halving isolates one
    poisonous job in log2(n) reruns and gives a memory-bound batch a smaller footprint.
    """
    try:
        results = {r.job_id: r for r in runner.run(specs, on_step)}
        lost = [s for s in specs if isinstance(results[s.job_id].error, BatchForwardError)]
        cause: BaseException | None = results[lost[0].job_id].error if lost else None
    except Exception as exc:  # noqa: BLE001 — every job of this call is affected, none is to blame yet
        if len(specs) == 1:
            return {specs[0].job_id: JobResult(job_id=specs[0].job_id, error=exc)}
        results, lost, cause = {}, list(specs), exc
    if len(lost) <= 1:
        return results
    log_event("batch_split", jobs=len(lost), cause=f"{type(cause).__name__}: {cause}")
    _free_device_memory()
    mid = len(lost) // 2
    for half in (lost[:mid], lost[mid:]):
        results.update(run_with_split(runner, half, on_step))
    return results


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
