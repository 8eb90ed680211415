"""Heartbeats renewed by a thread of their own while a batch is alive, whatever its steps take.

Why: renewing only between denoising steps made a step longer than the heartbeat TTL (a huge job, a first
compiled step on a GPU, a slow model load) look like a dead worker, and the reaper ran the job a second time
while the first run was still going. The thread renews every ``interval`` for as long as the batch makes
progress: every place that used to renew (each step, the finishing loop, an upload wait) now also *touches*
the keeper. A batch with no touch for ``stall_seconds`` counts as hung: renewals stop and the reaper recovers
its jobs, as before. A dead process renews nothing, so a crash is found within the TTL as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("editserve.worker")


class HeartbeatKeeper:
    def __init__(self, renew: Callable[[], None], *, interval: float, stall_seconds: float,
                 clock: Callable[[], float] = time.monotonic, name: str = "editserve-heartbeat"):
        self.renew = renew
        self.interval = interval
        self.stall_seconds = stall_seconds
        self.clock = clock
        self._touched_at = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.renewals = 0

    def start(self) -> HeartbeatKeeper:
        self._thread.start()
        return self

    def touch(self) -> None:
        """The batch made progress (a step ended, a job was settled, an upload is still being retried)."""
        self._touched_at = self.clock()

    def stop(self) -> None:
        """Idempotent; after it returns no renewal is in flight."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def stalled(self) -> bool:
        return self.clock() - self._touched_at > self.stall_seconds

    def _run(self) -> None:
        warned = False
        while not self._stop.wait(self.interval):
            if self.stalled:
                if not warned:
                    log.warning("batch made no progress for %.0fs: heartbeats stop, the reaper will recover it",
                                self.stall_seconds)
                    warned = True
                continue
            warned = False
            try:
                self.renew()
                self.renewals += 1
            except Exception as exc:  # noqa: BLE001 — a Redis blip: the next tick tries again
                log.warning("heartbeat renewal failed: %s", exc)
