"""Recent throughput per model for ``GET /v1/models``: what the workers finished in the last minutes.

Why per-minute hashes: each finished edit adds to its model's bucket of the current minute (one pipelined
round trip, from the worker that finished it); a reader sums the buckets of the window. Memory is bounded
(about ``throughput_window_seconds / 60 + 1`` small hashes per model) and every bucket expires by itself
(``throughput_ttl``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from service.keys import throughput_key

MAX_WINDOW_SECONDS = 3600
"""The longest window a reader may ask for; buckets live this long (plus one minute)."""


def throughput_ttl(window_seconds: int, stats_ttl_seconds: int) -> int:
    """A bucket lives as long as readers look back, and never longer than the ETA statistics' retention."""
    return max(1, min(int(window_seconds) + 60, int(stats_ttl_seconds)))


@dataclass(frozen=True)
class Throughput:
    window_seconds: float
    edits: int = 0
    images: int = 0
    steps: int = 0

    @property
    def edits_per_minute(self) -> float:
        return round(self.edits * 60 / self.window_seconds, 3)

    @property
    def images_per_minute(self) -> float:
        return round(self.images * 60 / self.window_seconds, 3)

    @property
    def steps_per_second(self) -> float:
        return round(self.steps / self.window_seconds, 3)

    def fields(self) -> dict[str, float]:
        """The figures with their rates (``ModelThroughput``'s fields)."""
        return {"window_seconds": round(self.window_seconds, 1), "edits": self.edits, "images": self.images,
                "steps": self.steps, "edits_per_minute": self.edits_per_minute,
                "images_per_minute": self.images_per_minute, "steps_per_second": self.steps_per_second}


def record(connection: redis.Redis, model: str, *, images: int, steps: int, ttl: int = MAX_WINDOW_SECONDS + 60,
           now: float | None = None) -> None:
    """Count one finished edit (``images`` result images, ``steps`` denoising steps) for ``model``; its minute's
    bucket lives ``ttl`` seconds after the last count (the readers' window and a minute)."""
    key = throughput_key(model, int((time.time() if now is None else now) // 60))
    with connection.pipeline(transaction=True) as pipe:
        pipe.hincrby(key, "edits", 1)
        pipe.hincrby(key, "images", int(images))
        pipe.hincrby(key, "steps", int(steps))
        pipe.expire(key, max(1, int(ttl)))
        pipe.execute()


def recent(connection: redis.Redis, models: Iterable[str], window_seconds: int,
           now: float | None = None) -> dict[str, Throughput]:
    """Each model's work over the last ``window_seconds`` (whole minutes: the current one so far and those
    before it); rates divide by the time the buckets actually cover."""
    now = time.time() if now is None else now
    minutes = max(1, min(int(window_seconds), MAX_WINDOW_SECONDS) // 60)
    current = int(now // 60)
    first = current - minutes + 1
    covered = max(1.0, now - first * 60)
    wanted = list(models)
    pipe = connection.pipeline(transaction=False)
    for model in wanted:
        for minute in range(first, current + 1):
            pipe.hmget(throughput_key(model, minute), "edits", "images", "steps")
    rows = iter(pipe.execute())
    out = {}
    for model in wanted:
        totals = [0, 0, 0]
        for _ in range(minutes):
            for i, value in enumerate(next(rows)):
                totals[i] += int(value or 0)
        out[model] = Throughput(covered, *totals)
    return out
