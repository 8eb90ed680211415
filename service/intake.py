"""Reading a POST /v1/edits body and its image safely: bounded reads, then Pillow checks.

Why bounded: a client can announce or stream any number of bytes; we stop at the limit instead of
buffering them. Why decode fully: ``verify()`` alone misses truncated data, and a decompression bomb must
be refused from its header before a single pixel is allocated.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

from PIL import Image, UnidentifiedImageError
from starlette.requests import Request

from editserve.contract import MAX_PROMPT_WORDS
from service import egress
from service.config import ImageUrlSettings, LimitsSettings
from editserve.contract import ErrorType
from service.errors import ApiError, invalid
from service.imaging import to_rgb

T = TypeVar("T")
MULTIPART_OVERHEAD_BYTES = 1024 * 1024  # the JSON `request` part and multipart framing
MAX_JSON_SEPARATORS = 50_000
"""Commas and colons a request body may hold: a legal edit has a few thousand at most (prompts of at most 77
tokens, per-word lists bounded by the contract); this bounds what ``json.loads`` builds before any check."""
MAX_CONTAINER_ENTRIES = MAX_PROMPT_WORDS + 1
"""No list or object of a legal request has more entries (the longest: per-word step ranges plus default_)."""
_FORMAT_ALIASES = {"MPO": "JPEG"}  # phone cameras write multi-picture JPEGs; the first picture is a JPEG
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # the only way JSON text can carry a lone surrogate
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*;base64,", re.IGNORECASE)


def max_body_bytes(limits: LimitsSettings) -> int:
    """Largest body accepted: a base64 image (4/3 of the image cap) plus the JSON around it."""
    return limits.max_image_bytes * 4 // 3 + MULTIPART_OVERHEAD_BYTES


def too_large(what: str, limit: int, field: str | None = None) -> ApiError:
    return ApiError(413, f"{what} is larger than the limit of {limit} bytes", type=ErrorType.payload_too_large, field=field)


async def read_body_limited(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as the Content-Length or the streamed bytes exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large("request body", limit)
        except ValueError:
            raise ApiError(400, "invalid Content-Length header", type=ErrorType.bad_request)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise too_large("request body", limit)
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class EditBody:
    """The request JSON object and the raw image bytes, wherever they came from."""

    data: dict[str, Any]
    image_bytes: bytes | None
    image_source: str | None  # "multipart" | "base64" | "url" | None


def parse_json_object(raw: bytes | str, what: str = "request body") -> dict[str, Any]:
    """A JSON object; NaN/Infinity literals parse (pydantic then refuses them naming the field), but text
    that cannot be stored as UTF-8 (a lone ``\\ud800`` escape) is refused here, naming where it is."""
    separators = raw.count(b",") + raw.count(b":") if isinstance(raw, bytes) else raw.count(",") + raw.count(":")
    if separators > MAX_JSON_SEPARATORS:  # counted at memory speed, before json.loads allocates every element
        raise ApiError(413, f"{what} has {separators} JSON separators; at most {MAX_JSON_SEPARATORS} are accepted",
                       type=ErrorType.payload_too_large)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, f"{what} is not valid JSON: {exc}", type=ErrorType.malformed_json)
    if not isinstance(data, dict):
        raise invalid(None, f"{what} must be a JSON object")
    oversized = oversized_container(data)
    if oversized is not None:
        path, size = oversized
        raise invalid(path or None, f"{path or what} has {size} entries; at most {MAX_CONTAINER_ENTRIES} are "
                                    "accepted in any list or mapping of a request")
    suspect = isinstance(raw, str) or _SURROGATE_ESCAPE.search(raw)  # a str part may hold any code point
    where = unencodable_text(data) if suspect else None
    if where is not None:
        raise invalid(where or None, f"{where or what} holds an unpaired UTF-16 surrogate escape; "
                                     "text must be valid Unicode")
    return data


def oversized_container(value: Any, limit: int = MAX_CONTAINER_ENTRIES) -> tuple[str, int] | None:
    """(dotted path, size) of the first list or object with more than ``limit`` entries, else None.

    Why before pydantic: pydantic validates every key of a mapping before it checks the mapping's length (a
    690k-key ``reweight`` cost seconds of CPU on the event loop); ``len`` costs nothing. Iterative (deep
    nesting) and never descends into an oversized container, so the cost is bounded by the request's size.
    """
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict | list):
            if len(item) > limit:
                return path, len(item)
            children = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend((child, f"{path}.{key}" if path else str(key)) for key, child in children
                         if isinstance(child, dict | list))
    return None


def unencodable_text(value: Any) -> str | None:
    """The dotted path of the first string (or the object holding a key) that is not valid Unicode, else None.

    Iterative: a body nested as deep as ``json`` parses must not exhaust the stack here.
    """
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                return path
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                if not _encodable(key):
                    return path
                stack.append((child, f"{path}.{key}" if path else str(key)))
        elif isinstance(item, list):
            stack.extend((child, f"{path}.{i}" if path else str(i)) for i, child in reversed(list(enumerate(item))))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def decode_base64_image(value: str, limits: LimitsSettings) -> bytes:
    """Plain base64 or a ``data:image/...;base64,`` URL → bytes, refusing oversize before decoding."""
    match = _DATA_URL.match(value)
    if match:
        value = value[match.end():]
    elif value.startswith("data:"):
        raise invalid("image", "data: URLs must be base64-encoded (data:image/png;base64,...)")
    value = "".join(value.split())
    if len(value) * 3 // 4 > limits.max_image_bytes + 3:
        raise too_large("image", limits.max_image_bytes, "image")
    try:
        data = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise invalid("image", "image is not valid base64 (or a data: URL)")
    if len(data) > limits.max_image_bytes:
        raise too_large("image", limits.max_image_bytes, "image")
    return data


async def parse_edit_body(request: Request, body: bytes, limits: LimitsSettings) -> EditBody:
    """JSON (image inline as base64) or multipart/form-data (``request`` JSON part + ``image`` file part)."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type in ("application/json", "") or content_type.endswith("+json"):
        data = parse_json_object(body)
        image = data.get("image")
        if isinstance(image, str) and image:
            data = {k: v for k, v in data.items() if k != "image"}
            return EditBody(data, decode_base64_image(image, limits), "base64")
        return EditBody(data, None, None)
    if content_type == "multipart/form-data":
        return await _parse_multipart(request, body, limits)
    raise ApiError(415, f"unsupported Content-Type {content_type!r}; send application/json or multipart/form-data",
                   type=ErrorType.unsupported_media_type)


async def _parse_multipart(request: Request, body: bytes, limits: LimitsSettings) -> EditBody:
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=4,
                                                         max_part_size=MULTIPART_OVERHEAD_BYTES)
    except Exception as exc:  # python-multipart / starlette raise several types for bad framing
        raise ApiError(400, f"malformed multipart body: {getattr(exc, 'detail', exc)}", type=ErrorType.bad_request)
    try:
        raw_request = form.get("request")
        if raw_request is None:
            raise invalid("request", "multipart body needs a `request` part holding the JSON request")
        if not isinstance(raw_request, str):
            raw_request = (await raw_request.read()).decode("utf-8", "replace")
        data = parse_json_object(raw_request, "the `request` part")
        upload = form.get("image")
        if upload is None:
            return EditBody(data, None, None)
        if isinstance(upload, str):
            return EditBody(data, decode_base64_image(upload, limits), "base64")
        image_bytes = await upload.read(limits.max_image_bytes + 1)
        if len(image_bytes) > limits.max_image_bytes:
            raise too_large("image", limits.max_image_bytes, "image")
        if "image" in data:
            raise invalid("image", "send the image either as the `image` file part or inline, not both")
        return EditBody(data, image_bytes, "multipart")
    finally:
        await form.close()


FETCH_HEADERS = {"Accept": "image/png, image/jpeg, image/webp, image/*;q=0.8", "Accept-Encoding": "identity",
                 "User-Agent": "editserve-image-fetch/1"}


@lru_cache(maxsize=4)
def _tls_context(ca_bundle: str | None) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True


async def fetch_image_url(url: str, settings: ImageUrlSettings, limits: LimitsSettings,
                          resolver: egress.Resolver = egress.system_resolver) -> bytes:
    """The bytes behind an ``image_url``, fetched under the webhook egress guard; 4xx naming ``image_url``
    otherwise: not https, a private or reserved address (directly or after a redirect), too many redirects, a
    non-200 answer, more than ``limits.max_image_bytes`` (413), or slower than ``settings.timeout_seconds``."""
    if not settings.enabled:
        raise invalid("image_url", "image_url is disabled on this server; send the image inline or as a file")
    allow = egress.AllowList.parse(settings.allow_hosts)
    try:
        async with egress.new_async_client(_tls_context(settings.ca_bundle)) as client:
            client.timeout = settings.timeout_seconds
            fetched = await egress.fetch_bounded(
                url, allow, client=client, max_bytes=limits.max_image_bytes, timeout=settings.timeout_seconds,
                max_redirects=settings.max_redirects, resolver=resolver, headers=FETCH_HEADERS)
    except egress.DestinationRefused as exc:
        raise invalid("image_url", f"image_url refused: {exc}")
    except egress.FetchFailed as exc:
        if exc.too_large:
            raise ApiError(413, f"image_url {exc}", type=ErrorType.payload_too_large, field="image_url")
        raise invalid("image_url", f"image_url could not be fetched: {exc}")
    if not fetched.body:
        raise invalid("image_url", "image_url answered an empty body")
    return fetched.body


async def fetch_image_input(parsed: EditBody, image_url: str | None, settings: ImageUrlSettings,
                            limits: LimitsSettings) -> None:
    """Fill ``parsed`` with the image behind ``image_url`` (when the request has one): refused when the body
    carries an image too."""
    if image_url is None:
        return
    if parsed.image_bytes is not None:
        raise invalid("image_url", "send the image once: image_url, or `image` inline or as a file")
    parsed.image_bytes = await fetch_image_url(image_url, settings, limits)
    parsed.image_source = "url"


def blame_image_url(parsed: EditBody, exc: ApiError) -> ApiError:
    """An error about a fetched image names ``image_url``, the field the client sent."""
    if parsed.image_source == "url" and exc.field == "image":
        exc.field, exc.message = "image_url", f"image_url: the fetched file: {exc.message}"
    return exc


class DecodeGate:
    """Image work (decode, convert, resize, encode) on ``slots`` dedicated threads; a request waits
    ``wait_seconds`` for one, then gets 503 + Retry-After.

    Why: a small file can hold a large picture (a one-colour PNG of 40 MP is a few kB and decodes to
    ~120 MB, plus copies while it is converted); eight at once took the gateway past 3 GB. Why dedicated
    threads and not just a semaphore: the allocator keeps freed pixel memory in per-thread arenas, so decodes
    spread over the request thread pool left one picture's worth resident per thread. The worst case is
    ``slots`` decodes of ``limits.max_image_pixels`` (README, "Limits and security").
    """

    def __init__(self, slots: int, wait_seconds: float):
        self._slots = threading.BoundedSemaphore(slots)
        self._threads = ThreadPoolExecutor(slots, thread_name_prefix="editserve-decode")
        self.wait_seconds = wait_seconds

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a decode thread, blocking the caller (a request's worker thread) until it is done."""
        if not self._slots.acquire(timeout=self.wait_seconds):
            raise ApiError(503, "too many images are being decoded right now; retry shortly",
                           type=ErrorType.decoder_busy, headers={"Retry-After": "1"})
        try:
            return self._threads.submit(fn, *args).result()
        finally:
            self._slots.release()


def probe_image(data: bytes, limits: LimitsSettings) -> tuple[int, int]:
    """(width, height) from the header after the cheap checks (size, format allow-list, pixel count): nothing
    is decoded, so a refusal costs microseconds."""
    if len(data) > limits.max_image_bytes:
        raise too_large("image", limits.max_image_bytes, "image")
    if not data:
        raise invalid("image", "image is empty")
    try:
        probe = Image.open(io.BytesIO(data))
        fmt = (probe.format or "").upper()
        fmt = _FORMAT_ALIASES.get(fmt, fmt)
        allowed = [f.upper() for f in limits.image_formats]
        if fmt not in allowed:
            raise ApiError(415, f"image format {fmt or 'unknown'} is not accepted; use one of {', '.join(allowed)}",
                           type=ErrorType.unsupported_media_type, field="image")
        width, height = probe.size
        if width * height > limits.max_image_pixels:
            raise invalid("image", f"image has {width}x{height} = {width * height} pixels; "
                                   f"at most {limits.max_image_pixels} are accepted")
        return width, height
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # Pillow's guard, at open
        raise invalid("image", f"image exceeds {limits.max_image_pixels} pixels (decompression bomb guard: {exc})")
    except UnidentifiedImageError:
        raise invalid("image", "image is not a recognised image file")
    except Exception as exc:  # noqa: BLE001 — malformed headers raise struct.error, IndexError, ... from Pillow
        raise invalid("image", f"image could not be read: {type(exc).__name__}: {exc}"[:300])


def load_image(data: bytes, limits: LimitsSettings) -> Image.Image:
    """Validate and decode an upload: size, format allow-list, pixel count, full decode → upright RGB.
    Callers decoding for a request run it, and what they derive from it, through a :class:`DecodeGate`."""
    probe_image(data, limits)
    try:
        Image.open(io.BytesIO(data)).verify()
        image = Image.open(io.BytesIO(data))  # verify() leaves the file unusable: reopen to decode
        image.seek(0)  # animated formats: the first frame
        image.load()
        return to_rgb(image)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # Pillow's guard, at open
        raise invalid("image", f"image exceeds {limits.max_image_pixels} pixels (decompression bomb guard: {exc})")
    except UnidentifiedImageError:
        raise invalid("image", "image is not a recognised image file")
    except Exception as exc:  # noqa: BLE001 — malformed files raise struct.error, IndexError, ... from Pillow
        raise invalid("image", f"image could not be decoded: {type(exc).__name__}: {exc}"[:300])


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
