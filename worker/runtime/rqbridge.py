"""RQ's per-job bookkeeping for jobs that run inside a batch.

Why by hand: RQ runs one job per ``perform_job``. A batch needs one ``Execution`` (StartedJobRegistry entry)
per job, heartbeats renewed from the denoising loop, and each job finished on its own. We reuse RQ's own
``handle_job_success`` / ``handle_job_failure`` (Result stream, Finished/Failed registries, dependents) by
pointing ``worker.execution`` at the job being finished — the rq 2.x calling convention (3.0 passes the
execution explicitly). Every rq call that is not plain public API lives here, and
``tests/test_worker_rq_guard.py`` pins its signature to rq 2.12.
"""

from __future__ import annotations

import uuid

import redis
from rq import Queue
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry
from rq.utils import now, parse_composite_key
from rq.worker import SimpleWorker


class BatchRqWorker(SimpleWorker):
    """A SimpleWorker that never runs its own loop: registration, counters and finish handlers only."""


class RqBridge:
    def __init__(self, connection: redis.Redis, name: str, *, heartbeat_ttl: int, result_ttl: int):
        self.connection = connection
        self.heartbeat_ttl = heartbeat_ttl
        self.result_ttl = result_ttl
        self.rq_worker = BatchRqWorker([], name=name, connection=connection, default_result_ttl=result_ttl)

    @property
    def name(self) -> str:
        return self.rq_worker.name

    # -- worker registration (``rq info`` shows us) -------------------------------------------------
    def register(self) -> None:
        try:
            self.rq_worker.register_birth()
        except ValueError:  # a live-looking worker of this name: a restart within its TTL
            self.rq_worker.name = f"{self.rq_worker.name}-{uuid.uuid4().hex[:6]}"
            self.rq_worker.register_birth()
        self.rq_worker.set_state("idle")

    def unregister(self) -> None:
        self.rq_worker.register_death()

    def worker_heartbeat(self) -> None:
        self.rq_worker.heartbeat()

    # -- per job ------------------------------------------------------------------------------------
    def start(self, job: Job, queue: Queue) -> Execution:
        """StartedJobRegistry entry + STARTED status, and the id leaves the intermediate list, atomically."""
        with self.connection.pipeline() as pipe:
            execution = Execution.create(job, self.heartbeat_ttl, pipeline=pipe, worker_name=self.name)
            job.prepare_for_execution(self.name, pipeline=pipe)
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            pipe.execute()
        return execution

    def renew(self, running: list[tuple[Job, Execution]]) -> None:
        """Push every running job's StartedJobRegistry score to now + TTL (``xx``: never resurrect a reaped one)."""
        with self.connection.pipeline() as pipe:
            for job, execution in running:
                execution.heartbeat(job.started_job_registry, self.heartbeat_ttl, pipeline=pipe)
            self.rq_worker.heartbeat(pipeline=pipe)
            pipe.execute()

    def owns(self, job: Job, execution: Execution) -> bool:
        """False once a reaper (or a cancel of the RQ job) removed our StartedJobRegistry entry."""
        return self.connection.zscore(job.started_job_registry.key, execution.composite_key) is not None

    def succeed(self, job: Job, queue: Queue, execution: Execution, summary: dict) -> None:
        job.ended_at = now()
        job._result = summary  # what Result.create stores for this execution
        job._status = JobStatus.FINISHED
        self.rq_worker.execution = execution
        self.rq_worker.handle_job_success(job=job, queue=queue, started_job_registry=queue.started_job_registry)

    def fail(self, job: Job, queue: Queue, execution: Execution, exc_string: str) -> None:
        job.ended_at = now()
        job.retries_left = None  # our reaper owns retries; a job failing on its own merits is final
        self.rq_worker.execution = execution
        self.rq_worker.handle_job_failure(job=job, queue=queue, started_job_registry=queue.started_job_registry,
                                          exc_string=exc_string)

    def cancel(self, job: Job, queue: Queue, execution: Execution) -> None:
        with self.connection.pipeline() as pipe:
            self.rq_worker.execution = execution
            self.rq_worker.cleanup_execution(job, pipeline=pipe)
            job.ended_at = now()
            job.set_status(JobStatus.CANCELED, pipeline=pipe)
            expire_canceled(job, self.result_ttl, pipe)
            pipe.execute()

    def release(self, job: Job, execution: Execution) -> None:
        """Forget our execution without finishing the RQ job (another attempt owns it now)."""
        with self.connection.pipeline() as pipe:
            execution.delete(job=job, pipeline=pipe)
            pipe.execute()


# -- recovery (used by the reaper) ----------------------------------------------------------------
def execution_from_entry(connection: redis.Redis, entry: str) -> Execution:
    """A StartedJobRegistry member (``<job_id>:<execution_id>``) as an Execution."""
    return Execution.from_composite_key(entry, connection=connection)


def split_entry(entry: str) -> tuple[str, str]:
    return parse_composite_key(entry)


def expire_canceled(job: Job, ttl: int, pipe) -> None:
    """A canceled RQ job expires like a finished one: RQ gives its hash no TTL and scores its CanceledJobRegistry
    entry with the time added, never cleaning it; here the entry's score is its expiry (the reaper removes it
    then) and the hash expires at the same time."""
    CanceledJobRegistry(job.origin, job.connection).add(job, ttl=ttl, pipeline=pipe)
    pipe.expire(job.key, ttl)


def settle(connection: redis.Redis, job: Job, edit_status: str, exc_string: str = "") -> None:
    """Put an RQ job whose edit is already terminal into the matching registry (no Result is written)."""
    if job.get_status(refresh=True) in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED):
        return
    queue = Queue(job.origin, connection=connection)
    with connection.pipeline() as pipe:
        job.ended_at = now()
        if edit_status == "succeeded":
            job.set_status(JobStatus.FINISHED, pipeline=pipe)
            queue.finished_job_registry.add(job, ttl=job.get_result_ttl(500), pipeline=pipe)
        elif edit_status == "canceled":
            job.set_status(JobStatus.CANCELED, pipeline=pipe)
            expire_canceled(job, job.get_result_ttl(500), pipe)
        else:
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            queue.failed_job_registry.add(job, ttl=job.failure_ttl, exc_string=exc_string, pipeline=pipe)
        pipe.execute()
