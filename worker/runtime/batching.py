"""Claim edit jobs from their queues and gather one batch of a single batch key.

Why a Lua claim instead of ``Queue.dequeue_any``: with several queues RQ uses BLPOP, which removes the id
from Redis before the worker has recorded it anywhere; a worker killed in between loses the job. The
script below LMOVEs the id into the queue's ``:intermediate`` list (as RQ itself does for a single queue),
atomically and in priority order, so every id is always in a queue, an intermediate list or the
StartedJobRegistry — and the reaper can recover it from any of them. Redis cannot block on several lists
with a move, so waiting is a short poll (``poll_interval_ms``).

Nothing is ever pushed back: the first job (the head of the highest-priority non-empty queue) fixes the
batch, then its model's queues are searched for jobs of the same ``batch_tag`` (``service.queues``), which
are moved out of the middle of the list; the others keep their places. The search looks at the first
``SCAN_WINDOW`` ids of each queue, so a claim costs O(window) whatever the queue holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job

from editserve.contract import BatchKey
from editserve.contract import JobPayload
from service import scripts
from service.queues import BATCH_TAG_FIELD, PRIORITIES, batch_tag, model_queue_name, parse_queue_name, queue_name

SCAN_WINDOW = 256
"""Ids looked at per queue when gathering compatible jobs: bounds the claim script's cost."""


def queue_key(name: str) -> str:
    return f"rq:queue:{name}"


def intermediate_key(name: str) -> str:
    return f"{queue_key(name)}:intermediate"


@dataclass
class ClaimedJob:
    """A job moved to its queue's intermediate list by this worker, not yet started."""

    job: Job
    queue: Queue
    batch_key: BatchKey
    priority: str
    claimed_at: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        return self.job.id


class QueueClaimer:
    """Atomic, priority-ordered claims over the edit queues of the models this worker serves."""

    def __init__(self, connection: redis.Redis, models: Iterable[str]):
        self.connection = connection
        self.models = list(models)
        self._script = connection.register_script(scripts.CLAIM)
        self._names = [model_queue_name(m, p) for m in self.models for p in PRIORITIES]
        self._rotation = 0

    def queue_names(self) -> list[str]:
        """Served queues, high → normal → low. Named, not discovered: there are exactly 3 per model, and a queue a
        discovery pass had not seen yet (the first high-priority edit after a while) would lose its priority
        until the next pass; claiming from a queue that does not exist yet costs one empty LMOVE."""
        return self._ordered(self._names)

    def _ordered(self, names: list[str]) -> list[str]:
        """Priority order; within a priority the batch keys take turns, so one busy key cannot starve another."""
        ordered: list[str] = []
        for priority in PRIORITIES:
            same = sorted(n for n in names if (parse_queue_name(n) or ("",))[0] == priority)
            if same:
                shift = self._rotation % len(same)
                ordered += same[shift:] + same[:shift]
        return ordered

    def claim(self, names: list[str], count: int, key: BatchKey | None = None,
              pattern: str | None = None) -> list[ClaimedJob]:
        """Move up to ``count`` ids out of ``names`` (in order) without blocking: the heads, or with ``key``
        only jobs compatible with it (same batch tag), wherever they are in the first ``SCAN_WINDOW`` ids;
        ``pattern`` instead of ``key``: a tag pattern (``service.queues.lane_tag``)."""
        if not names or count <= 0:
            return []
        keys = [k for n in names for k in (queue_key(n), intermediate_key(n))]
        tag = batch_tag(key) if key is not None else (pattern or "")
        flat = self._script(keys=keys, args=[count, tag, SCAN_WINDOW, Job.redis_job_namespace_prefix,
                                             BATCH_TAG_FIELD])
        claimed: list[ClaimedJob] = []
        for raw_key, raw_id in zip(flat[::2], flat[1::2]):
            name = raw_key.decode()[len("rq:queue:"):]
            job_id = raw_id.decode()
            job = self._fetch(name, job_id)
            if job is not None:
                priority, _model = parse_queue_name(name)  # type: ignore[misc]
                queue = Queue(name, connection=self.connection)
                claimed.append(ClaimedJob(job=job, queue=queue, batch_key=key or job_batch_key(job),
                                          priority=priority))
        if claimed:
            self._rotation += 1
        return claimed

    def _fetch(self, name: str, job_id: str) -> Job | None:
        """The claimed job, or None (and the id dropped) when its hash is gone, as RQ's dequeue does."""
        try:
            return Job.fetch(job_id, connection=self.connection)
        except NoSuchJobError:
            self.connection.lrem(intermediate_key(name), 1, job_id)
            return None


def job_batch_key(job: Job) -> BatchKey:
    """The batch key a claimed job's payload names (its only argument is the payload JSON)."""
    return JobPayload.model_validate_json(job.args[0]).batch_key


@dataclass
class GatherPolicy:
    max_batch_size: int
    max_batch_wait_ms: int
    poll_interval_ms: int


class BatchGatherer:
    """Wait for one job on any served queue, then drain same-key jobs for at most ``max_batch_wait_ms``."""

    def __init__(self, claimer: QueueClaimer, policy: GatherPolicy):
        self.claimer = claimer
        self.policy = policy

    def gather(self, timeout: float, should_stop: Callable[[], bool] = lambda: False) -> list[ClaimedJob]:
        first = self.wait_for_first(timeout, should_stop)
        if not first:
            return []
        return first + self.drain(first[0].batch_key, self.policy.max_batch_size - 1)

    def wait_for_first(self, timeout: float, should_stop: Callable[[], bool]) -> list[ClaimedJob]:
        deadline = time.monotonic() + timeout
        poll = self.policy.poll_interval_ms / 1000
        while not should_stop():
            claimed = self.claimer.claim(self.claimer.queue_names(), 1)
            if claimed:
                return claimed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(poll, remaining))
        return []

    def drain(self, key: BatchKey, room: int) -> list[ClaimedJob]:
        """Compatible jobs from the model's queues, high priority first, until ``room`` is filled or the admission
        window closes (see :func:`compatible_jobs`)."""
        return compatible_jobs(self.claimer, key, room, self.policy)


def compatible_jobs(claimer: QueueClaimer, key: BatchKey, room: int, policy: GatherPolicy) -> list[ClaimedJob]:
    """The gathering rule, in one place: jobs whose batch tag equals ``key``'s (``service.queues.batch_tag``),
    taken from ``key.model``'s queues high → low, polled until ``room`` is filled or ``max_batch_wait_ms`` ends."""
    names = [queue_name(key, p) for p in PRIORITIES]
    deadline = time.monotonic() + policy.max_batch_wait_ms / 1000
    poll = min(policy.poll_interval_ms / 1000, 0.005)
    gathered: list[ClaimedJob] = []
    while room - len(gathered) > 0:
        gathered += claimer.claim(names, room - len(gathered), key)
        remaining = deadline - time.monotonic()
        if len(gathered) >= room or remaining <= 0:
            break
        time.sleep(min(poll, remaining))
    return gathered
