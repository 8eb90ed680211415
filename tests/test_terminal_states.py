"""Terminal edits never change again, against a real Redis: each of succeeded, failed and canceled refuses every
way back (processing, queued) and every other terminal status, and a late progress write leaves progress and
revision exactly as they were."""

from __future__ import annotations

import pytest
from gateway_support import conn, js, p2p_payload  # noqa: F401  (conn, js: fixtures)

from editserve.contract import EditStatus, ErrorInfo
from service.jobstore import JobStore, edit_key, new_edit_id

TERMINAL = [EditStatus.succeeded, EditStatus.failed, EditStatus.canceled]


def finish(js: JobStore, edit_id: str, status: EditStatus) -> None:
    if status is EditStatus.succeeded:
        js.mark_succeeded(edit_id, results=[], attention_maps=[], run_seconds=1.0)
    elif status is EditStatus.failed:
        js.mark_failed(edit_id, ErrorInfo(type="boom", message="first outcome"))
    else:
        js.mark_canceled(edit_id)


def terminal_edit(js: JobStore, status: EditStatus, *, started: bool = True) -> str:
    edit, created = js.create(p2p_payload(new_edit_id()), webhook=None, idempotency_key=None)
    assert created
    if started:
        assert js.mark_processing(edit.id, batch_id="b1", batch_size=1, worker="w1")
        js.set_progress(edit.id, 3, 10)
    finish(js, edit.id, status)
    assert js.get(edit.id).status is status
    return edit.id


def snapshot(conn, edit_id: str) -> dict[bytes, bytes]:
    """The whole record except its TTL: a refused write must not touch a single field."""
    return conn.hgetall(edit_key(edit_id))


@pytest.mark.parametrize("status", TERMINAL, ids=lambda s: s.value)
@pytest.mark.parametrize("started", [True, False], ids=["after-processing", "from-queued"])
def test_no_way_back_to_processing_or_queued(js, conn, status, started):
    edit_id = terminal_edit(js, status, started=started)
    before = snapshot(conn, edit_id)
    assert js.mark_processing(edit_id, batch_id="b2", batch_size=1, worker="w2") is False
    assert js.mark_requeued(edit_id, "late reaper") is False
    js.reenqueue(edit_id)
    assert snapshot(conn, edit_id) == before
    edit = js.get(edit_id)
    assert edit.status is status and edit.metrics.attempts == (1 if started else 0)
    assert edit.metrics.batch_id == ("b1" if started else None)
    assert js.is_cancel_requested(edit_id) is True  # a worker still holding it stops


@pytest.mark.parametrize("status", TERMINAL, ids=lambda s: s.value)
def test_no_terminal_status_replaces_another(js, conn, status):
    edit_id = terminal_edit(js, status)
    before = snapshot(conn, edit_id)
    for other in TERMINAL:
        finish(js, edit_id, other)
    assert snapshot(conn, edit_id) == before
    edit = js.get(edit_id)
    assert edit.status is status
    assert (edit.error is not None) == (status is EditStatus.failed)


@pytest.mark.parametrize("status", TERMINAL, ids=lambda s: s.value)
def test_a_progress_write_on_a_terminal_edit_changes_nothing(js, conn, status):
    edit_id = terminal_edit(js, status)
    before_edit = js.get(edit_id)
    before = snapshot(conn, edit_id)
    js.set_progress(edit_id, 7, 10)
    js.set_progress(edit_id, 10, 10)
    after = js.get(edit_id)
    assert snapshot(conn, edit_id) == before
    assert after.revision == before_edit.revision
    assert after.progress == before_edit.progress


def test_a_progress_write_on_a_queued_edit_changes_nothing(js, conn):
    edit, _ = js.create(p2p_payload(new_edit_id()), webhook=None, idempotency_key=None)
    before = snapshot(conn, edit.id)
    js.set_progress(edit.id, 2, 10)
    assert snapshot(conn, edit.id) == before and js.get(edit.id).revision == edit.revision


def test_progress_on_a_processing_edit_moves_progress_and_revision(js):
    """The positive case the refusals above are measured against."""
    edit, _ = js.create(p2p_payload(new_edit_id()), webhook=None, idempotency_key=None)
    js.mark_processing(edit.id, batch_id="b", batch_size=1, worker="w")
    started = js.get(edit.id)
    js.set_progress(edit.id, 4, 10)
    moved = js.get(edit.id)
    assert moved.revision == started.revision + 1
    assert (moved.progress.step, moved.progress.total) == (4, 10)
