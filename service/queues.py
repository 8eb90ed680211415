"""RQ queue naming and discovery: one queue per (priority, model), whatever the requests ask for.

Why not one queue per batch key: every height x width x steps x scheduler x priority a client sent became a
queue kept forever and polled by every worker (one tenant made thousands in seconds, and an idle worker spent
most of a core polling them). The set of queues is now fixed by the model catalog: three priorities per model.
Jobs of different batch keys share their model's queue; each job's hash carries its ``batch_tag`` and the
worker gathers compatible jobs (same tag) out of the queue without pushing anything back
(``worker.runtime.batching``). What "compatible" means is :func:`batch_tag`, defined once here.

Name layout: ``edits.{priority}.{model}`` (older ``edits.{priority}.{model}:{kind}:...`` names still parse,
so jobs queued before an upgrade are served).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis
from rq import Queue

from editserve.contract import BatchKey

PRIORITIES: tuple[str, ...] = ("high", "normal", "low")
"""Served in this order: a worker always looks at higher priorities first."""

QUEUE_PREFIX = "edits."
BATCH_TAG_FIELD = "batch_tag"
"""The field of an RQ job hash that holds its :func:`batch_tag` (read by the worker's claim script)."""
_MODEL_RE = re.compile(r"^(?P<model>[^:]+)(?::.*)?$")


def batch_tag(batch_key: BatchKey) -> str:
    """Jobs with equal tags can share one batch: today the whole batch key (model, kind, size, steps, scheduler)."""
    return batch_key.queue_suffix()


def lane_tag(model: str, kind: str, height: int, width: int) -> str:
    """A claim pattern for step-level batching: every batch tag of this model, kind and size (any steps and
    scheduler share a running batch). Must stay a prefix of :func:`batch_tag` of such keys."""
    return f"{model}:{kind}:{height}x{width}:*"


def rq_queue_key(name: str) -> str:
    """The Redis list RQ keeps a queue's waiting job ids in."""
    return f"{Queue.redis_queue_namespace_prefix}{name}"


def queue_name(batch_key: BatchKey, priority: str = "normal") -> str:
    return model_queue_name(batch_key.model, priority)


def model_queue_name(model: str, priority: str = "normal") -> str:
    """One queue per (priority, model): a worker can name every queue it serves without looking them up."""
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}; choose from {PRIORITIES}")
    return f"{QUEUE_PREFIX}{priority}.{model}"


def parse_queue_name(name: str) -> tuple[str, str] | None:
    """(priority, model) of an edit queue name, or None for any other queue (e.g. ``webhooks``)."""
    if not name.startswith(QUEUE_PREFIX):
        return None
    priority, _, rest = name[len(QUEUE_PREFIX):].partition(".")
    match = _MODEL_RE.match(rest)
    if priority not in PRIORITIES or match is None:
        return None
    return priority, match.group("model")


@dataclass
class QueueGroup:
    """The queues of one model, highest priority first (only those that exist in Redis)."""

    model: str
    queue_names: list[str] = field(default_factory=list)

    @property
    def best_priority(self) -> int:
        return min(PRIORITIES.index(parse_queue_name(n)[0]) for n in self.queue_names)  # type: ignore[index]


def discover(connection: redis.Redis, models: Iterable[str] | None = None) -> list[QueueGroup]:
    """Existing edit queues grouped by model; groups with a higher-priority queue come first.

    ``models`` restricts the result to those models (a worker serves only what it loaded). Queues are
    registered in RQ's ``rq:queues`` set by their first enqueue; there are at most 3 per model.
    """
    wanted = set(models) if models is not None else None
    by_model: dict[str, list[tuple[int, str]]] = {}
    for queue in Queue.all(connection=connection):
        parsed = parse_queue_name(queue.name)
        if parsed is None:
            continue
        priority, model = parsed
        if wanted is not None and model not in wanted:
            continue
        by_model.setdefault(model, []).append((PRIORITIES.index(priority), queue.name))
    groups = [QueueGroup(model, [name for _, name in sorted(entries)]) for model, entries in by_model.items()]
    groups.sort(key=lambda g: (g.best_priority, g.model))
    return groups


def queue_names_by_priority(groups: list[QueueGroup]) -> list[str]:
    """Every queue of ``groups`` flattened high → normal → low (the order a worker blocks on them)."""
    names = [n for g in groups for n in g.queue_names]
    return sorted(names, key=lambda n: (PRIORITIES.index(parse_queue_name(n)[0]), n))  # type: ignore[index]


def same_key_queues_ahead(name: str) -> list[str]:
    """Queue names of the same model with a higher priority than ``name`` (served before it)."""
    parsed = parse_queue_name(name)
    if parsed is None:
        return []
    priority, model = parsed
    return [model_queue_name(model, p) for p in PRIORITIES[: PRIORITIES.index(priority)]]
