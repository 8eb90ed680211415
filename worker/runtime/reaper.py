"""Recover edits whose worker died: requeue them at the front of their queue, or fail them after N crashes.

Why our own reaper instead of RQ's ``StartedJobRegistry.cleanup``: RQ's runs every 10 minutes, knows
nothing of our edit records, and would fail or retry behind the JobStore's back. Ours runs every
``reaper_interval_seconds`` in every worker (one at a time, by a Redis lock), and standalone with
``python -m worker.runtime.reaper --once``.

Crash-safety of the reaper itself: an expired entry is first *leased* (its score pushed ahead atomically,
only if still expired), then handled, then removed. A reaper that dies midway leaves the lease to expire
and the next run repeats the work; every step is idempotent (a requeued edit is only re-pushed when its
id is in no queue list, a terminal edit only gets its RQ job tidied).

It also returns *stranded* claims — ids a worker moved into a queue's ``:intermediate`` list and then died
before starting — to the front of their queue, and trims expired Finished/Failed registry entries (RQ's
own maintenance never runs on these queues), and runs the fair-share repair sweep of ``service.limits``.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import redis
from rq.exceptions import NoSuchJobError
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from editserve.contract import ErrorType, job_error
from service import redisconn, scripts
from service.cancel_after import cancel_due
from service.config import Settings, get_settings
from service.jobstore import JobStore
from service.keys import REAPER_LOCK_KEY, edit_key
from service.queues import discover
from service.webhooks.emit import emit as emit_webhook
from worker.runtime.batching import intermediate_key, queue_key
from worker.runtime.retention import RetentionSweep
from worker.runtime.rqbridge import execution_from_entry, settle, split_entry

log = logging.getLogger("editserve.reaper")

LOCK_KEY = REAPER_LOCK_KEY
LOCK_MIN_SECONDS = 5.0  # a pass takes milliseconds; a reaper killed mid-pass only blocks the others this long
LEASE_SECONDS = 15  # an entry whose reaper died mid-recovery is retried after this



@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    tidied: list[str] = field(default_factory=list)  # stale entries of edits that are terminal or running elsewhere
    stranded: list[str] = field(default_factory=list)
    released_held: int = 0  # fair-share held edits released by the admission repair pass
    canceled_after: list[str] = field(default_factory=list)  # edits canceled at their Cancel-After deadline
    skipped_locked: bool = False


class Reaper:
    def __init__(self, connection: redis.Redis, settings: Settings, store: JobStore | None = None):
        self.connection = connection
        self.settings = settings
        self.store = store or JobStore(connection, settings)
        self._lease = connection.register_script(scripts.REAPER_LEASE)
        self._release_lock = connection.register_script(scripts.COMPARE_AND_DELETE)
        self._return_stranded = connection.register_script(scripts.RETURN_STRANDED)
        self.retention = RetentionSweep(connection, settings)

    @property
    def max_attempts(self) -> int:
        return self.settings.worker.max_retries + 1

    def run_once(self) -> ReapReport:
        """One pass over every edit queue, if no other reaper holds the lock."""
        token = uuid.uuid4().hex
        # the lock only saves duplicate work: two overlapping passes are safe, every entry is leased atomically
        lock_ms = int(max(LOCK_MIN_SECONDS, self.settings.worker.reaper_interval_seconds) * 1000)
        if not self.connection.set(LOCK_KEY, token, nx=True, px=lock_ms):
            return ReapReport(skipped_locked=True)
        report = ReapReport()
        try:
            for group in discover(self.connection):
                for name in group.queue_names:
                    self.reap_queue(name, report)
            report.released_held = self._repair_admission()
            report.canceled_after = self._cancel_due()
            self._sweep_retention()
        finally:
            self._release_lock(keys=[LOCK_KEY], args=[token])
        for what in ("requeued", "failed", "tidied", "stranded"):
            if getattr(report, what):
                log.warning("reaper %s: %s", what, getattr(report, what))
        return report

    def _cancel_due(self) -> list[str]:
        """Edits whose ``Cancel-After`` deadline passed are canceled (``service.cancel_after``)."""
        try:
            return cancel_due(self.connection, self.store)
        except Exception:  # best-effort like the repair sweep: recovering crashed jobs comes first
            log.exception("cancel-after sweep failed")
            return []

    def _repair_admission(self) -> int:
        """``JobStore.release_held``: the gateway's fair-share bookkeeping asks the reaper to run its
        idempotent repair sweep every pass."""
        try:
            return self.store.release_held()
        except Exception:  # the repair is best-effort; recovering crashed jobs must not depend on it
            log.exception("admission repair sweep failed")
            return 0

    def _sweep_retention(self) -> None:
        """One bounded pass of ``RetentionSweep``: keys no TTL covers (tenant indexes, registries)."""
        try:
            self.retention.run_once()
        except Exception:  # best-effort like the repair sweep: recovery must not depend on it
            log.exception("retention sweep failed")

    def reap_queue(self, name: str, report: ReapReport) -> None:
        started = StartedJobRegistry(name, connection=self.connection)
        now = time.time()
        for raw in self.connection.zrangebyscore(started.key, 0, now):
            entry = raw.decode()
            if self._lease(keys=[started.key], args=[entry, now, now + LEASE_SECONDS]):
                self.recover(name, entry, report)
        self._return_stranded_claims(name, report)
        FinishedJobRegistry(name, connection=self.connection).cleanup()
        FailedJobRegistry(name, connection=self.connection).cleanup()
        self._clean_canceled(name, now)

    def _clean_canceled(self, name: str, now: float, batch: int = 1000) -> None:
        """Drop expired CanceledJobRegistry entries (RQ never cleans that registry). Entries RQ itself scored
        with the time they were added count as expired too: their job hashes get the result TTL if they have
        none, so nothing a cancel left behind lives forever."""
        key = CanceledJobRegistry(name, connection=self.connection).key
        expired = self.connection.zrangebyscore(key, 0, now, start=0, num=batch)
        if not expired:
            return
        ttl = self.settings.worker.result_ttl_seconds
        with self.connection.pipeline() as pipe:
            for raw in expired:
                pipe.ttl(Job.key_for(raw.decode()))
            ttls = pipe.execute()
            for raw, job_ttl in zip(expired, ttls):
                if job_ttl == -1:
                    pipe.expire(Job.key_for(raw.decode()), ttl)
            pipe.zrem(key, *expired)
            pipe.execute()

    # ------------------------------------------------------------------ abandoned executions
    def recover(self, name: str, entry: str, report: ReapReport) -> None:
        job_id, _ = split_entry(entry)
        try:
            job: Job | None = Job.fetch(job_id, connection=self.connection)
        except NoSuchJobError:  # the edit record still has the payload: reenqueue rebuilds the RQ job
            job = None
        status, attempts, worker = self.connection.hmget(edit_key(job_id), "status", "attempts", "worker")
        status_s = status.decode() if status else "missing"
        if status_s == "missing" or self._running_elsewhere(name, job_id, entry):
            report.tidied.append(job_id)
        elif status_s == "processing":
            self._abandoned(job_id, job, int(attempts or 0), (worker or b"?").decode(), report)
        elif status_s == "queued":  # a previous reaper died between mark_requeued and reenqueue
            self.store.reenqueue(job_id, at_front=True)
            report.requeued.append(job_id)
        else:
            self._settle(job, status_s, f"edit {status_s} (found abandoned by the reaper)")
            report.tidied.append(job_id)
        self._drop_entry(name, entry, job)

    def _abandoned(self, job_id: str, job: Job | None, attempts: int, worker: str, report: ReapReport) -> None:
        if attempts >= self.max_attempts:
            message = (f"worker crashed {attempts} times while running this edit (last: {worker}); "
                       f"giving up after {self.max_attempts} attempts")
            self.store.mark_failed(job_id, job_error(ErrorType.worker_crashed, message))
            self._settle(job, "failed", message)
            report.failed.append(job_id)
        elif self.store.mark_requeued(job_id, f"worker {worker} stopped heartbeating (attempt {attempts})"):
            self.store.reenqueue(job_id, at_front=True)
            report.requeued.append(job_id)
        else:  # a cancel was pending: the JobStore canceled it instead
            status = (self.connection.hget(edit_key(job_id), "status") or b"canceled").decode()
            self._settle(job, status, "canceled while its worker was dead")
            report.tidied.append(job_id)

    def _settle(self, job: Job | None, status: str, message: str) -> None:
        if job is not None:
            settle(self.connection, job, status, message)

    def _running_elsewhere(self, name: str, job_id: str, entry: str) -> bool:
        """Another live execution, or the id back in a queue list: this entry is stale, not abandoned."""
        now = time.time()
        started = StartedJobRegistry(name, connection=self.connection)
        for member, score in self.connection.zscan_iter(started.key, match=f"{job_id}:*"):
            if member.decode() != entry and score > now:
                return True
        for key in (queue_key(name), intermediate_key(name)):
            if self.connection.lpos(key, job_id) is not None:
                return True
        return False

    def _drop_entry(self, name: str, entry: str, job: Job | None) -> None:
        execution = execution_from_entry(self.connection, entry)
        with self.connection.pipeline() as pipe:
            pipe.zrem(StartedJobRegistry(name, connection=self.connection).key, entry)
            if job is not None:
                execution.delete(job=job, pipeline=pipe)
            else:
                pipe.delete(execution.key)
            pipe.execute()

    # ------------------------------------------------------------------ claimed but never started
    def _return_stranded_claims(self, name: str, report: ReapReport) -> None:
        intermediate = IntermediateQueue(queue_key(name), self.connection)
        grace = self.settings.worker.stranded_claim_seconds
        started_ids = {split_entry(m.decode())[0]
                       for m in self.connection.zrange(StartedJobRegistry(name, connection=self.connection).key, 0, -1)}
        for job_id in intermediate.get_job_ids():
            if job_id in started_ids or intermediate.set_first_seen(job_id):
                continue
            first_seen = intermediate.get_first_seen(job_id)
            if first_seen is None or time.time() - first_seen.timestamp() < grace:
                continue
            if self._return_stranded(keys=[intermediate.key, queue_key(name)], args=[job_id]):
                self.connection.delete(intermediate.get_first_seen_key(job_id))
                report.stranded.append(job_id)


class ReaperThread(threading.Thread):
    """Runs ``Reaper.run_once`` every ``reaper_interval_seconds`` inside a worker process."""

    def __init__(self, reaper: Reaper, interval: float):
        super().__init__(name="editserve-reaper", daemon=True)
        self.reaper = reaper
        self.interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.reaper.run_once()
            except Exception:  # a Redis blip must not kill the worker's reaper thread
                log.exception("reaper pass failed")

    def stop(self) -> None:
        self._stop_event.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Requeue or fail edits whose worker stopped heartbeating.")
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    connection = redisconn.rq_client(settings.redis_url)
    reaper = Reaper(connection, settings, JobStore(connection, settings, listeners=[emit_webhook]))
    while True:
        report = reaper.run_once()
        print(f"requeued={len(report.requeued)} failed={len(report.failed)} tidied={len(report.tidied)} "
              f"stranded={len(report.stranded)} released_held={report.released_held} "
              f"locked_out={report.skipped_locked}", flush=True)
        if args.once:
            return 0
        time.sleep(settings.worker.reaper_interval_seconds)


if __name__ == "__main__":
    raise SystemExit(main())
