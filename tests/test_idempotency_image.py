"""Idempotency-Key replays are keyed on the input image too: the same JSON with another image is a different
request (409), the same image a replay, on both submit paths (JSON with a base64 image, and multipart)."""

from __future__ import annotations

import base64
import json

import pytest
from fastapi.testclient import TestClient
from gateway_support import edit_queue_lengths, gateway_app, gateway_settings, png, rconn  # noqa: F401

REQUEST = {"kind": "ip2p", "instruction": "make it snowy", "steps": 2, "seed": 3}
RED, BLUE = png(96, 64, (200, 30, 30)), png(96, 64, (30, 30, 200))


def as_json(image: bytes) -> dict:
    return {"json": {**REQUEST, "image": base64.b64encode(image).decode()}}


def as_multipart(image: bytes) -> dict:
    return {"data": {"request": json.dumps(REQUEST)}, "files": {"image": ("in.png", image, "image/png")}}


@pytest.mark.parametrize("body", [as_json, as_multipart], ids=["json", "multipart"])
def test_same_request_with_another_image_is_a_conflict(gateway_app, rconn, body):
    client = TestClient(gateway_app)
    headers = {"Idempotency-Key": f"img-{body.__name__}"}
    first = client.post("/v1/edits", headers=headers, **body(RED))
    assert first.status_code == 202, first.text
    replay = client.post("/v1/edits", headers=headers, **body(RED))
    assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]
    assert replay.headers["idempotent-replayed"] == "true"
    conflict = client.post("/v1/edits", headers=headers, **body(BLUE))
    assert conflict.status_code == 409, conflict.text
    error = conflict.json()["error"]
    assert error["type"] == "idempotency_conflict" and "different request body" in error["message"]
    assert edit_queue_lengths(rconn) == 1


def test_the_json_and_multipart_forms_of_one_request_are_the_same_request(gateway_app, rconn):
    client = TestClient(gateway_app)
    headers = {"Idempotency-Key": "both-forms"}
    first = client.post("/v1/edits", headers=headers, **as_json(RED))
    second = client.post("/v1/edits", headers=headers, **as_multipart(RED))
    assert first.status_code == second.status_code == 202, second.text
    assert first.json()["id"] == second.json()["id"]
    assert edit_queue_lengths(rconn) == 1
