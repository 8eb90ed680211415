"""``Cancel-After`` (as Replicate's): an edit submitted with a deadline is canceled once it passes.

Why a Redis sorted set swept by the reaper: the deadline must hold across gateway restarts and whichever
worker (if any) holds the edit; the reaper already runs every few seconds under a lock. The entry is removed
before the cancel is asked (``ZREM`` answers 1 to one sweeper only), so a deadline cancels at most once; an
edit that finished first is left alone (``request_cancel`` refuses a finished edit).
"""

from __future__ import annotations

import logging
import re
import time

import redis

from service.keys import CANCEL_AFTER_KEY, edit_key

log = logging.getLogger("editserve.cancel_after")

MAX_HEADER_CHARS = 64
MAX_CANCEL_AFTER_SECONDS = 7 * 24 * 3600.0
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_cancel_after(value: str) -> float:
    """Seconds from ``30``, ``2.5`` or a Go-style duration (``90s``, ``1m30s``, ``500ms``, ``1h``).

    Raises ValueError with a message fit for the client (the gateway names the ``Cancel-After`` field).
    """
    text = value.strip()
    if not text or len(text) > MAX_HEADER_CHARS:
        raise ValueError(f"expected seconds or a duration like 90s or 1m30s (at most {MAX_HEADER_CHARS} "
                         "characters)")
    try:
        seconds = float(text)
    except ValueError:
        parts = list(_GO_PART.finditer(text))
        if not parts or "".join(p.group(0) for p in parts) != text:
            raise ValueError(f"expected seconds or a duration like 90s or 1m30s, got {text[:32]!r}") from None
        seconds = sum(float(p.group(1)) * _UNITS[p.group(2)] for p in parts)
    if not (0 < seconds <= MAX_CANCEL_AFTER_SECONDS):  # also refuses nan and inf
        raise ValueError(f"must be more than 0 and at most {MAX_CANCEL_AFTER_SECONDS:.0f} seconds")
    return seconds


def schedule_cancel(connection: redis.Redis, edit_id: str, seconds: float, now: float | None = None) -> float:
    """Record the deadline (epoch seconds, returned); a later schedule for the same edit replaces it."""
    deadline = (time.time() if now is None else now) + seconds
    connection.zadd(CANCEL_AFTER_KEY, {edit_id: deadline})
    return deadline


def cancel_deadline(connection: redis.Redis, edit_id: str) -> float | None:
    return connection.zscore(CANCEL_AFTER_KEY, edit_id)


def cancel_due(connection: redis.Redis, store, now: float | None = None, batch: int = 500) -> list[str]:
    """Cancel every edit whose deadline has passed (``store`` is the JobStore); return the ids canceled.

    Edits already finished, or gone, are dropped from the set without a change.
    """
    now = time.time() if now is None else now
    canceled = []
    for raw in connection.zrangebyscore(CANCEL_AFTER_KEY, "-inf", now, start=0, num=batch):
        edit_id = raw.decode() if isinstance(raw, bytes) else raw
        if not connection.zrem(CANCEL_AFTER_KEY, edit_id):
            continue  # another sweeper took it
        tenant = connection.hget(edit_key(edit_id), "tenant")
        if tenant is None:
            continue
        try:
            edit = store.request_cancel(edit_id, tenant.decode())
        except Exception as exc:  # noqa: BLE001 — finished already (a conflict) or gone: nothing to cancel
            log.info("cancel-after for %s not applied: %s", edit_id, exc)
            continue
        canceled.append(edit.id)
    if canceled:
        log.warning("canceled after their Cancel-After deadline: %s", canceled)
    return canceled


async def schedule_cancel_async(connection, edit_id: str, seconds: float) -> float:
    """``schedule_cancel`` on an asyncio Redis client (the gateway's request path)."""
    deadline = time.time() + seconds
    await connection.zadd(CANCEL_AFTER_KEY, {edit_id: deadline})
    return deadline
