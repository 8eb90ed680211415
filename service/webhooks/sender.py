"""The delivery process (``python -m service.webhooks``): take a job, run its attempt, move due retries to
the queue, repeat, riding out Redis outages (see the package docstring); and the sweep that requeues what a
dead sender left behind."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis as redis_lib
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue, SimpleWorker
from rq.exceptions import DequeueTimeout, NoSuchJobError
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.scheduler import RQScheduler
from rq.utils import parse_composite_key

from service import redisconn, scripts
from service.config import Settings
from service.webhooks.events import QUEUE_NAME, TRANSIENT_REDIS_ERRORS, text

log = logging.getLogger(__name__)


def requeue_job(connection: redis_lib.Redis, job_id: str, entries: list[str] | tuple[str, ...] = ()) -> bool:
    """Put a delivery job that was taken but never acknowledged back at the front of the queue.

    Atomic, and only for whoever *claims* it: the id must still be in the ``:intermediate`` list or hold one of
    ``entries`` (its StartedJobRegistry members, ``job_id:execution_id``), which this removes. So a sender
    requeueing its own interrupted job and another sender's sweep never both push it, and a job that RQ already
    acknowledged (neither left) is not pushed. Returns whether it was pushed.
    """
    queue = Queue(QUEUE_NAME, connection=connection)
    pushed = connection.eval(scripts.WEBHOOK_REQUEUE, 3, queue.key, queue.intermediate_queue_key,
                             queue.started_job_registry.key, job_id, *entries)
    if not pushed:
        return False
    try:
        job = Job.fetch(job_id, connection=connection)
    except NoSuchJobError:
        job = None
    with connection.pipeline() as pipe:
        if job is not None:
            job.set_status(JobStatus.QUEUED, pipeline=pipe)
        for entry in entries:
            execution = Execution.from_composite_key(entry, connection=connection)
            if job is not None:
                execution.delete(job=job, pipeline=pipe)
            else:
                pipe.delete(execution.key)
        pipe.delete(IntermediateQueue(queue.key, connection).get_first_seen_key(job_id))
        pipe.execute()
    return True


def recover_stranded(connection: redis_lib.Redis, *, grace_seconds: float = 30.0,
                     now: float | None = None) -> list[str]:
    """Requeue the delivery jobs a dead sender left behind; returns their ids. Safe to run from every sender.

    - StartedJobRegistry entries past their expiry (RQ sets it to the job timeout + 60 s when a job starts, and
      the job cannot run longer): the sender running it was killed, or stopped during an outage.
    - ids moved to ``:intermediate`` and never started, first seen there more than ``grace_seconds`` ago (a
      live sender starts a job milliseconds after taking it).
    Also trims RQ's finished/failed registries of this queue (RQ's own ``work()`` loop did, every 10 minutes).
    """
    now = time.time() if now is None else now
    queue = Queue(QUEUE_NAME, connection=connection)
    started_key = queue.started_job_registry.key
    recovered = []
    for raw in connection.zrangebyscore(started_key, 0, now):
        entry = text(raw)
        job_id, _ = parse_composite_key(entry)
        if requeue_job(connection, job_id, [entry]):
            recovered.append(job_id)
    intermediate = IntermediateQueue(queue.key, connection)
    started_ids = {parse_composite_key(text(m))[0] for m in connection.zrange(started_key, 0, -1)}
    for job_id in intermediate.get_job_ids():
        if job_id in started_ids or intermediate.set_first_seen(job_id):
            continue
        first_seen = intermediate.get_first_seen(job_id)
        if first_seen is not None and now - first_seen.timestamp() >= grace_seconds:
            if requeue_job(connection, job_id):
                recovered.append(job_id)
    FinishedJobRegistry(QUEUE_NAME, connection=connection).cleanup()
    FailedJobRegistry(QUEUE_NAME, connection=connection).cleanup()
    if recovered:
        log.warning("requeued %d webhook delivery job(s) left unfinished by a stopped sender: %s",
                    len(recovered), recovered)
    return recovered


# ---------------------------------------------------------------------------------------------- process

@dataclass
class Backoff:
    """Delays between tries while Redis is unavailable: ``first`` doubling up to ``cap``, each scaled by a
    random factor in [0.5, 1) so senders restarted together do not reconnect in lockstep."""

    first: float = 0.1
    cap: float = 5.0
    rand: Callable[[], float] = random.random
    failures: int = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2 ** min(self.failures, 32))
        self.failures += 1
        return delay * (0.5 + 0.5 * self.rand())

    def reset(self) -> None:
        self.failures = 0


class _RqWorker(SimpleWorker):
    """RQ's per-job bookkeeping (Execution, registries, results, counters) for ``Sender``, whose own loop
    replaces ``work()``: RQ's loop quits on any Redis error outside its dequeue call, and its forked scheduler
    dies on one and is only restarted by the 10-minute maintenance."""

    def handle_exception(self, job: Job, *exc_info) -> None:
        if isinstance(exc_info[1], (*TRANSIENT_REDIS_ERRORS, SystemExit, KeyboardInterrupt)):
            # Redis went away under the attempt, or a cold stop: not a failed delivery (RQ would file it as
            # one, never to be retried). Up to Sender, which requeues the job.
            raise exc_info[1]
        super().handle_exception(job, *exc_info)


@dataclass
class Sender:
    """The delivery process: take a job, run its attempt, move due retries to the queue, and repeat, riding
    out Redis outages (see the module docstring); SIGTERM/SIGINT stop it after the attempt in progress
    (within ``dequeue_timeout`` when idle, at once while waiting for Redis), a second one at once."""

    settings: Settings
    burst: bool = False
    logging_level: str | int = "INFO"
    backoff: Backoff = field(default_factory=Backoff)
    dequeue_timeout: int = 1  # seconds an idle sender blocks on the queue between looks at retries and signals
    schedule_interval: float = 1.0
    housekeeping_interval: float = 30.0
    stranded_grace_seconds: float = 30.0

    def __post_init__(self) -> None:
        # One quick try per command (redis-py's default retries would hide an outage for seconds, and could
        # repeat a non-idempotent write); the loop below does the waiting. Reconnects are implicit.
        self.connection = redisconn.rq_client(
            self.settings.redis_url, socket_connect_timeout=2, socket_timeout=self.dequeue_timeout + 4,
            retry=Retry(NoBackoff(), 0))
        self.queue = Queue(QUEUE_NAME, connection=self.connection)
        self.worker = _RqWorker([self.queue], connection=self.connection, prepare_for_work=False)
        self.worker.hostname, self.worker.pid = socket.gethostname(), os.getpid()
        self.scheduler = RQScheduler([self.queue], connection=self.connection, logging_level=self.logging_level)
        self.stop_requested = False
        self.in_flight: tuple[str, Job | None] | None = None  # taken from the queue, not yet acknowledged
        self.outage_since: float | None = None
        self.registered = False
        self.recovered_ok = False  # False at start and after an outage: check registration, sweep at once
        self.next_schedule = 0.0
        self.next_housekeeping = 0.0

    # -- lifecycle ----------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def request_stop(self, signum: int, frame: Any = None) -> None:
        if self.stop_requested:
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            raise SystemExit(1)  # an attempt in flight is left to recover_stranded
        self.stop_requested = True
        log.info("%s: stopping after the attempt in progress", signal.Signals(signum).name)

    def run(self) -> int:
        log.info("webhook sender %s on queue %s", self.worker.name, QUEUE_NAME)
        try:
            while not self.stop_requested:
                try:
                    more = self.step()
                except redis_lib.RedisError as exc:
                    self._redis_failed(exc)
                    continue
                except Exception:  # a bug must not take deliveries down with it; logged every time
                    log.exception("webhook sender loop failed; retrying")
                    self.in_flight = None  # no tight loop on one job: recover_stranded requeues it, later
                    self._sleep(self.backoff.next())
                    continue
                self._redis_ok()
                if not more:
                    break
        finally:
            self._teardown()
        return 0

    def step(self) -> bool:
        """One turn: recover, schedule, take at most one job and run it. False once a burst is done."""
        if not self.recovered_ok:
            self._after_reconnect()
        if self.in_flight is not None:
            self._requeue_in_flight()
        now = time.monotonic()
        if now >= self.next_schedule:
            self._schedule()
            self.next_schedule = now + self.schedule_interval
        if now >= self.next_housekeeping:
            self.worker.heartbeat()
            recover_stranded(self.connection, grace_seconds=self.stranded_grace_seconds)
            self.next_housekeeping = now + self.housekeeping_interval
        if self.stop_requested:
            return False
        taken = self._dequeue()
        if taken is None:
            return not self.burst
        job, queue = taken
        self.in_flight = (job.id, job)
        self.worker.execute_job(job, queue)  # a transient Redis error in it leaves in_flight set: requeued
        self.in_flight = None
        return True

    # -- the steps ----------------------------------------------------------------------------------
    def _after_reconnect(self) -> None:
        if not self.registered or not self.connection.exists(self.worker.key):
            self.worker.register_birth()  # again if Redis came back without our key (no AOF, long outage)
            self.registered = True
        self.worker.set_state("idle")
        self.next_housekeeping = 0.0  # sweep now: a sender may have died during the outage
        self.recovered_ok = True

    def _schedule(self) -> None:
        """Move retries that are due from the ScheduledJobRegistry to the queue (RQ's scheduler, in-process)."""
        scheduler = self.scheduler
        if scheduler.should_reacquire_locks:
            if scheduler.acquire_locks():
                scheduler.register_birth()
        if scheduler.acquired_locks:
            scheduler.heartbeat()  # refreshes the lock; drops it if another sender took it over
        if scheduler.acquired_locks:
            scheduler.enqueue_scheduled_jobs()

    def _dequeue(self) -> tuple[Job, Queue] | None:
        timeout = None if self.burst else self.dequeue_timeout
        try:
            return Queue.dequeue_any([self.queue], timeout, connection=self.connection)
        except DequeueTimeout:
            return None
        except redis_lib.RedisError as exc:
            job_id = getattr(exc, "job_id", None)  # rq: taken, then fetching it failed
            if job_id is not None:
                self.in_flight = (job_id, None)
            raise

    def _requeue_in_flight(self) -> None:
        job_id, job = self.in_flight
        started_key = self.queue.started_job_registry.key
        entries = [text(member) for member, _ in self.connection.zscan_iter(started_key, match=f"{job_id}:*")]
        if requeue_job(self.connection, job_id, entries):
            log.warning("delivery job %s was cut off (Redis outage or cold stop) before RQ recorded its end: "
                        "queued again (its attempt is repeated unless recorded, same webhook-id)", job_id)
        elif job is not None and not self.connection.exists(job.key):
            self.queue.enqueue_job(job, at_front=True)  # Redis came back without it (no persistence)
            log.warning("delivery job %s was lost with Redis' data: queued again from memory", job_id)
        self.in_flight = None
        self.worker.set_state("idle")

    # -- outages ------------------------------------------------------------------------------------
    def _redis_failed(self, exc: redis_lib.RedisError) -> None:
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            log.warning("Redis unavailable (%s: %s); retrying with backoff up to %gs until it answers",
                        type(exc).__name__, exc, self.backoff.cap)
        else:
            log.debug("Redis still unavailable: %s: %s", type(exc).__name__, exc)
        self.recovered_ok = False
        self._sleep(self.backoff.next())

    def _redis_ok(self) -> None:
        if self.outage_since is not None:
            log.warning("Redis answers again after %.1fs; delivering", time.monotonic() - self.outage_since)
            self.outage_since = None
        self.backoff.reset()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stop_requested and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _teardown(self) -> None:
        if self.outage_since is not None:
            log.info("stopping while Redis is unavailable: not deregistering (entries expire by themselves)")
            return
        try:
            if self.in_flight is not None:
                self._requeue_in_flight()
            if self.scheduler.acquired_locks:
                self.scheduler.release_locks()
                self.scheduler.register_death()
            if self.registered:
                self.worker.register_death()
        except redis_lib.RedisError as exc:
            log.warning("could not deregister the sender: %s", exc)
