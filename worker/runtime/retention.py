"""The retention sweep: what a workload leaves in Redis that no TTL covers, cleaned in bounded passes.

Why a sweep at all: most keys expire by themselves (edit records, RQ job hashes and results, idempotency
claims, webhook state, ETA statistics: README "Retention"), but sorted sets and sets indexed by many edits
cannot carry one TTL per member. Those are trimmed here:

- ``tenant:{t}:edits``: members older than the record TTL whose record has expired (a member whose record
  still exists stays: it is still listed);
- every RQ queue's Finished/Failed registries (the ``webhooks`` queue's too), whose entries carry
  their expiry as score and which RQ's own maintenance only trims every ten minutes, if at all;
- RQ's worker sets (``rq:workers``, ``rq:workers:{queue}``): names of workers whose key expired (killed);
- ``rq:queue:{q}:intermediate:first_seen:{id}``: the stranded-claim clock the reaper starts for a claimed id,
  which RQ keeps 24 h after the id has left the intermediate list (started): dropped once it has left.

Each pass SCANs at most ``retention.sweep_batch`` keys, resuming where the last one stopped, and looks at most
``sweep_batch`` members of each key, so a pass costs the same however large Redis grows. The reaper runs
one pass each time it runs (``worker.runtime.reaper``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
from rq import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.worker_registration import clean_worker_registry

from service.config import Settings
from service.keys import KEY_PREFIX, edit_key

TENANT_INDEX_PATTERN = f"{KEY_PREFIX}tenant:*:edits"
FIRST_SEEN_PATTERN = "rq:queue:*:intermediate:first_seen:*"
FIRST_SEEN_MARK = ":first_seen:"


@dataclass
class SweepReport:
    index_members_dropped: int = 0
    cycle_done: bool = False  # the key SCAN wrapped: every tenant index was looked at since the last wrap


class RetentionSweep:
    def __init__(self, connection: redis.Redis, settings: Settings):
        self.connection = connection
        self.settings = settings
        self._cursor = 0
        self._first_seen_cursor = 0

    @property
    def record_ttl_seconds(self) -> int:
        return self.settings.retention.record_ttl_seconds or self.settings.s3.retention_days * 24 * 3600

    def run_once(self) -> SweepReport:
        report = SweepReport()
        batch = self.settings.retention.sweep_batch
        self._cursor, keys = self.connection.scan(self._cursor, match=TENANT_INDEX_PATTERN, count=batch)
        report.cycle_done = self._cursor == 0
        cutoff_ms = (time.time() - self.record_ttl_seconds) * 1000
        for key in keys:
            report.index_members_dropped += self.trim_index(key, cutoff_ms, batch)
        self.clean_rq(time.time())
        self._first_seen_cursor, marks = self.connection.scan(self._first_seen_cursor, match=FIRST_SEEN_PATTERN,
                                                              count=batch)
        self.drop_first_seen_of_departed(marks)
        return report

    def drop_first_seen_of_departed(self, marks: list[bytes]) -> None:
        """Delete first-seen marks whose id is no longer in its queue's intermediate list."""
        if not marks:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            for mark in marks:
                intermediate, _, job_id = mark.decode().partition(FIRST_SEEN_MARK)
                pipe.lpos(intermediate, job_id)
            departed = [mark for mark, pos in zip(marks, pipe.execute()) if pos is None]
        if departed:
            self.connection.delete(*departed)

    def trim_index(self, key: bytes | str, cutoff_ms: float, batch: int) -> int:
        """Drop up to ``batch`` old members of one tenant index whose edit record no longer exists."""
        old = self.connection.zrangebyscore(key, 0, cutoff_ms, start=0, num=batch)
        if not old:
            return 0
        with self.connection.pipeline(transaction=False) as pipe:
            for member in old:
                pipe.exists(edit_key(member.decode()))
            gone = [member for member, exists in zip(old, pipe.execute()) if not exists]
        if gone:
            self.connection.zrem(key, *gone)
        return len(gone)

    def clean_rq(self, now: float) -> None:
        """Expired registry entries of every RQ queue, and dead workers' names (``rq:queues`` itself is
        bounded: a few queues per model plus the webhook queue)."""
        for queue in Queue.all(connection=self.connection):
            for registry in (FinishedJobRegistry, FailedJobRegistry):
                registry(queue.name, connection=self.connection).cleanup(now)
            clean_worker_registry(queue)
