"""HTTP routes of dataset jobs: ``POST /v1/datasets``, ``GET /v1/datasets/{id}``, ``POST .../cancel``.

Validation happens here, before anything is stored: the model must generate images (P2P), every caption
must fit the model's 77 CLIP tokens, the webhook URL must pass the egress rules, and the job must fit the
tenant's size limits (triplets, triplets × samples, active jobs). A ``triplets_key`` object is read from the
bucket (size-capped) and validated line by line; both sources are stored as one normalised JSONL object.
"""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool
from pydantic import ValidationError

from editserve.contract import API_VERSION, CaptionTriplet, Dataset, DatasetRequest, ErrorType
from editserve.kinds import edit_kind
from service.datasets import DatasetConflict, DatasetNotFound, DatasetStore, parse_triplets_jsonl, triplets_jsonl
from service.datasets import triplets_object as triplets_object_key
from service.edit_validation import check_webhook, forbidden_prompt_character, random_seed, text2image_spec
from service.errors import ApiError, from_pydantic, invalid, not_found
from service.intake import max_body_bytes, parse_json_object, read_body_limited
from service.jobstore import new_edit_id
from service.storage import StorageError
from service.webhooks.emit import emit_dataset as emit_dataset_webhook

router = APIRouter(prefix=f"/{API_VERSION}", tags=["datasets"])

_SCHEMA = DatasetRequest.model_json_schema(ref_template="#/components/schemas/{model}")
DATASET_REQUEST_DEFS = {**_SCHEMA.pop("$defs", {}), "DatasetRequest": _SCHEMA}
"""The request models for the OpenAPI components (the route reads its body itself, size-capped)."""
DATASET_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/DatasetRequest"}}}}}


def dataset_store(request: Request) -> DatasetStore:
    svc = request.app.state.services
    store = getattr(svc, "_datasets", None)
    if store is None:
        store = DatasetStore(svc.redis, svc.settings, svc.storage, listeners=[partial(emit_dataset_webhook, settings=svc.settings)])
        svc._datasets = store  # type: ignore[attr-defined]
    return store


def tenant_dependency(request: Request) -> str:
    """The gateway's tenant dependency, handed in by the app factory (``app.state.current_tenant``): this router
    sits below the app and never imports it."""
    return request.app.state.current_tenant(request)


def resolve(svc, request: DatasetRequest) -> dict:
    """The parameters actually used: model (a text2image one), size, steps, scheduler, seed."""
    settings = svc.settings
    spec = text2image_spec(settings, request.model, "generate P2P pairs")
    name = spec.name
    for field in ("height", "width"):
        value = getattr(request, field)
        if value is not None and value > spec.max_size:
            raise invalid(field, f"{field} {value} is above model {name!r}'s maximum of {spec.max_size}")
    return {
        "model": name, "steps": request.steps or edit_kind("p2p").default_steps, "scheduler": spec.scheduler,
        "height": request.height or spec.default_size, "width": request.width or spec.default_size,
        "seed": request.seed if request.seed is not None else random_seed(),
        "samples_per_triplet": request.samples_per_triplet, "p2p_fraction": list(request.p2p_fraction),
        "guidance": list(request.guidance), "thresholds": request.thresholds.model_dump(),
        "keep_best": request.keep_best, "self_replace_layers": request.self_replace_layers,
    }


def load_triplets(svc, request: DatasetRequest) -> list[CaptionTriplet]:
    if request.triplets is not None:
        return list(request.triplets)
    limit = svc.settings.datasets.max_triplets_object_bytes
    key = request.triplets_key
    try:
        head = svc.storage.client.head_object(Bucket=svc.storage.bucket, Key=key)
    except Exception:  # noqa: BLE001 — botocore's ClientError for a 404, or the endpoint down
        raise invalid("triplets_key", f"no object {key!r} in the bucket") from None
    if int(head.get("ContentLength", 0)) > limit:
        raise ApiError(413, f"triplets_key: the object is {head['ContentLength']} bytes; the limit is {limit}",
                       field="triplets_key")
    try:
        data = svc.storage.get_bytes(key)
    except StorageError as exc:
        raise invalid("triplets_key", f"could not read {key!r}: {exc}") from None
    try:
        return parse_triplets_jsonl(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid("triplets_key", str(exc)) from None


def check_triplets(svc, triplets: list[CaptionTriplet], params: dict, source: str) -> None:
    settings = svc.settings
    limits = settings.datasets
    if len(triplets) > limits.max_triplets:
        raise ApiError(413, f"{source}: {len(triplets)} triplets; the limit per dataset is {limits.max_triplets}",
                       field=source)
    samples = len(triplets) * params["samples_per_triplet"]
    if samples > limits.max_samples:
        raise ApiError(413, f"samples_per_triplet: {len(triplets)} triplets × {params['samples_per_triplet']} "
                            f"samples = {samples}; the limit per dataset is {limits.max_samples}",
                       field="samples_per_triplet")
    spec = settings.model_catalog()[params["model"]]
    max_tokens = settings.limits.max_prompt_tokens
    for index, triplet in enumerate(triplets):
        for name in ("input", "output"):
            text = getattr(triplet, name)
            field = f"{source}.{index}.{name}"
            if forbidden_prompt_character(text) is not None:
                raise invalid(field, f"{field} contains a control character; captions must be plain text")
            count = svc.tokens.count(spec, text)
            if count.tokens > max_tokens:
                raise invalid(field, f"{field} has {count.tokens} CLIP tokens; the limit is {max_tokens}")


@router.post("/datasets", status_code=202, response_model=Dataset, openapi_extra=DATASET_REQUEST_BODY,
             summary="Start a dataset job (IP2P data engine: P2P pairs from caption triplets, CLIP-filtered)")
async def create_dataset(request: Request, tenant: str = Depends(tenant_dependency)) -> Response:
    svc = request.app.state.services
    body = await read_body_limited(request, max_body_bytes(svc.settings.limits))
    data = parse_json_object(body)  # the edit route's checks: 400 malformed_json, size-bounded containers
    try:
        dataset_request = DatasetRequest.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic(exc) from None
    dataset = await run_in_threadpool(_create, svc, dataset_store(request), dataset_request, tenant)
    return Response(dataset.model_dump_json(), status_code=202, media_type="application/json",
                    headers={"Location": f"/{API_VERSION}/datasets/{dataset.id}"})


def _create(svc, store: DatasetStore, request: DatasetRequest, tenant: str) -> Dataset:
    check_webhook(request.webhook, svc.settings)
    params = resolve(svc, request)
    limits = svc.settings.datasets
    active = store.active_count(tenant)
    if active >= limits.max_active_per_tenant:
        raise ApiError(429, f"tenant {tenant!r} has {active} dataset jobs queued or running; the limit is "
                            f"{limits.max_active_per_tenant}", type=ErrorType.tenant_dataset_limit)
    triplets = load_triplets(svc, request)
    check_triplets(svc, triplets, params, "triplets" if request.triplets is not None else "triplets_key")
    dataset_id = new_edit_id()
    params["triplets"] = len(triplets)
    svc.storage.put_bytes(triplets_object_key(dataset_id), triplets_jsonl(triplets), "application/jsonl")
    return store.create(dataset_id, tenant, request, params, len(triplets))


@router.get("/datasets/{dataset_id}", response_model=Dataset, summary="A dataset job: status, progress, output")
def get_dataset(dataset_id: str, request: Request, tenant: str = Depends(tenant_dependency)) -> Dataset:
    dataset = dataset_store(request).get(dataset_id, tenant)
    if dataset is None:
        raise not_found(f"dataset {dataset_id}")
    return dataset


@router.post("/datasets/{dataset_id}/cancel", response_model=Dataset, summary="Cancel a dataset job")
def cancel_dataset(dataset_id: str, request: Request, tenant: str = Depends(tenant_dependency)) -> Dataset:
    try:
        return dataset_store(request).request_cancel(dataset_id, tenant)
    except DatasetNotFound:
        raise not_found(f"dataset {dataset_id}") from None
    except DatasetConflict as exc:
        raise ApiError(409, str(exc), type=ErrorType.conflict) from None

