"""The worker's finisher: one thread settles a ran batch's jobs while the worker loop runs the next batch.

Why: once a batch's run is over, finishing it — its S3 uploads, the JobStore marks (publish, webhook emit),
RQ's bookkeeping — kept the loop from gathering the next batch, time the accelerator sat idle
(bench/service_bench.py; figures in bench/results/).

Why one thread and one batch at a time: finishing is short next to a run, so one thread keeps up. A batch
handed over while the previous one is still being finished waits for it: at most one batch's outputs go to
S3 at a time (bounded memory), jobs are settled in claim order, and RQ's worker object (whose ``execution``
attribute RQ's finish handlers use) is touched by this thread only.

Heartbeats: the batch being finished renews its own jobs' heartbeats from this thread (between jobs and while
waiting for uploads, ``BatchProcessor.finish``), so that if finishing hangs they stop and the reaper recovers
those jobs, as for a hung run. Batches waiting for their turn are renewed by the thread that waits.

Crash safety is ``BatchProcessor.finish``'s: a job whose finishing raises is failed alone. A worker killed
mid-finish leaves its jobs in the StartedJobRegistry: the reaper re-runs those still processing (their
outputs, uploaded or not, are overwritten under the same keys) and tidies those already terminal.

``submit`` and ``wait`` are called by one thread, the worker loop's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

from worker.runtime.processing import ActiveBatch, BatchReport

log = logging.getLogger("editserve.worker")


@dataclass(frozen=True)
class FinishingBatch:
    """A batch handed to the finisher: its size at once, its report when every job is settled."""

    batch_id: str
    size: int
    future: Future

    def report(self, timeout: float | None = None) -> BatchReport:
        """Block until the batch's jobs are settled (re-raises what made its finishing crash as a whole)."""
        return self.future.result(timeout)


class Finisher:
    def __init__(self, finish: Callable[[ActiveBatch], BatchReport]):
        self._finish = finish
        self._pool: ThreadPoolExecutor | None = None
        self._current: Future | None = None

    def submit(self, ran: ActiveBatch, *waiting: ActiveBatch) -> FinishingBatch:
        """Hand ``ran`` to the finisher thread once the batch before it is finished; returns at once then.
        ``waiting``: other batches of the caller whose heartbeats must be kept alive meanwhile."""
        self.wait(ran, *waiting)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="editserve-finisher")
        self._current = self._pool.submit(self._run, ran)
        return FinishingBatch(ran.batch_id, ran.size, self._current)

    def wait(self, *waiting: ActiveBatch) -> None:
        """Block until no batch is being finished, renewing the ``waiting`` batches' heartbeats (throttled)."""
        current = self._current
        if current is None:
            return
        interval = min((batch.heartbeat_interval for batch in waiting), default=None)
        while not wait_futures([current], timeout=interval).done:
            for batch in waiting:
                batch.renew_heartbeats()
        self._current = None

    def close(self) -> None:
        """Drain (warm shutdown: the batch being finished is finished), then stop the thread."""
        self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _run(self, ran: ActiveBatch) -> BatchReport:
        try:
            return self._finish(ran)
        except Exception:  # per-job errors are handled inside; this is a bug: the rest's heartbeats stop (reaper)
            log.exception("finishing batch %s crashed; its unsettled jobs are left to the reaper", ran.batch_id)
            raise
