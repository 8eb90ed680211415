"""Following one edit's changes over Redis pub/sub: ``Prefer: wait`` and the SSE stream.

Why subscribe before reading: a change published between "read current state" and "subscribe" would be
lost. We subscribe first, then read, and drop any message whose ``revision`` is not newer than what was
already sent, so clients see each state once and in order.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis
from starlette.concurrency import run_in_threadpool

from editserve.contract import TERMINAL_STATUSES as _TERMINAL
from editserve.contract import Edit
from service.jobstore import JobStore
from service.keys import events_channel

log = logging.getLogger(__name__)

TERMINAL_STATUSES = frozenset(s.value for s in _TERMINAL)


def _status_of(data: bytes | str) -> str | None:
    try:
        return json.loads(data).get("status")
    except (ValueError, AttributeError):
        return None


def parse_prefer(values: list[str]) -> dict[str, str | None]:
    """RFC 7240 ``Prefer`` headers → {preference: value}; parameters after ';' are ignored."""
    prefs: dict[str, str | None] = {}
    for header in values:
        for item in header.split(","):
            token = item.split(";")[0].strip()
            if not token:
                continue
            name, sep, value = token.partition("=")
            prefs.setdefault(name.strip().lower(), value.strip().strip('"') if sep else None)
    return prefs


def wait_seconds(values: list[str], cap: int, default: int | None = None) -> int | None:
    """The ``wait`` preference in seconds, capped; None when absent or malformed (preferences are optional).
    A bare ``Prefer: wait`` (Replicate's form) waits ``default`` seconds (``cap`` when no default is given)."""
    prefs = parse_prefer(values)
    if "wait" not in prefs:
        return None
    raw = prefs["wait"]
    if raw is None or raw == "":
        return min(cap if default is None else default, cap)
    if not raw.isdigit():
        return None
    return min(int(raw), cap)


async def _snapshot(store: JobStore, edit_id: str, tenant: str) -> Edit | None:
    return await run_in_threadpool(store.get, edit_id, tenant)


async def wait_for_terminal(client: aioredis.Redis, store: JobStore, edit_id: str, tenant: str,
                            timeout: float) -> Edit | None:
    """The edit once terminal, or its state after ``timeout`` seconds."""
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(events_channel(edit_id))
        edit = await _snapshot(store, edit_id, tenant)
        deadline = time.monotonic() + timeout
        while edit is not None and not edit.status.terminal:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(remaining, 1.0))
            if message is not None and _status_of(message["data"]) in TERMINAL_STATUSES:
                edit = await _snapshot(store, edit_id, tenant)
        return await _snapshot(store, edit_id, tenant) if edit is not None else None
    finally:
        await pubsub.aclose()


def sse_event(event: str, data: str, event_id: int | None = None) -> str:
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.extend(f"data: {line}" for line in data.splitlines() or [""])
    return "\n".join(lines) + "\n\n"


async def edit_events(client: aioredis.Redis, store: JobStore, edit_id: str, tenant: str, *,
                      keepalive_seconds: float, is_disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
    """SSE frames: the current state, then every newer state; ends after a terminal one.

    Event names: ``status`` when the status (or the cancel flag) changed, ``preview`` when a new preview
    arrived (``data.preview``: step and URL), ``progress`` otherwise.
    Comments (``: keep-alive``) every ``keepalive_seconds`` keep proxies from closing an idle stream.
    """
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(events_channel(edit_id))
        current = await _snapshot(store, edit_id, tenant)
        if current is None:
            return
        yield sse_event("status", current.model_dump_json(), current.revision)
        last_sent = current
        last_frame = time.monotonic()
        while not last_sent.status.terminal:
            if await is_disconnected():
                return
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(keepalive_seconds, 1.0))
            if message is None:
                if time.monotonic() - last_frame >= keepalive_seconds:
                    last_frame = time.monotonic()
                    yield ": keep-alive\n\n"
                continue
            try:
                edit = Edit.model_validate_json(message["data"])
            except ValueError:
                log.warning("ignoring a malformed message on %s", events_channel(edit_id))
                continue
            if edit.revision <= last_sent.revision:
                continue
            changed = edit.status != last_sent.status or edit.cancel_requested != last_sent.cancel_requested
            new_preview = edit.preview is not None and (last_sent.preview is None
                                                        or edit.preview.step != last_sent.preview.step)
            name = "status" if changed else "preview" if new_preview else "progress"
            yield sse_event(name, edit.model_dump_json(), edit.revision)
            last_sent, last_frame = edit, time.monotonic()
    finally:
        await pubsub.aclose()
