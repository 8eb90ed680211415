"""RQ queue naming and discovery: one queue per (priority, batch key).

Why: a worker batches only jobs that can share one UNet call per step. Routing each job to a queue named
by its ``BatchKey`` lets a worker block on one job and then drain more *compatible* jobs from the same
queue without ever pushing anything back (docs/design-notes.md).

Name layout: ``edits.{priority}.{model}:{kind}:{H}x{W}:s{steps}:{scheduler}``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis
from rq import Queue

from editserve.contract import BatchKey
from editserve.kinds import EDIT_KINDS

PRIORITIES: tuple[str, ...] = ("high", "normal", "low")
"""Served in this order: a worker always looks at higher priorities first."""

QUEUE_PREFIX = "edits."
_SUFFIX_RE = re.compile(
    r"^(?P<model>.+):(?P<kind>" + "|".join(map(re.escape, EDIT_KINDS)) + r"):(?P<height>\d+)x(?P<width>\d+)"
    r":s(?P<steps>\d+):(?P<scheduler>[^:]+)$"
)


def rq_queue_key(name: str) -> str:
    """The Redis list RQ keeps a queue's waiting job ids in."""
    return f"{Queue.redis_queue_namespace_prefix}{name}"


def queue_name(batch_key: BatchKey, priority: str = "normal") -> str:
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}; choose from {PRIORITIES}")
    return f"{QUEUE_PREFIX}{priority}.{batch_key.queue_suffix()}"


def parse_queue_name(name: str) -> tuple[str, BatchKey] | None:
    """(priority, batch key) of an edit queue name, or None for any other queue (e.g. ``webhooks``)."""
    if not name.startswith(QUEUE_PREFIX):
        return None
    priority, _, suffix = name[len(QUEUE_PREFIX):].partition(".")
    match = _SUFFIX_RE.match(suffix)
    if priority not in PRIORITIES or match is None:
        return None
    g = match.groupdict()
    key = BatchKey(model=g["model"], kind=g["kind"], height=int(g["height"]), width=int(g["width"]),
                   steps=int(g["steps"]), scheduler=g["scheduler"])
    return priority, key


@dataclass
class QueueGroup:
    """The queues of one batch key, highest priority first (only those that exist in Redis)."""

    batch_key: BatchKey
    queue_names: list[str] = field(default_factory=list)

    @property
    def best_priority(self) -> int:
        return min(PRIORITIES.index(parse_queue_name(n)[0]) for n in self.queue_names)  # type: ignore[index]


def discover(connection: redis.Redis, models: Iterable[str] | None = None) -> list[QueueGroup]:
    """Existing edit queues grouped by batch key; groups with a higher-priority queue come first.

    ``models`` restricts the result to batch keys of those models (a worker serves only what it loaded).
    Queues are registered in RQ's ``rq:queues`` set by their first enqueue and stay there.
    """
    wanted = set(models) if models is not None else None
    by_key: dict[BatchKey, list[tuple[int, str]]] = {}
    for queue in Queue.all(connection=connection):
        parsed = parse_queue_name(queue.name)
        if parsed is None:
            continue
        priority, key = parsed
        if wanted is not None and key.model not in wanted:
            continue
        by_key.setdefault(key, []).append((PRIORITIES.index(priority), queue.name))
    groups = [QueueGroup(key, [name for _, name in sorted(entries)]) for key, entries in by_key.items()]
    groups.sort(key=lambda g: (g.best_priority, g.batch_key.queue_suffix()))
    return groups


def queue_names_by_priority(groups: list[QueueGroup]) -> list[str]:
    """Every queue of ``groups`` flattened high → normal → low (the order a worker blocks on them)."""
    names = [n for g in groups for n in g.queue_names]
    return sorted(names, key=lambda n: (PRIORITIES.index(parse_queue_name(n)[0]), n))  # type: ignore[index]


def same_key_queues_ahead(name: str) -> list[str]:
    """Queue names of the same batch key with a higher priority than ``name`` (served before it)."""
    parsed = parse_queue_name(name)
    if parsed is None:
        return []
    priority, key = parsed
    return [queue_name(key, p) for p in PRIORITIES[: PRIORITIES.index(priority)]]
