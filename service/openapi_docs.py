"""What the OpenAPI document shows beyond the routes' schemas: an example on every request body and the
webhook events (OpenAPI 3.1 ``webhooks``), each with its payload schema and an example.

Why here, built from the contract's models: an example written as a literal drifts from the schema;
these are model instances dumped to JSON, so a renamed or tightened field breaks the build (and
tests/test_openapi_examples.py checks each one against the published schema too).
"""

from __future__ import annotations

import base64
import io
import json
from datetime import UTC, datetime
from typing import Any, get_args

from fastapi import FastAPI
from pydantic import BaseModel

from editserve.contract import (
    CaptionTriplet,
    Dataset,
    DatasetCounts,
    DatasetOutput,
    DatasetProgress,
    DatasetRequest,
    DatasetWebhookEvent,
    Edit,
    EditStatus,
    InversionRequest,
    IP2PEditRequest,
    P2PEditRequest,
    Progress,
    ResultImage,
    RunMetrics,
    WebhookEvent,
    WebhookEventType,
    WebhookSpec,
)
from service.auth import CreateKeyRequest
from service.limits import TenantLimitOverrides

_AT = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
_HOOK = WebhookSpec(url="https://example.com/hooks/editserve",
                    events=[WebhookEventType.started, WebhookEventType.completed])


def _tiny_png_base64() -> str:
    from PIL import Image  # the gateway has Pillow; only the schema build needs this image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def _json(model: BaseModel) -> dict[str, Any]:
    """The example as a client would write it: set fields only."""
    return model.model_dump(mode="json", exclude_unset=True)


def _example(summary: str, value: Any) -> dict[str, Any]:
    return {"summary": summary, "value": value}


def request_examples() -> dict[str, dict[str, dict[str, Any]]]:
    """operationId -> media type -> the OpenAPI ``examples`` of its request body."""
    p2p = P2PEditRequest(kind="p2p", source_prompt="a cat riding a bike", target_prompts=["a dog riding a bike"],
                         edit="replace", negative_prompt="blurry, low quality", scheduler="dpmpp_2m",
                         steps=30, seed=42, output_format="webp", webhook=_HOOK, metadata={"job": "demo-1"})
    reweight = P2PEditRequest(kind="p2p", source_prompt="a cake with decorations",
                              target_prompts=["a cake with decorations"], edit="reweight",
                              reweight={"decorations": -2.0}, attention_maps=True)
    ip2p = IP2PEditRequest(kind="ip2p", instruction="make it snowy", image=_tiny_png_base64(), steps=20,
                           seed=7, negative_prompt="watermark", output_format="png")
    ip2p_file = IP2PEditRequest(kind="ip2p", instruction="turn it into a watercolor painting",
                                image_guidance=1.5, text_guidance=7.5)
    from_inversion = P2PEditRequest(kind="p2p", source_prompt="a photo of an astronaut",
                                    target_prompts=["a photo of a robot"], inversion_id="01j9z8r2b5tq0c4m6d8e9f1g2h",
                                    cross_replace_steps=0.8, self_replace_steps=0.5)
    inversion = InversionRequest(caption="a photo of an astronaut", image=_tiny_png_base64(), method="null-text",
                                 steps=50, resolution=512, webhook=_HOOK)
    inversion_file = InversionRequest(caption="a photo of an astronaut", method="negative-prompt", steps=50)
    seeds = P2PEditRequest(kind="p2p", source_prompt="a cat riding a bicycle", target_prompts=["a dog riding a bicycle"],
                           seeds=[1, 2], preview_every=5, steps=20, attention_maps=True, attention_maps_overlay=True)
    ip2p_url = IP2PEditRequest(kind="ip2p", instruction="make it snowy", image_url="https://images.example.com/cat.png",
                               seed=7, num_outputs=3, output_size="input", output_format="webp")
    dataset = DatasetRequest(
        triplets=[CaptionTriplet(input="a photo of a cat", instruction="make it a dog", output="a photo of a dog")],
        samples_per_triplet=4, seed=1, webhook=_HOOK)
    return {
        "createEdit": {
            "application/json": {
                "p2p": _example("Prompt-to-Prompt: replace a word, webp output, a webhook", _json(p2p)),
                "p2p_reweight": _example("Prompt-to-Prompt: weaken a word, with attention maps", _json(reweight)),
                "ip2p": _example("InstructPix2Pix with the image inline (base64)", _json(ip2p)),
                "p2p_seeds": _example("Prompt-to-Prompt: two seeds (a source and its targets each), previews every 5 "
                                      "steps, attention maps overlaid on the images", _json(seeds)),
                "ip2p_url": _example("InstructPix2Pix: an https image the gateway fetches, three seeds, outputs back "
                                     "at the input's size", _json(ip2p_url)),
                "p2p_photo": _example("Prompt-to-Prompt on a real photo: start from a succeeded inversion",
                                      _json(from_inversion)),
            },
            "multipart/form-data": {
                "ip2p_file": _example("InstructPix2Pix with the image as a file part (`image`)",
                                      {"request": json.dumps(_json(ip2p_file)), "image": "<binary PNG/JPEG/WebP>"}),
            },
        },
        "createInversion": {
            "application/json": {
                "null_text": _example("Null-text inversion of a photo sent inline (base64)", _json(inversion)),
            },
            "multipart/form-data": {
                "negative_prompt": _example("Negative-prompt inversion, the photo as a file part (`image`)",
                                            {"request": json.dumps(_json(inversion_file)),
                                             "image": "<binary PNG/JPEG/WebP>"}),
            },
        },
        "createDataset": {"application/json": {
            "inline": _example("Caption triplets inline", _json(dataset)),
            "from_s3": _example("Caption triplets from a JSONL object already in the bucket",
                                _json(DatasetRequest(triplets_key="datasets/captions.jsonl", samples_per_triplet=2))),
        }},
        "createKey": {"application/json": {
            "key": _example("A key for tenant acme", _json(CreateKeyRequest(tenant="acme", label="ci pipeline"))),
        }},
        "setTenantLimits": {"application/json": {
            "limits": _example("Raise acme's rate, cap its queue; null keeps a default",
                               _json(TenantLimitOverrides(rps=50, burst=200, max_queued=1000, max_concurrent=None))),
        }},
    }


def _edit(status: EditStatus, **fields: Any) -> Edit:
    return Edit(id="ed_01J9Z8Q4K7M2", kind="p2p", model="sd14", status=status, created_at=_AT,
                params={"source_prompt": "a cat riding a bike", "target_prompts": ["a dog riding a bike"],
                        "steps": 30, "scheduler": "dpmpp_2m", "seed": 42},
                metadata={"job": "demo-1"}, **fields)


def _dataset(status: EditStatus, done: int, **fields: Any) -> Dataset:
    return Dataset(id="ds_01J9Z8R2B5T", status=status, model="ip2p", created_at=_AT, started_at=_AT,
                   progress=DatasetProgress(done=done, total=10), params={"samples_per_triplet": 4, "seed": 1},
                   **fields)


def webhook_payloads() -> dict[str, BaseModel]:
    """Every event type the emitters send (``service.webhooks.emit``), with an example payload."""
    result = ResultImage(index=0, label="a dog riding a bike", expires_at=_AT, width=512, height=512, seed=42,
                         url="https://s3.example.com/edits/ed_01J9Z8Q4K7M2/0.webp")
    edits = {
        WebhookEventType.started: _edit(EditStatus.processing, started_at=_AT, progress=Progress(step=0, total=30)),
        WebhookEventType.progress: _edit(EditStatus.processing, started_at=_AT, progress=Progress(step=12, total=30),
                                         eta_seconds=3.1),
        WebhookEventType.completed: _edit(EditStatus.succeeded, started_at=_AT, completed_at=_AT,
                                          progress=Progress(step=30, total=30), results=[result],
                                          metrics=RunMetrics(queue_wait_seconds=0.4, run_seconds=5.2, attempts=1)),
    }
    datasets = {
        WebhookEventType.started: _dataset(EditStatus.processing, 0),
        WebhookEventType.progress: _dataset(EditStatus.processing, 4, counts=DatasetCounts(samples=16, kept=9)),
        WebhookEventType.completed: _dataset(
            EditStatus.succeeded, 10, completed_at=_AT,
            counts=DatasetCounts(samples=40, kept=23, triplets_with_pairs=9),
            output=DatasetOutput(prefix="datasets/ds_01J9Z8R2B5T/", manifest_url="https://s3.example.com/m.json",
                                 metadata_url="https://s3.example.com/meta.jsonl", shard_urls=[], expires_at=_AT)),
    }
    out: dict[str, BaseModel] = {}
    for event in WebhookEventType:
        out[f"edit.{event.value}"] = WebhookEvent(type=f"edit.{event.value}", timestamp=_AT, data=edits[event])
        out[f"dataset.{event.value}"] = DatasetWebhookEvent(type=f"dataset.{event.value}", timestamp=_AT,
                                                            data=datasets[event])
    return out


def event_types() -> set[str]:
    """The ``type`` values the payload models allow: what the webhooks section must list."""
    return {*get_args(WebhookEvent.model_fields["type"].annotation),
            *get_args(DatasetWebhookEvent.model_fields["type"].annotation)}


_WHEN = {
    "started": "when a worker starts it (status `processing`)",
    "progress": "as denoising steps finish (throttled; never retried)",
    "completed": "when it ends: `succeeded`, `failed` or `canceled` (see `data.status`)",
}

_SIGNATURE = ("Signed as Standard Webhooks: headers `webhook-id`, `webhook-timestamp` and `webhook-signature` "
              "(`v1,<base64 HMAC-SHA256 of id.timestamp.body>` with the tenant's `whsec_` secret); "
              "verify with `editserve.webhooks.verify` or the TypeScript `@editserve/client/webhooks`. "
              "Answer 2xx to acknowledge; other answers are retried with backoff (`Retry-After` honoured).")


def install_webhooks(app: FastAPI) -> None:
    """One ``webhooks`` entry per event type, its body the payload model (``WebhookEvent`` for edits,
    ``DatasetWebhookEvent`` for dataset jobs)."""
    payloads = webhook_payloads()
    for name in sorted(payloads):
        resource, event = name.split(".")
        model = type(payloads[name])

        def receiver(body) -> None:  # documentation only: never served
            """Sent to the request's `webhook.url`."""

        receiver.__annotations__ = {"body": model, "return": None}

        what = "an edit" if resource == "edit" else "a dataset job"
        app.webhooks.add_api_route(
            name, receiver, methods=["POST"], summary=f"{name}: {what} {event}",
            description=f"Sent for {what} {_WHEN[event]}, if its `webhook.events` include `{event}`. {_SIGNATURE}",
            operation_id=f"{resource}{event.capitalize()}Webhook", status_code=200,
            responses={200: {"description": "Received (any 2xx)"}},
            openapi_extra={"requestBody": {"content": {"application/json": {
                "examples": {event: _example(f"{name} payload", payloads[name].model_dump(mode="json"))}}}}})


def tidy_webhooks(schema: dict[str, Any]) -> None:
    """A receiver answers 2xx, nothing else is documented (FastAPI adds a 422 and an empty JSON body)."""
    for operations in schema.get("webhooks", {}).values():
        for operation in operations.values():
            operation["responses"] = {"2XX": {"description": "Received; any other answer is retried"}}


def add_request_examples(schema: dict[str, Any]) -> None:
    """Put each operation's examples on its request body (FastAPI's schema has none)."""
    examples = request_examples()
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            body = operation.get("requestBody") if isinstance(operation, dict) else None
            wanted = examples.get(operation.get("operationId", "")) if body else None
            for media_type, content in (body or {}).get("content", {}).items():
                if wanted and media_type in wanted:
                    content["examples"] = wanted[media_type]
