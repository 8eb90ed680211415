"""HTTP routes of inversions (issue 11): ``POST /v1/inversions``, ``GET /v1/inversions[/{id}]``, ``POST .../cancel``.

Why an inversion is an edit-like record (kind ``inversion``) in the edits' ``JobStore``: it is a queued job
with statuses, progress, cancel, retries after a crash, retention and webhooks exactly like an edit, so it
reuses all of them; only its request, its worker branch and its API view (``EditView.render_inversion``) are
its own. Its queue is its model's edit queue; its batch tag keeps it apart from edits (inversions batch with
inversions of the same model, size and steps).

The body is read like ``POST /v1/edits`` (``service.intake``): JSON with a base64 ``image``, or multipart with a
``request`` JSON part and an ``image`` file part. Everything is checked before anything is stored (4xx naming
the field); the photo is centre-cropped to a square of ``resolution`` (capped by the model) here, so the worker
and S3 only ever see that square. An equal request (same model, photo bytes, caption, method, steps, guidance,
size) whose inversion already succeeded is answered with it (``reused: true``, 200) instead of a new job.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from editserve.contract import (
    API_VERSION,
    BatchKey,
    EditStatus,
    ErrorType,
    Inversion,
    InversionList,
    InversionRequest,
    JobPayload,
)
from editserve.kinds import edit_kind
from service.availability import require_live_worker
from service.edit_validation import check_webhook, forbidden_prompt_character, text2image_spec
from service.errors import ApiError, from_pydantic, invalid, not_found
from service.imaging import square_photo
from service.intake import (
    blame_image_url,
    fetch_image_input,
    load_image,
    max_body_bytes,
    parse_edit_body,
    png_bytes,
    probe_image,
    read_body_limited,
)
from service.inversion_cache import find_inversion, forget_inversion, inversion_digest
from service.jobstore import EditConflict, EditNotFound, new_edit_id
from service.storage import StorageError, input_key

router = APIRouter(prefix=f"/{API_VERSION}", tags=["inversions"])

_REQUEST = TypeAdapter(InversionRequest)
_SCHEMA = InversionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
INVERSION_REQUEST_DEFS = {**_SCHEMA.pop("$defs", {}), "InversionRequest": _SCHEMA}
"""The request models for the OpenAPI components (the route reads its body itself, size-capped)."""
INVERSION_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/InversionRequest"}},
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["request", "image"],
        "properties": {"request": {"type": "string", "description": "the InversionRequest as JSON"},
                       "image": {"type": "string", "format": "binary", "description": "the photo"}}}},
}}}
SIZE_MULTIPLE = 64


def tenant_dependency(request: Request) -> str:
    """The gateway's tenant dependency (rate-limited), handed in by the app factory: this router never imports it."""
    return request.app.state.current_tenant(request)


def parse_inversion_request(data: dict) -> InversionRequest:
    """Strictly typed, as edits are (``"steps": "2"`` is refused, never coerced)."""
    try:
        return _REQUEST.validate_json(json.dumps(data), strict=True)
    except ValidationError as exc:
        raise from_pydantic(exc) from None


def resolve(svc, request: InversionRequest) -> dict:
    """Model (a text2image one), steps, size; the caption's characters and CLIP tokens; the webhook."""
    settings = svc.settings
    spec = text2image_spec(settings, request.model, "invert photos")
    name = spec.name
    if request.resolution % SIZE_MULTIPLE:
        raise invalid("resolution", f"resolution must be a multiple of {SIZE_MULTIPLE}, got {request.resolution}")
    ch = forbidden_prompt_character(request.caption)
    if ch is not None:
        raise invalid("caption", f"caption contains the control or invisible character U+{ord(ch):04X}")
    count = svc.tokens.count(spec, request.caption)
    if count.tokens > settings.limits.max_prompt_tokens:
        raise invalid("caption", f"caption has {count.tokens} CLIP tokens including start/end; the limit is "
                                 f"{settings.limits.max_prompt_tokens}")
    check_webhook(request.webhook, settings)
    return {"model": spec.name, "steps": request.steps or edit_kind("inversion").default_steps,
            "size": min(request.resolution, spec.max_size)}


def reusable(svc, tenant: str, digest: str) -> Inversion | None:
    """The tenant's succeeded inversion with this key, or None (a stale cache entry is dropped)."""
    found = find_inversion(svc.redis, tenant, digest)
    if found is None:
        return None
    inversion = svc.jobstore.view.get_inversion(found, tenant)
    if inversion is None or inversion.status is not EditStatus.succeeded:
        forget_inversion(svc.redis, tenant, digest)
        return None
    return inversion


def create(svc, request: InversionRequest, image_bytes: bytes | None, tenant: str,
           idempotency_key: str | None) -> tuple[Inversion, bool]:
    """Validate, normalise the photo, store it, create the job. Returns (inversion, created)."""
    if image_bytes is None:
        raise invalid("image", "an inversion needs the photo: a multipart `image` part, a base64 `image` or an "
                               "https `image_url`")
    resolved = resolve(svc, request)
    image_sha256 = hashlib.sha256(image_bytes).hexdigest()
    digest = inversion_digest(model=resolved["model"], image_sha256=image_sha256, caption=request.caption,
                              method=request.method, steps=resolved["steps"], guidance_scale=request.guidance_scale,
                              scheduler="ddim", size=resolved["size"])
    fingerprint = hashlib.sha256((request.model_dump_json(exclude={"image"}) + "|" + image_sha256).encode()).hexdigest()
    store = svc.jobstore
    if idempotency_key:
        existing = store.find_idempotent(tenant, idempotency_key, fingerprint)
        if existing is not None:
            return store.view.get_inversion(existing.id, tenant), False
    cached = reusable(svc, tenant, digest)
    if cached is not None:
        return cached.model_copy(update={"reused": True}), False
    require_live_worker(svc.redis, svc.settings, resolved["model"])  # a reused result needs no worker
    probe_image(image_bytes, svc.settings.limits)

    def normalise() -> bytes:
        return png_bytes(square_photo(load_image(image_bytes, svc.settings.limits), resolved["size"]))

    photo_png = svc.decode_gate.run(normalise) if svc.decode_gate else normalise()
    inversion_id = new_edit_id()
    size = resolved["size"]
    payload = JobPayload(
        id=inversion_id, tenant=tenant,
        request=request.model_copy(update={"model": resolved["model"], "steps": resolved["steps"], "resolution": size,
                                           "image": None}),
        batch_key=BatchKey(model=resolved["model"], kind="inversion", height=size, width=size,
                           steps=resolved["steps"], scheduler="ddim"),
        seeds=[], input_image_key=input_key(inversion_id), inversion_digest=digest, created_at=datetime.now(UTC))
    store.accounting.precheck(tenant)  # before the upload; JobStore.create decides atomically
    svc.storage.put_bytes(payload.input_image_key, photo_png, "image/png")
    edit, created = store.create(payload, webhook=request.webhook, idempotency_key=idempotency_key,
                                 fingerprint=fingerprint)
    if not created:  # lost a concurrent duplicate race: drop our upload
        try:
            svc.storage.delete(payload.input_image_key)
        except StorageError:
            pass
    return store.view.get_inversion(edit.id, tenant), created


def inversion_response(inversion: Inversion, status: int, **headers: str) -> Response:
    return Response(inversion.model_dump_json(), status_code=status, media_type="application/json",
                    headers={"Location": f"/{API_VERSION}/inversions/{inversion.id}", **headers})


@router.post("/inversions", status_code=202, response_model=Inversion, openapi_extra=INVERSION_REQUEST_BODY,
             summary="Invert a photo and its caption for P2P edits (JSON with base64 image, or multipart)",
             responses={200: {"model": Inversion, "description": "An equal finished inversion reused, or a replay"}})
async def create_inversion(
    request: Request,
    tenant: str = Depends(tenant_dependency),
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=255,
                                         description="same key + same body → the same inversion, run once"),
) -> Response:
    svc = request.app.state.services
    limits = svc.settings.limits
    body = await read_body_limited(request, max_body_bytes(limits))
    parsed = await parse_edit_body(request, body, limits)
    inversion_request = parse_inversion_request(parsed.data)
    await fetch_image_input(parsed, inversion_request.image_url, svc.settings.image_urls, limits)
    try:
        inversion, created = await run_in_threadpool(create, svc, inversion_request, parsed.image_bytes, tenant,
                                                     idempotency_key)
    except ApiError as exc:
        raise blame_image_url(parsed, exc)
    headers = {} if created or inversion.reused else {"Idempotent-Replayed": "true"}
    return inversion_response(inversion, 202 if created else 200, **headers)


@router.get("/inversions/{inversion_id}", response_model=Inversion,
            summary="An inversion: status, progress (steps and inner iterations), result URLs")
def get_inversion(inversion_id: str, request: Request, tenant: str = Depends(tenant_dependency)) -> Inversion:
    inversion = request.app.state.services.jobstore.view.get_inversion(inversion_id, tenant)
    if inversion is None:
        raise not_found(f"inversion {inversion_id}")
    return inversion


@router.get("/inversions", response_model=InversionList, summary="The caller's inversions, newest first")
def list_inversions(
    request: Request,
    tenant: str = Depends(tenant_dependency),
    status: EditStatus | None = None,
    limit: int = Query(20, ge=1, le=100),
    cursor: str | None = Query(None, max_length=200, description="next_cursor of the previous page"),
) -> InversionList:
    try:
        return request.app.state.services.jobstore.view.list_inversions(
            tenant, status=status.value if status else None, limit=limit, cursor=cursor)
    except ValueError as exc:
        raise ApiError(422, str(exc), type=ErrorType.invalid_request, field="cursor") from None


@router.post("/inversions/{inversion_id}/cancel", response_model=Inversion,
             summary="Cancel: queued → canceled now; processing → stopped at its next step")
def cancel_inversion(inversion_id: str, request: Request, tenant: str = Depends(tenant_dependency)) -> Inversion:
    store = request.app.state.services.jobstore
    if store.view.get_inversion(inversion_id, tenant) is None:
        raise not_found(f"inversion {inversion_id}")
    try:
        store.request_cancel(inversion_id, tenant)
    except EditNotFound:
        raise not_found(f"inversion {inversion_id}") from None
    except EditConflict as exc:
        raise ApiError(409, str(exc).replace("edit ", "inversion ", 1), type=ErrorType.conflict) from None
    return store.view.get_inversion(inversion_id, tenant)
