"""The HTTP gateway: ``create_app(settings)`` builds the FastAPI app; ``uvicorn service.app:app`` serves it.

Why this shape: routes are small functions that delegate to modules with one job each (intake,
edit_validation, jobstore, streams, auth, storage, metrics), so the gateway stays torch-free and every
rule is testable without HTTP. Blocking work (Pillow, boto3, sync Redis) runs in the thread pool. The hot
path is async: a JSON submit is validated on the event loop and created by one Lua script through an asyncio
Redis client (no thread hop), as is the waiting (``Prefer: wait``, SSE).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import redis
import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response, Security
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from PIL import Image
from pydantic import BaseModel, TypeAdapter
from starlette.concurrency import run_in_threadpool

from editserve.contract import (
    API_VERSION,
    Edit,
    EditList,
    EditRequest,
    EditKind,
    EditStatus,
    ErrorResponse,
    ErrorType,
    ModelInfo,
    ModelThroughput,
    SCHEDULERS,
)
from editserve.kinds import edit_kinds_for_model
from service import metrics, redisconn
from service.webhooks import failed as failed_webhooks
from service.webhooks.emit import emit as emit_webhook
from service.auth import (
    TENANT_RE,
    ApiKeyList,
    CreatedApiKey,
    CreateKeyRequest,
    KeyStore,
    bearer_token,
    constant_time_equal,
)
from service import throughput
from service.availability import model_availability, require_live_worker_async
from service.cancel_after import parse_cancel_after, schedule_cancel_async
from service.config import Settings, get_settings
from service.dataset_routes import DATASET_REQUEST_DEFS
from service.dataset_routes import router as dataset_router
from service.inversion_routes import INVERSION_REQUEST_DEFS
from service.inversion_routes import router as inversion_router
from service.openapi_docs import add_request_examples, install_webhooks, tidy_webhooks
from service.edit_validation import parse_request, prepare_submission, resolve_model
from service.editview import load_record
from service.inversion_cache import usable_inversion
from service.errors import ApiError, error_response, install_error_handlers, invalid, not_found
from service.intake import (
    DecodeGate,
    blame_image_url,
    fetch_image_input,
    max_body_bytes,
    parse_edit_body,
    read_body_limited,
)
from service.jobstore import EditConflict, EditNotFound, IdempotencyConflict, JobStore, new_edit_id
from service.limits import (
    LimitExceeded,
    RateLimiter,
    TenantLimitOverrides,
    TenantLimits,
    tenant_limits,
    write_overrides,
)
from service.playground import install_playground
from service.prompt_tokens import PromptTokenCounter
from service.storage import Storage, StorageError
from service.openapi_ids import operation_id
from service.streams import edit_events, wait_for_terminal, wait_seconds

log = logging.getLogger(__name__)

SSE_KEEPALIVE_SECONDS = 15.0


@dataclass
class Services:
    """Everything a route needs, built once per app (clients connect lazily, so import never blocks)."""

    settings: Settings
    redis: redis.Redis
    storage: Storage
    jobstore: JobStore
    keys: KeyStore
    tokens: PromptTokenCounter
    rate_limiter: RateLimiter
    decode_gate: DecodeGate | None = None
    sse_keepalive_seconds: float = SSE_KEEPALIVE_SECONDS
    _aio: dict[int, tuple[asyncio.AbstractEventLoop, aioredis.Redis]] = field(default_factory=dict, repr=False)

    def async_redis(self) -> aioredis.Redis:
        """A fresh asyncio client per waiting request: pub/sub holds its own connection anyway."""
        return redisconn.async_client(self.settings.redis_url)

    def aio_redis(self) -> aioredis.Redis:
        """The shared asyncio client of the running event loop (a client's pool is bound to the loop it first
        ran on, and test clients run one loop each). The submit path uses it to stay on the event loop.

        Its pool *waits* up to ``redis_pool_wait_seconds`` for a free connection: a burst of concurrent submits
        queues briefly instead of failing at the pool's size (then 503 + Retry-After)."""
        loop = asyncio.get_running_loop()
        entry = self._aio.get(id(loop))
        if entry is None or entry[0] is not loop:
            entry = (loop, redisconn.async_client(
                self.settings.redis_url, pool_size=self.settings.redis_pool_size,
                pool_wait_seconds=self.settings.redis_pool_wait_seconds, socket_timeout=5, socket_connect_timeout=2,
                health_check_interval=30))
            self._aio[id(loop)] = entry
        return entry[1]

    async def close_aio_redis(self) -> None:
        entry = self._aio.pop(id(asyncio.get_running_loop()), None)
        if entry is not None:
            await entry[1].aclose()


def services(request: Request) -> Services:
    return request.app.state.services


# ------------------------------------------------------------------------------------------------ auth

_bearer_scheme = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer esk_...`")


def current_tenant(request: Request, _doc: Any = Security(_bearer_scheme)) -> str:
    """The caller's tenant, after counting this request against its rate limit (429 + Retry-After).

    Without auth.required, anonymous callers act as auth.default_tenant (and share its rate limit).
    """
    svc = services(request)
    tenant = authenticated_tenant(svc, request)
    svc.rate_limiter.check(tenant)
    return tenant


def authenticated_tenant(svc: Services, request: Request) -> str:
    """The tenant the Bearer key belongs to (401 for a missing, malformed, unknown or revoked key)."""
    token = bearer_token(request.headers.get("authorization"))
    return tenant_for_token(svc, token, svc.keys.tenant_for_key(token) if token else None)


async def submitting_tenant(request: Request, _doc: Any = Security(_bearer_scheme)) -> str:
    """The caller's tenant on POST /v1/edits. Its rate is counted by the admission script itself, so a JSON
    submit costs one Redis round trip (two with an API key), all on the event loop."""
    svc = services(request)
    token = bearer_token(request.headers.get("authorization"))
    found = await svc.keys.tenant_for_key_async(svc.aio_redis(), token) if token else None
    return tenant_for_token(svc, token, found)


def tenant_for_token(svc: Services, token: str | None, found: str | None) -> str:
    """401 unless ``token`` (None: no header, '': another scheme) is a live key (``found``: its tenant)."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if token is None:
        if svc.settings.auth.required:
            raise ApiError(401, "an API key is required: send `Authorization: Bearer <key>`", headers=challenge)
        return svc.settings.auth.default_tenant
    if not token:
        raise ApiError(401, "use the Bearer scheme: `Authorization: Bearer <key>`", headers=challenge)
    if found is None:
        raise ApiError(401, "invalid or revoked API key", headers=challenge)
    return found


def require_admin(request: Request, _doc: Any = Security(_bearer_scheme)) -> None:
    admin_token = services(request).settings.auth.admin_token
    if not admin_token:
        raise ApiError(404, "admin endpoints are disabled: no admin token is configured", type=ErrorType.not_found)
    token = bearer_token(request.headers.get("authorization")) or ""
    if not constant_time_equal(token, admin_token):
        raise ApiError(401, "admin token required: `Authorization: Bearer <admin token>`",
                       headers={"WWW-Authenticate": "Bearer"})


# ------------------------------------------------------------------------------------------------ edits

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [(400, "Malformed request"), (401, "Missing or invalid API key"), (404, "Not found"),
                       (409, "Conflict"), (413, "Body or image too large"), (415, "Unsupported media type"),
                       (422, "Invalid request; `error.field` names the input"),
                       (429, "A tenant limit: `rate_limited` or `tenant_queue_full`; see Retry-After"),
                       (503, "`queue_full` (the service's queue limit), `no_live_worker` (a model set to need a "
                        "live worker has none) or a dependency is down; see Retry-After")]
}

_EDIT_REQUEST_SCHEMA = TypeAdapter(EditRequest).json_schema(ref_template="#/components/schemas/{model}")
_EDIT_REQUEST_DEFS = _EDIT_REQUEST_SCHEMA.pop("$defs", {})
EDIT_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _EDIT_REQUEST_SCHEMA},
            "multipart/form-data": {"schema": {
                "type": "object",
                "required": ["request"],
                "properties": {
                    "request": {"type": "string", "description": "the EditRequest as JSON"},
                    "image": {"type": "string", "format": "binary", "description": "IP2P input image"},
                },
            }},
        },
    }
}

router = APIRouter(prefix=f"/{API_VERSION}", responses=ERROR_RESPONSES)


def submit_edit(svc: Services, request: EditRequest, image_bytes: bytes | None, tenant: str,
                idempotency_key: str | None) -> tuple[Edit, bool]:
    """Validate, decode the image, store it, create the job: the thread-pool path for edits with an image
    (Pillow, boto3). JSON edits without an image take :func:`create_edit`'s one-round-trip path."""
    submission = prepare_submission(request, image_bytes, settings=svc.settings, counter=svc.tokens,
                                    tenant=tenant, edit_id=new_edit_id(), now=datetime.now(UTC),
                                    decode_gate=svc.decode_gate,
                                    inversion_lookup=lambda inversion_id, _tenant: load_record(svc.redis, inversion_id),
                                    inversion_finder=lambda owner, digest: usable_inversion(svc.redis, owner, digest))
    payload = submission.payload
    if idempotency_key:
        existing = svc.jobstore.find_idempotent(tenant, idempotency_key, submission.fingerprint)
        if existing is not None:
            return existing, False
    svc.jobstore.accounting.precheck(tenant)  # before the upload; JobStore.create decides atomically
    if submission.input_png is not None and payload.input_image_key:
        svc.storage.put_bytes(payload.input_image_key, submission.input_png, "image/png")
    edit, created = svc.jobstore.create(payload, webhook=submission.webhook, idempotency_key=idempotency_key,
                                        fingerprint=submission.fingerprint)
    if not created and payload.input_image_key:  # lost a concurrent duplicate race: drop our upload
        try:
            svc.storage.delete(payload.input_image_key)
        except StorageError:
            pass
    return edit, created


def edit_response(edit: Edit, status: int, **headers: str) -> Response:
    return Response(edit.model_dump_json(), status_code=status, media_type="application/json",
                    headers={"Location": f"/{API_VERSION}/edits/{edit.id}", **headers})


def parse_cancel_after_header(value: str) -> float:
    try:
        return parse_cancel_after(value)
    except ValueError as exc:
        raise invalid("Cancel-After", f"Cancel-After: {exc}") from None


@router.post("/edits", status_code=202, response_model=Edit, openapi_extra=EDIT_REQUEST_BODY,
             summary="Submit an edit (JSON, or multipart with an image file)",
             responses={200: {"model": Edit, "description": "Terminal already (Prefer: wait, or a replay)"}})
async def create_edit(
    request: Request,
    tenant: str = Depends(submitting_tenant),
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=255,
                                         description="same key + same body → the same edit, run once"),
    prefer: str | None = Header(None, description="RFC 7240; `wait=N` holds the response up to N seconds, a bare "
                         "`wait` up to the default (60 s); answered by `Preference-Applied`"),
    cancel_after: str | None = Header(None, alias="Cancel-After", description="cancel the edit once this much time "
                                      "has passed: seconds (`30`) or a duration (`90s`, `1m30s`, `500ms`)"),
) -> Response:
    svc = services(request)
    limits = svc.settings.limits
    aio = svc.aio_redis()
    counted = False  # the tenant's rate limit counts this request once
    try:
        cancel_seconds = None if cancel_after is None else parse_cancel_after_header(cancel_after)
        body = await read_body_limited(request, max_body_bytes(limits))
        parsed = await parse_edit_body(request, body, limits)
        edit_request = parse_request(parsed.data)
        image_url = getattr(edit_request, "image_url", None)
        if image_url is not None:
            counted = True
            await svc.rate_limiter.check_async(aio, tenant)  # before any outbound request
            await fetch_image_input(parsed, image_url, svc.settings.image_urls, limits)
        submission = None
        from_photo = getattr(edit_request, "inversion_id", None) is not None  # looks its inversion up: thread pool
        if parsed.image_bytes is None and not from_photo:  # no Pillow, no S3: microseconds, on the event loop
            submission = prepare_submission(edit_request, None, settings=svc.settings, counter=svc.tokens,
                                            tenant=tenant, edit_id=new_edit_id(), now=datetime.now(UTC))
        await require_live_worker_async(aio, svc.settings, submission.payload.batch_key.model
                                        if submission is not None else resolve_model(edit_request, svc.settings).name)
    except ApiError:
        if not counted:
            await svc.rate_limiter.check_async(aio, tenant)  # a refused request counts too, and 429 comes first
        raise
    if submission is not None:
        edit, created = await svc.jobstore.create_async(
            aio, submission.payload, webhook=submission.webhook, idempotency_key=idempotency_key,
            fingerprint=submission.fingerprint, rate_limit=True)
    else:
        if not counted:
            await svc.rate_limiter.check_async(aio, tenant)
        try:
            edit, created = await run_in_threadpool(submit_edit, svc, edit_request, parsed.image_bytes, tenant,
                                                    idempotency_key)
        except ApiError as exc:
            raise blame_image_url(parsed, exc)
    headers: dict[str, str] = {}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    elif cancel_seconds is not None and not edit.status.terminal:
        await schedule_cancel_async(aio, edit.id, cancel_seconds)
    wait = wait_seconds(request.headers.getlist("prefer"), limits.max_wait_seconds,
                        limits.default_wait_seconds)
    if wait is not None:
        headers["Preference-Applied"] = f"wait={wait}"
        if wait > 0 and not edit.status.terminal:
            client = svc.async_redis()
            try:
                edit = await wait_for_terminal(client, svc.jobstore, edit.id, tenant, wait) or edit
            finally:
                await client.aclose()
    return edit_response(edit, 200 if edit.status.terminal else 202, **headers)


@router.get("/edits/{edit_id}", response_model=Edit, summary="An edit: status, progress, results")
def get_edit(edit_id: str, request: Request, tenant: str = Depends(current_tenant)) -> Edit:
    edit = services(request).jobstore.get(edit_id, tenant)
    if edit is None:
        raise not_found(f"edit {edit_id}")
    return edit


@router.get("/edits", response_model=EditList, summary="The caller's edits, newest first")
def list_edits(
    request: Request,
    tenant: str = Depends(current_tenant),
    status: EditStatus | None = None,
    kind: EditKind | None = None,
    model: str | None = Query(None, max_length=100),
    limit: int = Query(20, ge=1, le=100),
    cursor: str | None = Query(None, max_length=200, description="next_cursor of the previous page"),
) -> EditList:
    try:
        return services(request).jobstore.list(tenant, status=status.value if status else None, kind=kind,
                                               model=model, limit=limit, cursor=cursor)
    except ValueError as exc:
        raise ApiError(422, str(exc), type=ErrorType.invalid_request, field="cursor")


@router.post("/edits/{edit_id}/cancel", response_model=Edit,
             summary="Cancel: queued → canceled now; processing → stopped between steps")
def cancel_edit(edit_id: str, request: Request, tenant: str = Depends(current_tenant)) -> Edit:
    return services(request).jobstore.request_cancel(edit_id, tenant)


@router.get("/edits/{edit_id}/events", summary="Server-Sent Events of status and progress changes",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "event: status|progress"}})
async def edit_event_stream(edit_id: str, request: Request, tenant: str = Depends(current_tenant)):
    svc = services(request)
    if await run_in_threadpool(svc.jobstore.get, edit_id, tenant) is None:
        raise not_found(f"edit {edit_id}")
    client = svc.async_redis()

    async def frames():
        try:
            async for frame in edit_events(client, svc.jobstore, edit_id, tenant,
                                           keepalive_seconds=svc.sse_keepalive_seconds,
                                           is_disconnected=request.is_disconnected):
                yield frame
        finally:
            await client.aclose()

    return StreamingResponse(frames(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


@router.get("/models", response_model=ModelList, summary="Servable models")
def list_models(request: Request) -> ModelList:
    svc = services(request)
    catalog = svc.settings.model_catalog()
    workers, queued = model_availability(svc.redis, catalog)
    recent = throughput.recent(svc.redis, catalog, svc.settings.throughput_window_seconds)
    return ModelList(data=[
        ModelInfo(name=spec.name, kind=spec.kind, edit_kinds=edit_kinds_for_model(spec.kind), default_size=spec.default_size,
                  max_size=spec.max_size, random_weights=spec.random_weights, scheduler=spec.scheduler,
                  schedulers=list(SCHEDULERS), workers=workers.get(spec.name, 0), queued=queued.get(spec.name, 0),
                  throughput=ModelThroughput(**recent[spec.name].fields()),
                  require_live_worker=svc.settings.requires_live_worker(spec.name))
        for spec in catalog.values()
    ])


# ------------------------------------------------------------------------------------------------ admin

admin_router = APIRouter(prefix=f"/{API_VERSION}/admin", dependencies=[Depends(require_admin)],
                         responses=ERROR_RESPONSES, tags=["admin"])


@admin_router.post("/keys", status_code=201, response_model=CreatedApiKey, summary="Create an API key")
def create_key(body: CreateKeyRequest, request: Request) -> CreatedApiKey:
    return services(request).keys.create_key(body.tenant, body.label)


@admin_router.get("/keys", response_model=ApiKeyList, summary="List API keys (ids, never the keys)")
def list_keys(request: Request, tenant: str | None = Query(None, max_length=64)) -> ApiKeyList:
    return ApiKeyList(data=services(request).keys.list_keys(tenant))


@admin_router.delete("/keys/{key_id}", status_code=204, summary="Revoke an API key")
def revoke_key(key_id: str, request: Request) -> Response:
    if not services(request).keys.revoke_key(key_id):
        raise not_found(f"API key {key_id}")
    return Response(status_code=204)


TenantName = Annotated[str, Path(pattern=TENANT_RE.pattern, description="letters, digits, _ . - (at most 64)")]


@admin_router.get("/tenants/{tenant}/limits", response_model=TenantLimits,
                  summary="A tenant's effective limits, overrides and current usage")
def get_tenant_limits(tenant: TenantName, request: Request) -> TenantLimits:
    svc = services(request)
    return tenant_limits(svc.redis, tenant, svc.settings)


@admin_router.put("/tenants/{tenant}/limits", response_model=TenantLimits,
                  summary="Replace a tenant's limit overrides (null or absent: the default)")
def put_tenant_limits(tenant: TenantName, body: TenantLimitOverrides, request: Request) -> TenantLimits:
    svc = services(request)
    return write_overrides(svc.redis, tenant, body, svc.settings)


@admin_router.get("/webhooks/failed", response_model=failed_webhooks.FailedWebhookList,
                  summary="Webhook deliveries given up on (attempts exhausted or destination refused), newest first")
def list_failed_webhooks(request: Request, limit: int = Query(100, ge=1, le=1000),
                         tenant: str | None = Query(None, max_length=64)) -> failed_webhooks.FailedWebhookList:
    svc = services(request)
    entries = failed_webhooks.list_failed(svc.redis, None if tenant else limit, settings=svc.settings)
    if tenant:
        entries = [e for e in entries if e.delivery.tenant == tenant][:limit]
    return failed_webhooks.FailedWebhookList(data=[failed_webhooks.FailedWebhook(**e.summary()) for e in entries])


@admin_router.post("/webhooks/failed/{ident}/replay", response_model=failed_webhooks.FailedWebhook,
                   summary="Send a failed delivery again: same webhook-id and body, attempts start over")
def replay_failed_webhook(request: Request, ident: str = Path(max_length=128, description=(
        "the entry's `id` or its `webhook_id` (msg_...)"))) -> failed_webhooks.FailedWebhook:
    svc = services(request)
    try:
        entry = failed_webhooks.replay_failed(svc.redis, ident, settings=svc.settings)
    except KeyError:
        raise not_found(f"failed webhook delivery {ident}")
    return failed_webhooks.FailedWebhook(**entry.summary())


# ------------------------------------------------------------------------------------------------ ops

ops_router = APIRouter(tags=["ops"])


@ops_router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    # async, so on the event loop rather than the thread pool: liveness must not wait behind blocking work
    # (uploads, listings) holding every pool thread; what it measures is whether the loop answers.
    return {"status": "ok"}


def readiness_checks(svc: Services) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        svc.redis.ping()
        checks["redis"] = "ok"
    except redis.RedisError as exc:
        checks["redis"] = f"down: {exc}"
    try:
        svc.storage.head_bucket()
        checks["s3"] = "ok"
    except StorageError as exc:
        checks["s3"] = f"down: {exc}"
    missing = svc.tokens.missing()  # loads what is not loaded yet (the warm-up may still be running)
    checks["tokenizers"] = "ok" if not missing else "missing for " + "; ".join(
        f"model {name!r} ({reason})" for name, reason in missing.items())
    return checks


@ops_router.get("/readyz", summary="Redis and S3 answer; every served model's tokenizer is loaded",
                responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> JSONResponse:
    checks = await run_in_threadpool(readiness_checks, services(request))
    down = [name for name, state in checks.items() if state != "ok"]
    if down:
        reasons = [f"{name} down" if name != "tokenizers" else f"tokenizers {checks[name]}" for name in down]
        return error_response(ApiError(503, f"not ready: {', '.join(reasons)}", type=ErrorType.not_ready,
                                       extra={"checks": checks}))
    return JSONResponse({"status": "ready", "checks": checks})


@ops_router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def prometheus_metrics(request: Request) -> Response:
    body, content_type = metrics.render(services(request).redis)
    return Response(body, media_type=content_type)


# ------------------------------------------------------------------------------------------------ plumbing

class HttpMetricsMiddleware:
    """Counts and times requests by route *template* (``/v1/edits/{edit_id}``), never the raw path."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "GET")
            metrics.http_requests_total.labels(route=route, method=method, code=str(status["code"])).inc()
            metrics.http_request_duration_seconds.labels(route=route, method=method).observe(
                time.perf_counter() - started)


def install_domain_error_handlers(app: FastAPI) -> None:
    async def on_idempotency_conflict(request: Request, exc: IdempotencyConflict) -> JSONResponse:
        return _error(409, ErrorType.idempotency_conflict, str(exc), "Idempotency-Key")

    async def on_edit_conflict(request: Request, exc: EditConflict) -> JSONResponse:
        return _error(409, ErrorType.conflict, str(exc))

    async def on_edit_not_found(request: Request, exc: EditNotFound) -> JSONResponse:
        return _error(404, ErrorType.not_found, f"edit {exc} not found")

    async def on_storage_error(request: Request, exc: StorageError) -> JSONResponse:
        log.warning("storage unavailable: %s", exc)
        return _error(503, ErrorType.storage_unavailable, "object storage is unavailable; retry later")

    async def on_redis_error(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("redis unavailable: %s", exc)
        return _error(503, ErrorType.queue_unavailable, "the job store is unavailable; retry later")

    async def on_limit_exceeded(request: Request, exc: LimitExceeded) -> JSONResponse:
        metrics.rejections_total.labels(reason=exc.type).inc()
        response = _error(exc.status, exc.type, exc.message)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response

    app.add_exception_handler(LimitExceeded, on_limit_exceeded)
    app.add_exception_handler(IdempotencyConflict, on_idempotency_conflict)
    app.add_exception_handler(EditConflict, on_edit_conflict)
    app.add_exception_handler(EditNotFound, on_edit_not_found)
    app.add_exception_handler(StorageError, on_storage_error)
    app.add_exception_handler(redis.RedisError, on_redis_error)


def _error(status: int, type: ErrorType, message: str, field: str | None = None) -> JSONResponse:
    return error_response(ApiError(status, message, type=type, field=field))


def install_openapi(app: FastAPI) -> None:
    """FastAPI's schema plus the EditRequest models, which the manual-body route references, the webhook
    events and an example on every request body (``service.openapi_docs``)."""
    install_webhooks(app)

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes, webhooks=app.webhooks.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in {**_EDIT_REQUEST_DEFS, **DATASET_REQUEST_DEFS, **INVERSION_REQUEST_DEFS}.items():
                components.setdefault(name, definition)
            add_request_examples(schema)
            tidy_webhooks(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]


def _prepare_bucket(storage: Storage) -> None:
    try:
        storage.ensure_bucket_and_lifecycle()
    except StorageError as exc:
        log.warning("S3 bucket not prepared at start-up (readiness will report it): %s", exc)


def _warm_up(svc: Services) -> None:
    """Load the tokenizers, then move every object alive now (modules, tokenizers, settings) out of the
    garbage collector's reach: a full collection over transformers' import graph paused the event loop for
    tens of milliseconds, which was the gateway's p99 under load."""
    svc.tokens.warm()
    gc.freeze()


def build_services(settings: Settings) -> Services:
    connection = redisconn.sync_client(settings.redis_url, socket_timeout=5, socket_connect_timeout=2,
                                       health_check_interval=30)
    storage = Storage(settings.s3)
    jobstore = JobStore(connection, settings, storage, listeners=[emit_webhook])  # the store tells, webhooks watch
    return Services(settings=settings, redis=connection, storage=storage, jobstore=jobstore,
                    keys=KeyStore(connection, settings), tokens=PromptTokenCounter(settings),
                    rate_limiter=RateLimiter(connection, settings),
                    decode_gate=DecodeGate(settings.limits.max_concurrent_decodes,
                                           settings.limits.decode_wait_seconds))


def create_app(settings: Settings | None = None, *, prepare_bucket: bool = True) -> FastAPI:
    settings = settings or get_settings()
    svc = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if prepare_bucket:
            threading.Thread(target=_prepare_bucket, args=(svc.storage,), daemon=True).start()
        threading.Thread(target=_warm_up, args=(svc,), daemon=True, name="warm-up").start()
        yield
        await svc.close_aio_redis()

    app = FastAPI(
        title="editserve",
        version="0.1.0",
        description="Asynchronous image editing with Prompt-to-Prompt and InstructPix2Pix. "
                    "Errors are always `{\"error\": {\"type\", \"message\", \"field\"}}`.",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
    )
    app.state.services = svc
    app.state.current_tenant = current_tenant  # handed to routers below the app (dataset_routes)
    install_error_handlers(app)
    install_domain_error_handlers(app)
    app.include_router(router)
    app.include_router(dataset_router)
    app.include_router(inversion_router)
    app.include_router(admin_router)
    app.include_router(ops_router)
    install_playground(app)
    app.add_middleware(HttpMetricsMiddleware)
    install_openapi(app)
    return app


def serving_app() -> FastAPI:
    """The app uvicorn/gunicorn serve. Pillow's bomb guard is process-global, so only the serving process
    lowers it to our pixel limit (intake also checks the header explicitly before decoding)."""
    settings = get_settings()
    Image.MAX_IMAGE_PIXELS = settings.limits.max_image_pixels
    return create_app(settings)


app = serving_app()
