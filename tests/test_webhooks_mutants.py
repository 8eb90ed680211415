"""editserve.webhooks.verify picks the event model by ``type``: ``dataset.*`` bodies parse as dataset events, and
any other signed body that is no event (not an object, a non-string type) is a verification error, never a crash
in the receiver (found by mutation testing, bench/mutation.py)."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone

import pytest

from editserve.contract import Dataset, DatasetProgress, DatasetWebhookEvent, EditStatus
from editserve.webhooks import WebhookVerificationError, sign, verify

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
T0 = 1_700_000_000


def dataset_body(kind: str = "dataset.completed") -> bytes:
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    data = Dataset(id="ds_1", status=EditStatus.succeeded, model="tiny-sd", created_at=when,
                   progress=DatasetProgress(done=2, total=2), params={})
    return json.dumps({"type": kind, "timestamp": when.isoformat(), "data": data.model_dump(mode="json")}).encode()


def verified(body: bytes | str):
    return verify(SECRET, sign(SECRET, "msg_1", T0, body), body, now=T0)


@pytest.mark.parametrize("kind", ["dataset.started", "dataset.progress", "dataset.completed"])
def test_dataset_events_parse_as_dataset_events(kind):
    event = verified(dataset_body(kind))
    assert isinstance(event, DatasetWebhookEvent) and event.type == kind and event.data.id == "ds_1"


def test_a_dataset_event_with_leading_whitespace_or_as_text_is_still_one():
    assert isinstance(verified(b"\n  " + dataset_body()), DatasetWebhookEvent)
    assert isinstance(verified(dataset_body().decode()), DatasetWebhookEvent)


@pytest.mark.parametrize("body", [b"[1, 2]", b'"dataset.completed"', b"42", b'{"type": 5, "data": {}}',
                                  b'{"type": "dataset.deleted", "data": {}}', b"{not json"])
def test_signed_bodies_that_are_no_event_are_refused_not_crashed_on(body):
    with pytest.raises(WebhookVerificationError) as err:
        verified(body)
    assert str(err.value).startswith("signed body is not a webhook event: ")

