"""Per-model availability for ``GET /v1/models``: live workers (heartbeats), edits waiting in worker queues and
recent throughput; and the optional refusal of an edit for a model no live worker serves.

Why: an edit for a model no worker serves is still accepted (an autoscaler may scale from zero), so users
need to see, before and after submitting, whether anything is serving the model and how much waits for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import redis

from editserve.contract import ErrorType
from service.config import Settings
from service.errors import ApiError
from service.liveness import live_workers, serves_async
from service.queues import discover, rq_queue_key


def model_availability(connection: redis.Redis, models: Iterable[str]) -> tuple[Counter, Counter]:
    """(live workers, queued edits) per model; held (fair-share) edits are not yet in a worker queue."""
    wanted = list(models)
    queued: Counter = Counter()
    for group in discover(connection, wanted):
        queued[group.model] += sum(connection.llen(rq_queue_key(name)) for name in group.queue_names)
    return live_workers(connection), queued


async def require_live_worker_async(connection, settings: Settings, model: str) -> None:
    """503 ``no_live_worker`` (+ Retry-After) when ``model`` is set to require a live worker and none serves it.

    Off by default: an autoscaler that scales from zero needs the edit queued to see demand."""
    if settings.requires_live_worker(model) and not await serves_async(connection, model):
        raise no_live_worker(settings, model)


def require_live_worker(connection: redis.Redis, settings: Settings, model: str) -> None:
    """:func:`require_live_worker_async` for the thread-pool paths (inversions)."""
    if settings.requires_live_worker(model) and not live_workers(connection).get(model):
        raise no_live_worker(settings, model)


def no_live_worker(settings: Settings, model: str) -> ApiError:
    return ApiError(503, f"no live worker serves model {model!r} now, and it is set to refuse edits then "
                        "(require_live_worker); retry later", type=ErrorType.no_live_worker, field="model",
                   headers={"Retry-After": str(settings.no_worker_retry_after_seconds)})
