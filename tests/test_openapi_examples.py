"""The published OpenAPI document (openapi/openapi.json, what SDKs and docs are generated from): every request
body has an example and every example validates against its schema; the ``webhooks`` section describes
every event type the emitters can send, each payload with a validating example."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import jsonschema
from gateway_support import REPO_ROOT, rconn  # noqa: F401  (fixture)
from rq import Queue

from editserve.contract import Dataset, DatasetProgress, Edit, EditStatus, WebhookEventType, WebhookSpec
from service.config import Settings
from service.webhooks import emit as emit_module
from service.webhooks.events import QUEUE_NAME

DOC = json.loads((REPO_ROOT / "openapi" / "openapi.json").read_text())


def validator(schema: dict) -> jsonschema.Draft202012Validator:
    """The schema with the document's components beside it, so ``#/components/schemas/...`` resolves."""
    root = {**schema, "components": DOC["components"]}
    return jsonschema.Draft202012Validator(root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def bodies(section: dict):
    for path, operations in section.items():
        for method, operation in operations.items():
            for media_type, content in operation.get("requestBody", {}).get("content", {}).items():
                yield f"{method.upper()} {path} {media_type}", content


def test_every_request_body_has_examples_that_validate_against_its_schema():
    seen = set()
    for where, content in bodies(DOC["paths"]):
        examples = content.get("examples") or {}
        assert examples, f"{where}: no example"
        check = validator(content["schema"])
        for name, example in examples.items():
            errors = [e.message for e in check.iter_errors(example["value"])]
            assert errors == [], f"{where} example {name!r}: {errors}"
        seen.add(where)
    assert {"POST /v1/edits application/json", "POST /v1/edits multipart/form-data",
            "POST /v1/datasets application/json",
            "POST /v1/inversions application/json", "POST /v1/inversions multipart/form-data",
            "POST /v1/admin/keys application/json", "PUT /v1/admin/tenants/{tenant}/limits application/json"} <= seen
    for path in ("/v1/edits", "/v1/inversions"):  # a multipart `request` part is itself the JSON body
        content = DOC["paths"][path]["post"]["requestBody"]["content"]
        check = validator(content["application/json"]["schema"])
        for example in content["multipart/form-data"]["examples"].values():
            assert list(check.iter_errors(json.loads(example["value"]["request"]))) == [], path


def test_an_invalid_example_would_be_caught():
    """The check above can fail: a wrong kind and a missing prompt do not validate."""
    content = DOC["paths"]["/v1/edits"]["post"]["requestBody"]["content"]["application/json"]
    example = dict(content["examples"]["p2p"]["value"])
    assert list(validator(content["schema"]).iter_errors(example)) == []
    del example["source_prompt"]
    assert list(validator(content["schema"]).iter_errors(example)) != []


def emitted_bodies(connection) -> list[dict]:
    """What the emitters really send: ``emit`` and ``emit_dataset`` for every event, on the test Redis; the
    payloads are read back from the deliveries they queued."""
    settings = Settings(_env_file=None)
    spec = WebhookSpec(url="https://example.com/h", events=list(WebhookEventType))
    now = datetime.now(UTC)
    for event in WebhookEventType:
        edit = Edit(id=f"ed_{event.value}", kind="p2p", model="tiny-sd", status=EditStatus.processing,
                    created_at=now, params={}, webhook={"url": spec.url, "events": spec.events})
        emit_module.emit(connection, edit, event, "t", settings=settings)
        dataset = Dataset(id=f"ds_{event.value}", status=EditStatus.processing, model="tiny-ip2p", created_at=now,
                          progress=DatasetProgress(done=0, total=1), params={})
        emit_module.emit_dataset(connection, dataset, "t", spec, event.value, 1, settings=settings)
    jobs = Queue(QUEUE_NAME, connection=connection).jobs
    return [json.loads(job.args[0]["body"]) for job in jobs]


def test_the_webhooks_section_lists_every_event_the_emitters_send_with_valid_payloads(rconn):
    sent = emitted_bodies(rconn)
    types = {body["type"] for body in sent}
    assert types == {f"{r}.{e.value}" for r in ("edit", "dataset") for e in WebhookEventType}
    assert set(DOC["webhooks"]) == types
    for body in sent:  # a real emitted payload validates against its event's documented schema
        content = DOC["webhooks"][body["type"]]["post"]["requestBody"]["content"]["application/json"]
        errors = [e.message for e in validator(content["schema"]).iter_errors(body)]
        assert errors == [], (body["type"], errors)
    for name, operations in DOC["webhooks"].items():
        content = operations["post"]["requestBody"]["content"]["application/json"]
        examples = content["examples"]
        assert examples, name
        for example in examples.values():
            assert example["value"]["type"] == name
            assert list(validator(content["schema"]).iter_errors(example["value"])) == []
