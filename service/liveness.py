"""Which GPU workers are alive, per model: read by ``editserve_live_workers{model}`` and its alert.

Why not RQ's worker registry: our batch worker registers with RQ without queues (it claims from many
queues itself), so RQ cannot tell which models a worker serves. Each worker instead renews one entry per
model it has *loaded* in a sorted set scored by expiry; an entry that is not renewed (the worker died,
hung or lost Redis) stops counting after ``ttl`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable

import redis

from service.keys import LIVE_WORKERS_KEY

log = logging.getLogger(__name__)

_SEP = "|"  # model names never contain it (they name queues and label values)


def _members(worker: str, models: Iterable[str]) -> list[str]:
    return [f"{model}{_SEP}{worker}" for model in models]


def beat(connection: redis.Redis, worker: str, models: Iterable[str], ttl: float) -> None:
    """Mark ``worker`` alive for each of ``models`` until now + ``ttl``."""
    expiry = time.time() + ttl
    connection.zadd(LIVE_WORKERS_KEY, {m: expiry for m in _members(worker, models)})


def leave(connection: redis.Redis, worker: str, models: Iterable[str]) -> None:
    """A clean shutdown stops counting at once instead of after the TTL."""
    members = _members(worker, models)
    if members:
        connection.zrem(LIVE_WORKERS_KEY, *members)


def live_workers(connection: redis.Redis) -> Counter:
    """Live workers per model (expired entries are dropped first, so the set stays small)."""
    now = time.time()
    with connection.pipeline() as pipe:
        pipe.zremrangebyscore(LIVE_WORKERS_KEY, "-inf", now)
        pipe.zrange(LIVE_WORKERS_KEY, 0, -1)
        _, members = pipe.execute()
    return Counter((m.decode() if isinstance(m, bytes) else m).split(_SEP, 1)[0] for m in members)


async def serves_async(connection, model: str) -> bool:
    """Whether a live worker serves ``model`` now, through an asyncio client (the submit path)."""
    prefix = f"{model}{_SEP}".encode()
    members = await connection.zrangebyscore(LIVE_WORKERS_KEY, time.time(), "+inf")
    return any((m if isinstance(m, bytes) else m.encode()).startswith(prefix) for m in members)


class Beacon:
    """A daemon thread that beats every ``ttl / 3`` seconds, independent of how long a batch runs."""

    def __init__(self, connection: redis.Redis, worker: str, models: Iterable[str], ttl: float):
        self.connection, self.worker, self.models, self.ttl = connection, worker, list(models), float(ttl)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness-beacon", daemon=True)

    def start(self) -> None:
        beat(self.connection, self.worker, self.models, self.ttl)  # visible at once, not after one interval
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                beat(self.connection, self.worker, self.models, self.ttl)
            except redis.RedisError as exc:  # Redis blipped: the entry may lapse; the next beat restores it
                log.warning("liveness beat failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        try:
            leave(self.connection, self.worker, self.models)
        except redis.RedisError as exc:
            log.warning("could not withdraw liveness entries (they expire in %.0fs): %s", self.ttl, exc)
