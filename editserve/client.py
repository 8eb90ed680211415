"""The Python SDK: ``Client`` (sync) and ``AsyncClient`` (asyncio), the same surface over httpx.

Why it looks like this: every request is described once (a ``_Call``) and replayed unchanged on retry, so
a retried submit carries the same ``Idempotency-Key`` and can never create a second edit. Retries cover
connection errors, timeouts, 429/502/503/504 (honouring ``Retry-After``). Requests are validated locally
with the shared contract models before they leave, so a typo fails fast with the same ``field`` the server
would name. ``wait()`` follows the SSE stream and falls back to polling; results are downloaded from their
presigned URLs without sending the API key to the storage host.

    from editserve import Client
    with Client("http://127.0.0.1:8000", api_key="esk_...") as client:
        edit = client.submit_p2p("a cat riding a bike", "a dog riding a bike", seed=1)
        edit = client.wait(edit.id)
        paths = client.download(edit, "out/")
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import io
import json
import mimetypes
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Self

import httpx
from pydantic import TypeAdapter, ValidationError

from editserve import errors
from editserve.contract import (
    API_VERSION,
    Edit,
    EditList,
    EditRequest,
    EditStatus,
    ErrorType,
    IP2PEditRequest,
    Inversion,
    InversionList,
    InversionRequest,
    LocalBlend,
    ModelInfo,
    P2PEditRequest,
    Sweep,
    WebhookSpec,
)
from editserve.kinds import EDIT_KINDS
from editserve.progress import InversionProgressCallback, ProgressCallback, progress_callback
from editserve.dataset_client import AsyncDatasetMethods, DatasetMethods
from editserve.errors import local_validation_error as _local_validation_error
from editserve.calls import Call as _Call
from editserve.calls import webhook_spec as _webhook
from editserve.calls import write_atomically as _write_atomically
from editserve.webhooks import verify as verify_webhook

try:
    __version__ = importlib.metadata.version("editserve")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0"

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
ENV_BASE_URL = "EDITSERVE_URL"
ENV_API_KEY = "EDITSERVE_API_KEY"
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 2
RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_RETRY_WAIT_SECONDS = 60.0
SSE_READ_TIMEOUT = 45.0  # the gateway sends a keep-alive comment every 15 s
POLL_INTERVAL = 1.0
NO_EVENTS_STATUSES = frozenset({404, 405, 406, 501})  # the events route is absent: poll instead

ImageInput = Any
"""A path (str / os.PathLike), raw bytes, a binary file object, or a PIL image."""

_REQUEST_ADAPTER: TypeAdapter = TypeAdapter(EditRequest)
_UNION_TAGS = tuple(EDIT_KINDS)


# ------------------------------------------------------------------------------------------------ helpers

def server_root(url: str) -> str:
    """The server's root URL: a trailing ``/`` or ``/v1`` (people paste the API's base URL) is dropped, since
    every path the client sends already starts with ``/v1``."""
    url = url.rstrip("/")
    suffix = f"/{API_VERSION}"
    return url[: -len(suffix)].rstrip("/") if url.endswith(suffix) else url


def validate_request(request: EditRequest | Mapping[str, Any]) -> P2PEditRequest | IP2PEditRequest:
    """A request dict or model, validated with the shared contract (raises InvalidRequestError)."""
    try:
        if isinstance(request, (P2PEditRequest, IP2PEditRequest)):
            return type(request).model_validate(request.model_dump(exclude_unset=True))
        return _REQUEST_ADAPTER.validate_python(dict(request))
    except ValidationError as exc:
        raise _local_validation_error(exc) from None


def _request_json(request: P2PEditRequest | IP2PEditRequest) -> dict[str, Any]:
    """Only what the caller set (the server resolves defaults), plus the ``kind`` discriminator."""
    return {**request.model_dump(mode="json", exclude_unset=True), "kind": request.kind}


def image_bytes(image: ImageInput) -> tuple[bytes, str, str]:
    """(bytes, filename, content type) for an image given as a path, bytes, file object or PIL image."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), "image", "application/octet-stream"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return path.read_bytes(), path.name, mime
    if hasattr(image, "save") and hasattr(image, "size"):  # PIL.Image.Image, without importing Pillow
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "image.png", "image/png"
    if hasattr(image, "read"):
        name = Path(getattr(image, "name", "image")).name
        return image.read(), name, mimetypes.guess_type(name)[0] or "application/octet-stream"
    raise TypeError("image must be a path, bytes, a binary file object or a PIL image")


def _clean(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def parse_retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def error_from_response(response: httpx.Response) -> errors.APIError:
    """The server's ``{"error": {...}}`` (or FastAPI's ``{"detail": ...}``) as the matching APIError."""
    status = response.status_code
    body: Any = None
    try:
        body = response.json()
    except ValueError:
        pass
    type_, message, field_ = "error", (response.text or response.reason_phrase or "").strip(), None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        type_, message, field_ = err.get("type") or type_, err.get("message") or message, err.get("field")
    elif isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            loc = [str(p) for p in detail[0].get("loc", ()) if p not in ("body", "query", "path", *_UNION_TAGS)]
            type_, message, field_ = "invalid_request", detail[0].get("msg", message), ".".join(loc) or None
        else:
            message = str(detail)
    cls = errors.error_class(status)
    return cls(message or f"HTTP {status}", status=status, type=type_, field=field_, body=body,
               headers=dict(response.headers))


def _backoff(attempt: int) -> float:
    return min(0.5 * 2**attempt, 8.0) * random.uniform(0.75, 1.25)


def _retry_wait(attempt: int, response: httpx.Response | None) -> float:
    retry_after = parse_retry_after(response.headers) if response is not None else None
    return min(retry_after, MAX_RETRY_WAIT_SECONDS) if retry_after is not None else _backoff(attempt)


def _transport_error(exc: httpx.TransportError) -> errors.APIConnectionError:
    cls = errors.APITimeoutError if isinstance(exc, httpx.TimeoutException) else errors.APIConnectionError
    return cls(f"{type(exc).__name__}: {exc}")


def _raise_if_ended(edit: Edit) -> Edit:
    if edit.status is EditStatus.failed:
        raise errors.EditFailed(edit)
    if edit.status is EditStatus.canceled:
        raise errors.EditCanceled(edit)
    return edit


def _inversion_id(inversion: str | Inversion) -> str:
    return inversion.id if isinstance(inversion, Inversion) else str(inversion)


def _raise_if_inversion_ended(inversion: Inversion) -> Inversion:
    if inversion.status is EditStatus.failed:
        raise errors.InversionFailed(inversion)
    if inversion.status is EditStatus.canceled:
        raise errors.InversionCanceled(inversion)
    return inversion


def _inversion_plan(inversion: Inversion, folder: Path, arrays: bool) -> list[_Download]:
    """``{id}-reconstruction.png`` (and ``{id}-inversion.safetensors``: x_T and the per-step embeddings)."""
    if inversion.result is None:
        raise errors.EditserveError(f"inversion {inversion.id} has no result ({inversion.status.value})")
    plan = [_Download(inversion.result.reconstruction_url, folder / f"{inversion.id}-reconstruction.png")]
    if arrays:
        plan.append(_Download(inversion.result.arrays_url, folder / f"{inversion.id}-inversion.safetensors"))
    return plan


class _SSEDecoder:
    """Server-Sent Events framing: returns (event, data) when a blank line ends an event."""

    def __init__(self) -> None:
        self.event, self.data = "message", []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            if not self.data:
                self.event = "message"
                return None
            out = (self.event, "\n".join(self.data))
            self.event, self.data = "message", []
            return out
        if line.startswith(":"):
            return None  # comment / keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None


@dataclass
class _Download:
    url: str
    path: Path


def _folder(folder: str | os.PathLike) -> Path:
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    return target


def _download_plan(edit: Edit, folder: Path, attention_maps: bool) -> list[_Download]:
    def suffix(url: str, default: str) -> str:
        ext = Path(httpx.URL(url).path).suffix
        return ext if ext else default

    def result_name(url: str, index: int) -> str:
        """The object's own name (``output-1-target-1.webp``) when it says which output it is; else by index."""
        name = Path(httpx.URL(url).path).name
        return name if name.startswith(f"output-{index}-") else f"output-{index}{suffix(url, '.png')}"

    plan = [_Download(r.url, folder / f"{edit.id}-{result_name(r.url, r.index)}") for r in edit.results]
    if attention_maps:
        for m in edit.attention_maps:
            plan.append(_Download(m.grid_url, folder / f"{edit.id}-attn-{m.prompt_index}{suffix(m.grid_url, '.png')}"))
            plan.append(_Download(m.array_url, folder / f"{edit.id}-attn-{m.prompt_index}{suffix(m.array_url, '.npy')}"))
    return plan


# ------------------------------------------------------------------------------------------------ shared core

class _ClientCore:
    """Configuration and request building shared by the sync and async clients (no I/O here)."""

    def __init__(self, base_url: str | None, api_key: str | None, timeout: float, retries: int,
                 headers: Mapping[str, str] | None):
        self.base_url = server_root(base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL)
        self.api_key = api_key if api_key is not None else os.environ.get(ENV_API_KEY)
        self.timeout = timeout
        self.retries = max(0, retries)
        self._headers = {"user-agent": f"editserve-python/{__version__}", "accept": "application/json",
                         **(dict(headers) if headers else {})}
        if self.api_key:
            self._headers["authorization"] = f"Bearer {self.api_key}"

    # -- request builders ------------------------------------------------------------------------------

    def _submit_call(self, request: EditRequest | Mapping[str, Any], image: ImageInput | None,
                     idempotency_key: str | None, wait: int | None) -> _Call:
        model = validate_request(request)
        headers = {"idempotency-key": idempotency_key or f"sdk-{uuid.uuid4()}"}
        timeout = self.timeout
        if wait is not None:
            headers["prefer"] = f"wait={int(wait)}"
            timeout += max(0, int(wait))
        body = _request_json(model)
        if image is None:
            return _Call("POST", f"/{API_VERSION}/edits", json_body=body, headers=headers, timeout=timeout)
        if not EDIT_KINDS[model.kind].takes_image:
            takers = " and ".join(k.name for k in EDIT_KINDS.values() if k.takes_image)
            raise errors.InvalidRequestError(f"only {takers} edits take an input image",
                                             type=ErrorType.invalid_request.value, field="image")
        if model.image:
            raise errors.InvalidRequestError("send the image either inline or as a file, not both",
                                             type=ErrorType.invalid_request.value, field="image")
        data, filename, mime = image_bytes(image)
        return _Call("POST", f"/{API_VERSION}/edits", form={"request": json.dumps(body)},
                     files={"image": (filename, data, mime)}, headers=headers, timeout=timeout)

    def _invert_call(self, image: ImageInput, caption: str, fields: dict[str, Any],
                     idempotency_key: str | None) -> _Call:
        """``POST /v1/inversions`` as multipart (the ``request`` JSON part and the ``image`` file)."""
        if image is None:
            raise errors.InvalidRequestError("an inversion needs the photo", type=ErrorType.invalid_request.value,
                                             field="image")
        fields["webhook"] = _webhook(fields.get("webhook"))
        try:
            request = InversionRequest.model_validate({"caption": caption, **_clean(fields)})
        except ValidationError as exc:
            raise _local_validation_error(exc) from None
        if request.image:
            raise errors.InvalidRequestError("send the image either inline or as a file, not both",
                                             type=ErrorType.invalid_request.value, field="image")
        data, filename, mime = image_bytes(image)
        body = request.model_dump(mode="json", exclude_unset=True)
        headers = {"idempotency-key": idempotency_key or f"sdk-{uuid.uuid4()}"}
        return _Call("POST", f"/{API_VERSION}/inversions", form={"request": json.dumps(body)},
                     files={"image": (filename, data, mime)}, headers=headers)

    @staticmethod
    def _p2p_request(source_prompt: str, target_prompts: str | Sequence[str], fields: dict[str, Any]) -> P2PEditRequest:
        targets = [target_prompts] if isinstance(target_prompts, str) else list(target_prompts)
        inversion = fields.pop("inversion", None)
        if inversion is not None:
            fields["inversion_id"] = _inversion_id(inversion)
        size = fields.pop("size", None)
        for side in ("height", "width"):
            if fields.get(side) is None:
                fields[side] = size
        fields["webhook"] = _webhook(fields.get("webhook"))
        try:
            return P2PEditRequest.model_validate(
                {"source_prompt": source_prompt, "target_prompts": targets, **_clean(fields)})
        except ValidationError as exc:
            raise _local_validation_error(exc) from None

    @staticmethod
    def _ip2p_request(instruction: str, fields: dict[str, Any]) -> IP2PEditRequest:
        fields["webhook"] = _webhook(fields.get("webhook"))
        try:
            return IP2PEditRequest.model_validate({"instruction": instruction, **_clean(fields)})
        except ValidationError as exc:
            raise _local_validation_error(exc) from None

    @staticmethod
    def _list_params(status, kind, model, limit, cursor) -> dict[str, Any]:
        status = status.value if isinstance(status, EditStatus) else status
        return _clean({"status": status, "kind": kind, "model": model, "limit": limit, "cursor": cursor})

    @staticmethod
    def _parse_models(payload: Any) -> list[ModelInfo]:
        items = payload.get("data", []) if isinstance(payload, dict) else payload
        return [ModelInfo.model_validate(item) for item in items]

    def _request_kwargs(self, call: _Call) -> dict[str, Any]:
        return dict(method=call.method, url=call.path, params=call.params, json=call.json_body, data=call.form,
                    files=call.files, headers=call.headers,
                    timeout=call.timeout if call.timeout is not None else self.timeout)

    def _is_api_url(self, url: str) -> bool:
        return not httpx.URL(url).is_absolute_url or url.startswith(self.base_url + "/")


def _edit_id(edit: str | Edit) -> str:
    return edit.id if isinstance(edit, Edit) else edit


# ------------------------------------------------------------------------------------------------ sync client

class Client(DatasetMethods, _ClientCore):
    """Synchronous client. ``base_url``/``api_key`` default to ``$EDITSERVE_URL``/``$EDITSERVE_API_KEY``."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
                 headers: Mapping[str, str] | None = None, transport: httpx.BaseTransport | None = None):
        super().__init__(base_url, api_key, timeout, retries, headers)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=timeout, transport=transport)
        # Presigned URLs carry their own signature: never send the API key to the storage host.
        self._files = httpx.Client(timeout=timeout, transport=transport, follow_redirects=True)

    def close(self) -> None:
        self._http.close()
        self._files.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------------------

    def _send(self, call: _Call | dict[str, Any], *, stream: bool = False) -> httpx.Response:
        request_kwargs = self._request_kwargs(call) if isinstance(call, _Call) else call
        attempt = 0
        while True:
            response = None
            try:
                response = self._http.send(self._http.build_request(**request_kwargs), stream=stream)
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise _transport_error(exc) from exc
            else:
                if response.status_code not in RETRY_STATUSES or attempt >= self.retries:
                    if response.is_error:
                        response.read()
                        response.close()
                        raise error_from_response(response)
                    return response
                response.close()
            time.sleep(_retry_wait(attempt, response))
            attempt += 1

    def _json(self, call: _Call) -> Any:
        return self._send(call).json()

    # -- API -------------------------------------------------------------------------------------------

    def submit(self, request: EditRequest | Mapping[str, Any], *, image: ImageInput | None = None,
               idempotency_key: str | None = None, wait: int | None = None) -> Edit:
        """Submit any edit request (model or dict). ``wait=N`` asks the server to hold up to N s (Prefer: wait)."""
        return Edit.model_validate(self._json(self._submit_call(request, image, idempotency_key, wait)))

    def submit_p2p(self, source_prompt: str, target_prompts: str | Sequence[str], *, edit: str | None = None,
                   reweight: dict[str, float] | list[dict[str, float]] | None = None,
                   local_blend: LocalBlend | Mapping[str, Any] | None = None, cross_replace_steps: Any = None,
                   self_replace_steps: Any = None, attention_maps: bool | list[int] | None = None,
                   steps: int | None = None, size: int | None = None, height: int | None = None,
                   width: int | None = None, guidance_scale: float | None = None, model: str | None = None,
                   seed: int | None = None, num_outputs: int | None = None, seeds: Sequence[int] | None = None,
                   scheduler: str | None = None,
                   webhook: str | WebhookSpec | Mapping[str, Any] | None = None, priority: str | None = None,
                   metadata: dict[str, str] | None = None, inversion: str | Inversion | None = None,
                   idempotency_key: str | None = None, wait: int | None = None, **extra: Any) -> Edit:
        """Prompt-to-Prompt: one source prompt, one or more target prompts (see P2PEditRequest for every field).

        ``inversion`` (an id or the :class:`Inversion` from :meth:`invert`) edits that photo: the source prompt is
        its caption, and model, size and steps must be the inversion's. ``num_outputs=n`` or ``seeds=[a, b]``: a
        source and its targets per seed (generated sources only).
        """
        fields = {k: v for k, v in locals().items()
                  if k not in ("self", "source_prompt", "target_prompts", "idempotency_key", "wait", "extra")}
        request = self._p2p_request(source_prompt, target_prompts, {**fields, **extra})
        return self.submit(request, idempotency_key=idempotency_key, wait=wait)

    def submit_ip2p(self, image: ImageInput | None, instruction: str, *, text_guidance: float | None = None,
                    image_guidance: float | None = None, resolution: int | None = None,
                    sweep: Sweep | Mapping[str, Any] | None = None, steps: int | None = None,
                    model: str | None = None, seed: int | None = None, num_outputs: int | None = None,
                    seeds: Sequence[int] | None = None, output_size: str | None = None,
                    scheduler: str | None = None,
                    webhook: str | WebhookSpec | Mapping[str, Any] | None = None, priority: str | None = None,
                    metadata: dict[str, str] | None = None, idempotency_key: str | None = None,
                    wait: int | None = None, **extra: Any) -> Edit:
        """InstructPix2Pix: an image (path, bytes, file or PIL image) and an instruction, sent as multipart; or
        ``image=None, image_url="https://..."`` for an image the server fetches. ``num_outputs`` / ``seeds``: one
        image per seed; ``output_size="input"``: back at the input's size."""
        fields = {k: v for k, v in locals().items()
                  if k not in ("self", "image", "instruction", "idempotency_key", "wait", "extra")}
        request = self._ip2p_request(instruction, {**fields, **extra})
        return self.submit(request, image=image, idempotency_key=idempotency_key, wait=wait)

    def get(self, edit: str | Edit) -> Edit:
        return Edit.model_validate(self._json(_Call("GET", f"/{API_VERSION}/edits/{_edit_id(edit)}")))

    def list(self, *, status: EditStatus | str | None = None, kind: str | None = None, model: str | None = None,
             limit: int | None = None, cursor: str | None = None) -> EditList:
        """One page of the caller's edits, newest first; pass ``next_cursor`` back for the next page."""
        params = self._list_params(status, kind, model, limit, cursor)
        return EditList.model_validate(self._json(_Call("GET", f"/{API_VERSION}/edits", params=params)))

    def iter_edits(self, **filters: Any) -> Iterator[Edit]:
        """Every matching edit, following cursors."""
        cursor = filters.pop("cursor", None)
        while True:
            page = self.list(cursor=cursor, **filters)
            yield from page.data
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def cancel(self, edit: str | Edit) -> Edit:
        return Edit.model_validate(self._json(_Call("POST", f"/{API_VERSION}/edits/{_edit_id(edit)}/cancel")))

    def models(self) -> list[ModelInfo]:
        return self._parse_models(self._json(_Call("GET", f"/{API_VERSION}/models")))

    def stream(self, edit: str | Edit, *, read_timeout: float = SSE_READ_TIMEOUT) -> Iterator[Edit]:
        """Each state of the edit as the server publishes it (SSE), ending with the terminal one.

        Reconnects after a dropped connection (the server starts every stream with the current state).
        """
        edit_id, last_revision, failures = _edit_id(edit), -1, 0
        while True:
            try:
                for state in self._stream_once(edit_id, read_timeout):
                    failures = 0
                    if state.revision < last_revision:
                        continue
                    last_revision = state.revision
                    yield state
                    if state.status.terminal:
                        return
            except (httpx.TransportError, errors.APIConnectionError):
                failures += 1
                if failures > self.retries:
                    raise
                time.sleep(_backoff(failures - 1))

    def _stream_once(self, edit_id: str, read_timeout: float, until: float | None = None) -> Iterator[Edit]:
        """One SSE connection; stops early once ``until`` (monotonic) passes, keep-alives included."""
        call = _Call("GET", f"/{API_VERSION}/edits/{edit_id}/events", headers={"accept": "text/event-stream"})
        request_kwargs = self._request_kwargs(call)
        request_kwargs["timeout"] = httpx.Timeout(self.timeout, read=read_timeout)
        response = self._send(request_kwargs, stream=True)
        try:
            decoder = _SSEDecoder()
            for line in response.iter_lines():
                frame = decoder.feed(line)
                if frame is not None and frame[1]:
                    yield Edit.model_validate_json(frame[1])
                if until is not None and time.monotonic() >= until:
                    return
        finally:
            response.close()

    def wait(self, edit: str | Edit, timeout: float | None = None, progress: bool | ProgressCallback = True,
             *, poll_interval: float = POLL_INTERVAL) -> Edit:
        """Block until the edit is terminal; return it if it succeeded.

        Raises EditFailed / EditCanceled (with the server's error) or WaitTimeout. ``progress=True`` draws a
        progress line on an interactive stderr; a callable receives every state instead.
        """
        edit_id = _edit_id(edit)
        report = progress_callback(progress)
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Edit | None = edit if isinstance(edit, Edit) else None
        use_events = True
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise errors.WaitTimeout(f"edit {edit_id} not finished after {timeout} s", last)
            if use_events:
                read_timeout = SSE_READ_TIMEOUT if remaining is None else max(0.1, min(remaining, SSE_READ_TIMEOUT))
                try:
                    for state in self._stream_once(edit_id, read_timeout, deadline):
                        last = state
                        if report:
                            report(state)
                        if state.status.terminal:
                            return _raise_if_ended(state)
                except errors.APIError as exc:
                    if exc.status not in NO_EVENTS_STATUSES:
                        raise
                    use_events = False  # the events route is missing: poll (get() raises a real 404)
                except (httpx.TransportError, errors.APIConnectionError):
                    pass
            # The stream ended without a terminal state, broke, or is unavailable: poll once, then go on.
            state = self.get(edit_id)
            last = state
            if report:
                report(state)
            if state.status.terminal:
                return _raise_if_ended(state)
            pause = poll_interval if remaining is None else min(poll_interval, max(0.0, remaining))
            time.sleep(pause)

    def download(self, edit: str | Edit, folder: str | os.PathLike, *, attention_maps: bool = True) -> list[Path]:
        """Save the results (and attention maps) of a finished edit into ``folder``; return the paths.

        Expired presigned URLs are refreshed once by fetching the edit again.
        """
        current = edit if isinstance(edit, Edit) else self.get(edit)
        target = _folder(folder)
        return self._save(_download_plan(current, target, attention_maps),
                          lambda: _download_plan(self.get(current.id), target, attention_maps))

    # -- inversions (a real photo, so P2P can edit it) --------------------------------------------------

    def invert(self, image: ImageInput, caption: str, *, model: str | None = None, method: str | None = None,
               steps: int | None = None, guidance_scale: float | None = None, num_inner_steps: int | None = None,
               early_stop_epsilon: float | None = None, resolution: int | None = None,
               webhook: str | WebhookSpec | Mapping[str, Any] | None = None, priority: str | None = None,
               metadata: dict[str, str] | None = None, idempotency_key: str | None = None,
               **extra: Any) -> Inversion:
        """Invert a photo (path, bytes, file or PIL image) and its caption on the server; returns the queued
        :class:`Inversion`. ``method``: ``null-text`` (default), ``ddim`` or ``negative-prompt``. Follow it with
        :meth:`wait_inversion`, then edit it with ``submit_p2p(caption, targets, inversion=...)``."""
        fields = {k: v for k, v in locals().items() if k not in ("self", "image", "caption", "idempotency_key", "extra")}
        call = self._invert_call(image, caption, {**fields, **extra}, idempotency_key)
        return Inversion.model_validate(self._json(call))

    def get_inversion(self, inversion: str | Inversion) -> Inversion:
        return Inversion.model_validate(self._json(_Call("GET", f"/{API_VERSION}/inversions/{_inversion_id(inversion)}")))

    def list_inversions(self, *, status: EditStatus | str | None = None, limit: int | None = None,
                        cursor: str | None = None) -> InversionList:
        """One page of the caller's inversions, newest first; pass ``next_cursor`` back for the next page."""
        params = self._list_params(status, None, None, limit, cursor)
        return InversionList.model_validate(self._json(_Call("GET", f"/{API_VERSION}/inversions", params=params)))

    def cancel_inversion(self, inversion: str | Inversion) -> Inversion:
        """Stop an inversion (it stops at its next step or inner iteration); edits cannot use it afterwards."""
        path = f"/{API_VERSION}/inversions/{_inversion_id(inversion)}/cancel"
        return Inversion.model_validate(self._json(_Call("POST", path)))

    def wait_inversion(self, inversion: str | Inversion, timeout: float | None = None,
                       progress: bool | InversionProgressCallback = True, *,
                       poll_interval: float = POLL_INTERVAL) -> Inversion:
        """Poll until the inversion is terminal; return it if it succeeded (raises InversionFailed /
        InversionCanceled / WaitTimeout). ``progress`` as for :meth:`wait`: the line shows DDIM steps and the
        null-text inner iterations."""
        inversion_id = _inversion_id(inversion)
        report = progress_callback(progress)
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Inversion | None = inversion if isinstance(inversion, Inversion) else None
        while True:
            state = self.get_inversion(inversion_id)
            last = state
            if report:
                report(state)
            if state.status.terminal:
                return _raise_if_inversion_ended(state)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise errors.WaitTimeout(f"inversion {inversion_id} not finished after {timeout} s", last)
            time.sleep(poll_interval if remaining is None else min(poll_interval, remaining))

    def download_inversion(self, inversion: str | Inversion, folder: str | os.PathLike, *,
                           arrays: bool = False) -> list[Path]:
        """Save a finished inversion's reconstruction (``{id}-reconstruction.png``; with ``arrays`` also
        ``{id}-inversion.safetensors``) into ``folder``; return the paths."""
        current = inversion if isinstance(inversion, Inversion) and inversion.result else self.get_inversion(inversion)
        target = _folder(folder)
        return self._save(_inversion_plan(current, target, arrays),
                          lambda: _inversion_plan(self.get_inversion(current.id), target, arrays))

    def _save(self, plan: list[_Download], refresh: Callable[[], list[_Download]]) -> list[Path]:
        """Fetch and write each planned file; an expired presigned URL (400/401/403) is replaced once by the same
        entry of ``refresh()``, the plan of the record fetched again."""
        saved: list[Path] = []
        for index, item in enumerate(plan):
            try:
                content = self._fetch(item.url)
            except errors.APIError as exc:
                if exc.status not in (400, 401, 403):
                    raise
                content = self._fetch(refresh()[index].url)
            _write_atomically(item.path, content)
            saved.append(item.path)
        return saved

    def _fetch(self, url: str) -> bytes:
        if self._is_api_url(url):
            return self._send(_Call("GET", url)).content
        attempt = 0
        while True:
            response = None
            try:
                response = self._files.get(url)
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise _transport_error(exc) from exc
            else:
                if response.status_code not in RETRY_STATUSES or attempt >= self.retries:
                    if response.is_error:
                        raise error_from_response(response)
                    return response.content
            time.sleep(_retry_wait(attempt, response))
            attempt += 1


# ------------------------------------------------------------------------------------------------ async client

class AsyncClient(AsyncDatasetMethods, _ClientCore):
    """The asyncio twin of :class:`Client`: same methods, awaited; ``stream`` is an async iterator."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
                 headers: Mapping[str, str] | None = None, transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(base_url, api_key, timeout, retries, headers)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=timeout,
                                       transport=transport)
        self._files = httpx.AsyncClient(timeout=timeout, transport=transport, follow_redirects=True)

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._files.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, call: _Call | dict[str, Any], *, stream: bool = False) -> httpx.Response:
        request_kwargs = self._request_kwargs(call) if isinstance(call, _Call) else call
        attempt = 0
        while True:
            response = None
            try:
                response = await self._http.send(self._http.build_request(**request_kwargs), stream=stream)
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise _transport_error(exc) from exc
            else:
                if response.status_code not in RETRY_STATUSES or attempt >= self.retries:
                    if response.is_error:
                        await response.aread()
                        await response.aclose()
                        raise error_from_response(response)
                    return response
                await response.aclose()
            await asyncio.sleep(_retry_wait(attempt, response))
            attempt += 1

    async def _json(self, call: _Call) -> Any:
        return (await self._send(call)).json()

    async def submit(self, request: EditRequest | Mapping[str, Any], *, image: ImageInput | None = None,
                     idempotency_key: str | None = None, wait: int | None = None) -> Edit:
        return Edit.model_validate(await self._json(self._submit_call(request, image, idempotency_key, wait)))

    async def submit_p2p(self, source_prompt: str, target_prompts: str | Sequence[str], *, edit: str | None = None,
                         reweight: dict[str, float] | list[dict[str, float]] | None = None,
                         local_blend: LocalBlend | Mapping[str, Any] | None = None, cross_replace_steps: Any = None,
                         self_replace_steps: Any = None, attention_maps: bool | list[int] | None = None,
                         steps: int | None = None, size: int | None = None, height: int | None = None,
                         width: int | None = None, guidance_scale: float | None = None, model: str | None = None,
                         seed: int | None = None, num_outputs: int | None = None,
                         seeds: Sequence[int] | None = None, scheduler: str | None = None,
                         webhook: str | WebhookSpec | Mapping[str, Any] | None = None, priority: str | None = None,
                         metadata: dict[str, str] | None = None, inversion: str | Inversion | None = None,
                         idempotency_key: str | None = None, wait: int | None = None, **extra: Any) -> Edit:
        fields = {k: v for k, v in locals().items()
                  if k not in ("self", "source_prompt", "target_prompts", "idempotency_key", "wait", "extra")}
        request = self._p2p_request(source_prompt, target_prompts, {**fields, **extra})
        return await self.submit(request, idempotency_key=idempotency_key, wait=wait)

    async def submit_ip2p(self, image: ImageInput | None, instruction: str, *, text_guidance: float | None = None,
                          image_guidance: float | None = None, resolution: int | None = None,
                          sweep: Sweep | Mapping[str, Any] | None = None, steps: int | None = None,
                          model: str | None = None, seed: int | None = None, num_outputs: int | None = None,
                          seeds: Sequence[int] | None = None, output_size: str | None = None,
                          scheduler: str | None = None,
                          webhook: str | WebhookSpec | Mapping[str, Any] | None = None, priority: str | None = None,
                          metadata: dict[str, str] | None = None, idempotency_key: str | None = None,
                          wait: int | None = None, **extra: Any) -> Edit:
        fields = {k: v for k, v in locals().items()
                  if k not in ("self", "image", "instruction", "idempotency_key", "wait", "extra")}
        request = self._ip2p_request(instruction, {**fields, **extra})
        return await self.submit(request, image=image, idempotency_key=idempotency_key, wait=wait)

    async def get(self, edit: str | Edit) -> Edit:
        return Edit.model_validate(await self._json(_Call("GET", f"/{API_VERSION}/edits/{_edit_id(edit)}")))

    async def list(self, *, status: EditStatus | str | None = None, kind: str | None = None,
                   model: str | None = None, limit: int | None = None, cursor: str | None = None) -> EditList:
        params = self._list_params(status, kind, model, limit, cursor)
        return EditList.model_validate(await self._json(_Call("GET", f"/{API_VERSION}/edits", params=params)))

    async def iter_edits(self, **filters: Any) -> AsyncIterator[Edit]:
        cursor = filters.pop("cursor", None)
        while True:
            page = await self.list(cursor=cursor, **filters)
            for item in page.data:
                yield item
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def cancel(self, edit: str | Edit) -> Edit:
        return Edit.model_validate(await self._json(_Call("POST", f"/{API_VERSION}/edits/{_edit_id(edit)}/cancel")))

    async def models(self) -> list[ModelInfo]:
        return self._parse_models(await self._json(_Call("GET", f"/{API_VERSION}/models")))

    async def stream(self, edit: str | Edit, *, read_timeout: float = SSE_READ_TIMEOUT) -> AsyncIterator[Edit]:
        edit_id, last_revision, failures = _edit_id(edit), -1, 0
        while True:
            try:
                async for state in self._stream_once(edit_id, read_timeout):
                    failures = 0
                    if state.revision < last_revision:
                        continue
                    last_revision = state.revision
                    yield state
                    if state.status.terminal:
                        return
            except (httpx.TransportError, errors.APIConnectionError):
                failures += 1
                if failures > self.retries:
                    raise
                await asyncio.sleep(_backoff(failures - 1))

    async def _stream_once(self, edit_id: str, read_timeout: float,
                           until: float | None = None) -> AsyncIterator[Edit]:
        call = _Call("GET", f"/{API_VERSION}/edits/{edit_id}/events", headers={"accept": "text/event-stream"})
        request_kwargs = self._request_kwargs(call)
        request_kwargs["timeout"] = httpx.Timeout(self.timeout, read=read_timeout)
        response = await self._send(request_kwargs, stream=True)
        try:
            decoder = _SSEDecoder()
            async for line in response.aiter_lines():
                frame = decoder.feed(line)
                if frame is not None and frame[1]:
                    yield Edit.model_validate_json(frame[1])
                if until is not None and time.monotonic() >= until:
                    return
        finally:
            await response.aclose()

    async def wait(self, edit: str | Edit, timeout: float | None = None, progress: bool | ProgressCallback = True,
                   *, poll_interval: float = POLL_INTERVAL) -> Edit:
        edit_id = _edit_id(edit)
        report = progress_callback(progress)
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Edit | None = edit if isinstance(edit, Edit) else None
        use_events = True
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise errors.WaitTimeout(f"edit {edit_id} not finished after {timeout} s", last)
            if use_events:
                read_timeout = SSE_READ_TIMEOUT if remaining is None else max(0.1, min(remaining, SSE_READ_TIMEOUT))
                try:
                    async for state in self._stream_once(edit_id, read_timeout, deadline):
                        last = state
                        if report:
                            report(state)
                        if state.status.terminal:
                            return _raise_if_ended(state)
                except errors.APIError as exc:
                    if exc.status not in NO_EVENTS_STATUSES:
                        raise
                    use_events = False
                except (httpx.TransportError, errors.APIConnectionError):
                    pass
            state = await self.get(edit_id)
            last = state
            if report:
                report(state)
            if state.status.terminal:
                return _raise_if_ended(state)
            pause = poll_interval if remaining is None else min(poll_interval, max(0.0, remaining))
            await asyncio.sleep(pause)

    async def download(self, edit: str | Edit, folder: str | os.PathLike, *,
                       attention_maps: bool = True) -> list[Path]:
        current = edit if isinstance(edit, Edit) else await self.get(edit)
        target = _folder(folder)

        async def refresh() -> list[_Download]:
            return _download_plan(await self.get(current.id), target, attention_maps)

        return await self._save(_download_plan(current, target, attention_maps), refresh)

    async def invert(self, image: ImageInput, caption: str, *, model: str | None = None, method: str | None = None,
                     steps: int | None = None, guidance_scale: float | None = None,
                     num_inner_steps: int | None = None, early_stop_epsilon: float | None = None,
                     resolution: int | None = None, webhook: str | WebhookSpec | Mapping[str, Any] | None = None,
                     priority: str | None = None, metadata: dict[str, str] | None = None,
                     idempotency_key: str | None = None, **extra: Any) -> Inversion:
        fields = {k: v for k, v in locals().items() if k not in ("self", "image", "caption", "idempotency_key", "extra")}
        call = self._invert_call(image, caption, {**fields, **extra}, idempotency_key)
        return Inversion.model_validate(await self._json(call))

    async def get_inversion(self, inversion: str | Inversion) -> Inversion:
        path = f"/{API_VERSION}/inversions/{_inversion_id(inversion)}"
        return Inversion.model_validate(await self._json(_Call("GET", path)))

    async def list_inversions(self, *, status: EditStatus | str | None = None, limit: int | None = None,
                              cursor: str | None = None) -> InversionList:
        params = self._list_params(status, None, None, limit, cursor)
        return InversionList.model_validate(await self._json(_Call("GET", f"/{API_VERSION}/inversions",
                                                                   params=params)))

    async def cancel_inversion(self, inversion: str | Inversion) -> Inversion:
        path = f"/{API_VERSION}/inversions/{_inversion_id(inversion)}/cancel"
        return Inversion.model_validate(await self._json(_Call("POST", path)))

    async def wait_inversion(self, inversion: str | Inversion, timeout: float | None = None,
                             progress: bool | InversionProgressCallback = True, *,
                             poll_interval: float = POLL_INTERVAL) -> Inversion:
        inversion_id = _inversion_id(inversion)
        report = progress_callback(progress)
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Inversion | None = inversion if isinstance(inversion, Inversion) else None
        while True:
            state = await self.get_inversion(inversion_id)
            last = state
            if report:
                report(state)
            if state.status.terminal:
                return _raise_if_inversion_ended(state)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise errors.WaitTimeout(f"inversion {inversion_id} not finished after {timeout} s", last)
            await asyncio.sleep(poll_interval if remaining is None else min(poll_interval, remaining))

    async def download_inversion(self, inversion: str | Inversion, folder: str | os.PathLike, *,
                                 arrays: bool = False) -> list[Path]:
        current = (inversion if isinstance(inversion, Inversion) and inversion.result
                   else await self.get_inversion(inversion))
        target = _folder(folder)

        async def refresh() -> list[_Download]:
            return _inversion_plan(await self.get_inversion(current.id), target, arrays)

        return await self._save(_inversion_plan(current, target, arrays), refresh)

    async def _save(self, plan: list[_Download], refresh: Callable[[], Awaitable[list[_Download]]]) -> list[Path]:
        """As :meth:`Client._save`: an expired presigned URL is replaced once from the record fetched again."""
        saved: list[Path] = []
        for index, item in enumerate(plan):
            try:
                content = await self._fetch(item.url)
            except errors.APIError as exc:
                if exc.status not in (400, 401, 403):
                    raise
                content = await self._fetch((await refresh())[index].url)
            _write_atomically(item.path, content)
            saved.append(item.path)
        return saved

    async def _fetch(self, url: str) -> bytes:
        if self._is_api_url(url):
            return (await self._send(_Call("GET", url))).content
        attempt = 0
        while True:
            response = None
            try:
                response = await self._files.get(url)
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise _transport_error(exc) from exc
            else:
                if response.status_code not in RETRY_STATUSES or attempt >= self.retries:
                    if response.is_error:
                        raise error_from_response(response)
                    return response.content
            await asyncio.sleep(_retry_wait(attempt, response))
            attempt += 1


__all__ = ["AsyncClient", "Client", "DEFAULT_BASE_URL", "ENV_API_KEY", "ENV_BASE_URL", "validate_request",
           "verify_webhook"]
