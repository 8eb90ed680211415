"""Exceptions raised by the SDK: one class per way a call can fail, each carrying the server's error.

Why a hierarchy: callers branch on *what* failed (``except NotFoundError``, ``except RateLimitError``),
and show ``field`` next to the input that was wrong. Every HTTP error is an :class:`APIError` with the
server's ``{"error": {"type", "message", "field"}}``; an edit that ran and failed is :class:`EditFailed`.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from editserve.contract import Edit, ErrorInfo, ErrorType, Inversion
from editserve.kinds import EDIT_KINDS
from editserve.webhooks import WebhookVerificationError


class EditserveError(Exception):
    """Base class of every SDK error."""


class APIError(EditserveError):
    """The server answered with an error status (after any retries)."""

    def __init__(self, message: str, *, status: int | None = None, type: str = "error", field: str | None = None,
                 body: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.field = field
        self.body = body
        self.headers = headers or {}

    def __str__(self) -> str:
        where = f" (field: {self.field})" if self.field else ""
        code = f"{self.status} " if self.status else ""
        return f"{code}{self.type}: {self.message}{where}"


class BadRequestError(APIError):
    """400: the body could not be read (malformed JSON or multipart)."""


class AuthenticationError(APIError):
    """401: missing, invalid or revoked API key."""


class PermissionDeniedError(APIError):
    """403."""


class NotFoundError(APIError):
    """404: no such edit (or it belongs to another tenant)."""


class ConflictError(APIError):
    """409: e.g. the Idempotency-Key was used with a different body."""


class PayloadTooLargeError(APIError):
    """413: body or image over the server's limit."""


class UnsupportedMediaTypeError(APIError):
    """415: image format or content type not accepted."""


class InvalidRequestError(APIError):
    """422: a parameter is invalid; ``field`` names it (also raised before sending, by local validation)."""


class RateLimitError(APIError):
    """429: queue full or rate limited; retried automatically, honouring Retry-After."""


class ServerError(APIError):
    """5xx."""


class ServiceUnavailableError(ServerError):
    """503: a dependency (Redis, S3) is unavailable; retried automatically."""


class APIConnectionError(EditserveError):
    """The server could not be reached (after any retries)."""


class APITimeoutError(APIConnectionError):
    """The request timed out (after any retries)."""


class WaitTimeout(EditserveError, TimeoutError):
    """``wait(timeout=...)`` ran out before the edit finished; ``edit`` is its last known state."""

    def __init__(self, message: str, edit: Edit | None = None):
        super().__init__(message)
        self.edit = edit


class _EditEnded(EditserveError):
    noun = "edit"

    def __init__(self, edit: Edit | Inversion):
        self.edit = edit
        error = edit.error or ErrorInfo(type=edit.status.value, message=f"{self.noun} {edit.status.value}")
        self.type, self.message, self.field = error.type, error.message, error.field
        where = f" (field: {self.field})" if self.field else ""
        super().__init__(f"{self.noun} {edit.id} {edit.status.value}: {self.type}: {self.message}{where}")


class EditFailed(_EditEnded):
    """The edit reached status ``failed``; ``type``/``message``/``field`` are the server's ``edit.error``."""


class EditCanceled(_EditEnded):
    """The edit was canceled before it finished."""


class InversionFailed(EditFailed):
    """An inversion reached status ``failed``; ``edit`` is the :class:`Inversion` (``inversion`` names it too)."""

    noun = "inversion"

    @property
    def inversion(self) -> Inversion:
        return self.edit


class InversionCanceled(EditCanceled):
    """An inversion was canceled before it finished."""

    noun = "inversion"

    @property
    def inversion(self) -> Inversion:
        return self.edit


ERRORS_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: InvalidRequestError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_class(status: int) -> type[APIError]:
    return ERRORS_BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)


__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "EditCanceled",
    "EditFailed",
    "EditserveError",
    "InvalidRequestError",
    "InversionCanceled",
    "InversionFailed",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
    "UnsupportedMediaTypeError",
    "WaitTimeout",
    "WebhookVerificationError",
    "error_class",
]


# How pydantic names the member of a union a value failed (``cross_replace_steps.constrained-float``): not a
# field, so never shown to users.
_UNION_MEMBER = re.compile(r"^(?:function-[a-z-]+|(?:constrained-)?(?:float|int|str|bool|list|dict|tuple|set|"
                           r"frozenset|none|literal|union|is-instance)(?:\[.*\])?)$")


def local_validation_error(exc: ValidationError, prefix: str | None = None) -> InvalidRequestError:
    """A request the SDK refused before sending, as the server's 422 would have said it: the first error, its
    field as a dotted path (``prefix`` when the model validated is a part of the request, e.g. ``sweep``) without
    the union tag or pydantic's member names, and its message without a repeated field name."""
    first = exc.errors()[0]
    loc = list(first.get("loc", ()))
    if loc and loc[0] in EDIT_KINDS:
        loc = loc[1:]
    parts = [str(p) for p in loc if not _UNION_MEMBER.match(str(p))]
    path = ".".join([prefix, *parts] if prefix else parts) or prefix
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if path and message.startswith(f"{parts[0] if parts else path}: "):  # our validators name their field
        message = message.split(": ", 1)[1]
    return InvalidRequestError(message, status=None, type=ErrorType.invalid_request.value, field=path)
