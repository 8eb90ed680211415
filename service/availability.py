"""Per-model availability for ``GET /v1/models``: live workers (heartbeats) and edits waiting in worker queues.

Why: an edit for a model no worker serves is still accepted (an autoscaler may scale from zero), so users
need to see, before and after submitting, whether anything is serving the model and how much waits for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import redis

from service.liveness import live_workers
from service.queues import discover, rq_queue_key


def model_availability(connection: redis.Redis, models: Iterable[str]) -> tuple[Counter, Counter]:
    """(live workers, queued edits) per model; held (fair-share) edits are not yet in a worker queue."""
    wanted = list(models)
    queued: Counter = Counter()
    for group in discover(connection, wanted):
        queued[group.model] += sum(connection.llen(rq_queue_key(name)) for name in group.queue_names)
    return live_workers(connection), queued
