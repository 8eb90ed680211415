"""One error shape for every failure: ``{"error": {"type", "message", "field"}}``, and the one mapper from an
error to its HTTP response (``error_response``). The types are the contract's ``ErrorType`` catalogue.

Why: clients (and the SDK) branch on ``type`` and show ``field`` next to the offending input. Bad input is
always a 4xx that names the field path as the client wrote it (``target_prompts.0``, ``guidance_scale``);
500 is reserved for real bugs, which are logged with their traceback.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from editserve.contract import ErrorType
from editserve.kinds import EDIT_KINDS

log = logging.getLogger(__name__)

_LOC_SECTIONS = {"body", "query", "path", "header", "cookie"}
_UNION_TAGS = set(EDIT_KINDS)
# How pydantic names the member of a union a value failed (``cross_replace_steps.constrained-float``).
_UNION_MEMBER = re.compile(r"^(?:function-[a-z-]+|(?:constrained-)?(?:float|int|str|bool|list|dict|tuple|set|"
                           r"frozenset|none|literal|union|is-instance)(?:\[.*\])?)$")
_FIELD_PREFIX = re.compile(r"^(?P<field>[a-z_][a-z0-9_.]*): (?P<rest>.+)$", re.DOTALL)

UNAVAILABLE_RETRY_AFTER_SECONDS = 2
"""Retry-After of a 503 that names no better delay (Redis or S3 down, every decoder busy): clients back off."""

_TYPES_BY_STATUS = {
    400: ErrorType.bad_request, 401: ErrorType.unauthorized, 403: ErrorType.forbidden, 404: ErrorType.not_found,
    405: ErrorType.method_not_allowed, 409: ErrorType.conflict, 413: ErrorType.payload_too_large,
    415: ErrorType.unsupported_media_type, 422: ErrorType.invalid_request, 429: ErrorType.too_many_requests,
    503: ErrorType.service_unavailable,
}


class ApiError(Exception):
    """Raise anywhere in a request to answer with this status and the standard error body."""

    def __init__(self, status: int, message: str, *, type: ErrorType | None = None, field: str | None = None,
                 headers: Mapping[str, str] | None = None, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.type = ErrorType(type or _TYPES_BY_STATUS.get(status, ErrorType.error)).value  # catalogue only
        self.message = message
        self.field = field
        self.headers = dict(headers or {})
        self.extra = extra or {}


def invalid(field: str | None, message: str) -> ApiError:
    return ApiError(422, message, type=ErrorType.invalid_request, field=field)


def not_found(what: str) -> ApiError:
    return ApiError(404, f"{what} not found", type=ErrorType.not_found)


def error_body(type: ErrorType, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"type": ErrorType(type).value, "message": message, "field": field}}


def field_path(loc: Iterable[Any]) -> str | None:
    """Pydantic/FastAPI ``loc`` → the client's path: drop the section ("body") and the union tag ("p2p")."""
    parts = list(loc)
    if parts and parts[0] in _LOC_SECTIONS:
        parts = parts[1:]
    if parts and parts[0] in _UNION_TAGS:
        parts = parts[1:]
    parts = [p for p in parts if not (isinstance(p, str) and _UNION_MEMBER.match(p))]
    return ".".join(str(p) if p != "" else '""' for p in parts) or None


def _clean_message(msg: str) -> str:
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def from_validation_errors(errors: list[dict[str, Any]], *, prefix: tuple = ()) -> ApiError:
    """The first error decides ``field``; the message lists every problem (at most five)."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError(400, "request body is not valid JSON", type=ErrorType.malformed_json)
    described: list[tuple[str | None, str]] = []
    for err in errors:
        loc = prefix + tuple(err.get("loc", ()))
        field = field_path(loc)
        message = _clean_message(str(err.get("msg", "invalid value")))
        if field is None and tuple(loc) == ("body",):  # the body as a whole (e.g. a list for an object)
            message = f"request body: {message}"
        match = _FIELD_PREFIX.match(message)
        if field is None and match:  # model validators name the field in their message
            field = match.group("field")
        if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
            field, message = "kind", "kind must be " + " or ".join(repr(k) for k in EDIT_KINDS)
        if field and match is None:
            message = f"{field}: {message}"
        described.append((field, message))
    first_field = described[0][0] if described else None
    message = "; ".join(m for _, m in described[:5]) or "invalid request"
    return ApiError(422, message, type=ErrorType.invalid_request, field=first_field)


def from_pydantic(exc: ValidationError, *, prefix: tuple = ()) -> ApiError:
    return from_validation_errors(exc.errors(include_url=False), prefix=prefix)


def with_retry_after(response: JSONResponse) -> JSONResponse:
    """Every 503 tells the client when to come back (RFC 9110 §10.2.3); one that already does is kept."""
    if response.status_code == 503 and "retry-after" not in response.headers:
        response.headers["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER_SECONDS)
    return response


def error_response(err: ApiError) -> JSONResponse:
    """The one mapper to HTTP: the standard body (plus ``extra``), the status and headers."""
    body = error_body(err.type, err.message, err.field)
    body.update(err.extra)
    return with_retry_after(JSONResponse(body, status_code=err.status, headers=err.headers))


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    async def on_request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation_errors(list(exc.errors())))

    async def on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        error_type = None
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route for {request.method} {request.url.path}"
        if exc.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's JSON decode
            message, error_type = "request body is not valid JSON (or is nested too deeply)", ErrorType.malformed_json
        err = ApiError(exc.status_code, message, type=error_type, headers=getattr(exc, "headers", None))
        return error_response(err)

    async def on_client_disconnect(request: Request, exc: ClientDisconnect) -> JSONResponse:
        """The client left (or was cut off for reading too slowly) before its request was read: nothing to answer
        and nothing broken on our side, so one line at INFO, no traceback."""
        log.info("client disconnected before %s %s was read", request.method, request.url.path)
        return error_response(ApiError(400, "client disconnected", type=ErrorType.client_disconnected))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(ApiError(500, "internal error; it has been logged", type=ErrorType.internal_error))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(ClientDisconnect, on_client_disconnect)
    app.add_exception_handler(RequestValidationError, on_request_validation)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(Exception, on_unexpected)
