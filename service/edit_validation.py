"""Everything the gateway checks and resolves between the parsed request and ``JobStore.create``.

Why here and not in the worker: a bad request must be a 4xx naming the field *before* it costs queue
time or GPU time. Pydantic already checked types and ranges (editserve.contract); this adds what needs
the model catalog, the tokenizer or the image: model kind, prompt length in CLIP tokens, P2P word rules,
size caps, the official IP2P resize. Then every default is resolved so the worker runs exactly what
``Edit.params`` shows.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from datetime import datetime

from pydantic import TypeAdapter, ValidationError

from editserve.contract import (
    SEED_MAX,
    BatchKey,
    EditRequest,
    InversionOptions,
    IP2PEditRequest,
    JobPayload,
    P2PEditRequest,
    WebhookSpec,
)
from editserve.kinds import edit_kind
from service import egress
from service.config import ModelSpec, Settings
from editserve.contract import ErrorType
from service.errors import ApiError, from_pydantic, invalid
from service.imaging import fitting_resolution, official_resize, official_resize_dims
from service.intake import DecodeGate, load_image, png_bytes, probe_image
from service.prompt_tokens import PromptTokenCounter
from service.storage import input_key

_EDIT_REQUEST = TypeAdapter(EditRequest)
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# CLIP's pre-tokenizer: BPE never merges across these pieces, so comparing piece sequences is exact.
_PRE_TOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


@dataclass
class Submission:
    """A validated request, ready to store and enqueue."""

    payload: JobPayload
    webhook: WebhookSpec | None
    fingerprint: str
    input_png: bytes | None


def parse_request(data: dict) -> EditRequest:
    """The request model, strictly typed: ``"steps": "2"`` or ``true`` is refused, never coerced. Validated as
    JSON (which ``data`` came from) because strict JSON reads an array as a ``[start, end]`` pair."""
    try:
        return _EDIT_REQUEST.validate_json(json.dumps(data), strict=True)
    except ValidationError as exc:
        raise from_pydantic(exc)


def text2image_spec(settings: Settings, name: str | None, purpose: str) -> ModelSpec:
    """The named (default: the P2P default) model, which must generate from text; ``purpose`` ends the refusal
    ("cannot {purpose}")."""
    catalog = settings.model_catalog()
    name = name or settings.default_p2p_model
    spec = catalog.get(name)
    if spec is None:
        raise invalid("model", f"unknown model {name!r}; available: {', '.join(sorted(catalog))}")
    if spec.kind != "text2image":
        raise invalid("model", f"model {name!r} ({spec.kind}) cannot {purpose}; use a text2image model")
    return spec


def resolve_model(request: EditRequest, settings: Settings) -> ModelSpec:
    catalog = settings.model_catalog()
    kind = edit_kind(request.kind)
    name = request.model or getattr(settings, kind.default_model_setting)
    spec = catalog.get(name)
    if spec is None:
        raise invalid("model", f"unknown model {name!r}; available: {', '.join(sorted(catalog))}")
    if spec.kind != kind.model_kind:
        usable = sorted(n for n, s in catalog.items() if s.kind == kind.model_kind)
        raise invalid("model", f"model {name!r} ({spec.kind}) cannot run {request.kind} edits; "
                               f"use one of {', '.join(usable)}")
    return spec


def prompts_with_fields(request: EditRequest) -> list[tuple[str, str]]:
    if isinstance(request, P2PEditRequest):
        return [("source_prompt", request.source_prompt)] + [
            (f"target_prompts.{i}", p) for i, p in enumerate(request.target_prompts)] + negative_prompt_field(request)
    return [("instruction", request.instruction)] + negative_prompt_field(request)


def negative_prompt_field(request: EditRequest) -> list[tuple[str, str]]:
    """The negative prompt obeys the same character and token rules as the prompts (it is encoded alike)."""
    return [("negative_prompt", request.negative_prompt)] if request.negative_prompt else []


def forbidden_prompt_character(text: str) -> str | None:
    """The first character a prompt may not hold: controls (C0/C1, incl. tab and newline), line/paragraph
    separators, unpaired surrogates, and every invisible format character (Unicode category Cf: bidi marks and
    overrides, U+061C, zero-width space/joiners, BOM, U+2060, tag characters): they make a prompt display
    differently from what the tokenizer reads, or hide text in it. None when the prompt is clean."""
    for ch in text:
        if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES or ch in _BIDI_CONTROLS:
            return ch
    return None


def check_prompts(request: EditRequest, spec: ModelSpec, counter: PromptTokenCounter, max_tokens: int) -> None:
    for field, text in prompts_with_fields(request):
        ch = forbidden_prompt_character(text)
        if ch is not None:
            raise invalid(field, f"{field} contains the control or invisible character U+{ord(ch):04X}; "
                                 "prompts must be plain visible text on one line")
        count = counter.count(spec, text)
        if count.tokens > max_tokens:
            raise invalid(field, f"{field} has {count.tokens} CLIP tokens including start/end "
                                 f"(counted by {count.method}); the limit is {max_tokens}")


@lru_cache(maxsize=256)
def pre_tokens(text: str) -> tuple[str, ...]:
    """CLIP's pre-tokenizer pieces, cached: every word of a per-word list is looked up in the same prompts."""
    return tuple(_PRE_TOKEN.findall(text.lower()))


def contains_word(prompt: str, word: str) -> bool:
    """Whether ``word`` (or phrase) occurs in ``prompt`` as CLIP sees it: case-insensitive, whole pieces."""
    needle, hay = pre_tokens(word), pre_tokens(prompt)
    n = len(needle)
    return n > 0 and any(hay[i:i + n] == needle for i in range(len(hay) - n + 1))


def _require_words(words: list[str], prompt: str, field: str, which: str) -> None:
    for word in words:
        if not contains_word(prompt, word):
            raise invalid(field, f"{field}: {word!r} is not a word of the {which} {prompt!r}")


def check_p2p_words(request: P2PEditRequest) -> None:
    source, targets = request.source_prompt, request.target_prompts
    if request.edit == "replace":
        n_source = len(source.split())
        for i, target in enumerate(targets):
            n_target = len(target.split())
            if n_target != n_source:
                raise invalid(f"target_prompts.{i}",
                              f"target_prompts.{i}: a replace edit needs the same number of space-separated words; "
                              f"the source prompt has {n_source} words, target {i} has {n_target}")
    if isinstance(request.reweight, dict):
        for i, target in enumerate(targets):
            _require_words(list(request.reweight), target, "reweight", f"target prompt {i}")
    elif isinstance(request.reweight, list):
        for i, (mapping, target) in enumerate(zip(request.reweight, targets)):
            _require_words(list(mapping), target, f"reweight.{i}", f"target prompt {i}")
    lb = request.local_blend
    if lb is not None:
        _require_words(lb.source_words, source, "local_blend.source_words", "source prompt")
        if lb.substruct_words:
            _require_words(lb.substruct_words, source, "local_blend.substruct_words", "source prompt")
        if lb.target_words and isinstance(lb.target_words[0], list):
            for i, (words, target) in enumerate(zip(lb.target_words, targets)):
                _require_words(words, target, f"local_blend.target_words.{i}", f"target prompt {i}")
        else:
            for i, target in enumerate(targets):
                _require_words(lb.target_words, target, "local_blend.target_words", f"target prompt {i}")
    if isinstance(request.cross_replace_steps, dict):
        for word in request.cross_replace_steps:
            if word != "default_" and not any(contains_word(t, word) for t in targets):
                raise invalid("cross_replace_steps", f"cross_replace_steps: {word!r} is in no target prompt")


def check_webhook(webhook: WebhookSpec | None, settings: Settings) -> None:
    """Refuse what the sender would refuse without DNS (service.egress: scheme, credentials, literal
    non-global addresses in any notation, localhost), so submit-time and delivery-time rules agree; names
    are resolved and checked again on every delivery attempt (DNS may change, or rebind)."""
    if webhook is None:
        return
    try:
        egress.check_url_syntax(webhook.url, egress.AllowList.parse(settings.webhooks.allow_hosts))
    except egress.DestinationRefused as exc:
        raise invalid("webhook.url", f"webhook url refused: {exc}")


def ip2p_resolution(size: tuple[int, int], requested: int, spec: ModelSpec) -> int:
    """The resize resolution for an input of ``size``: the request's, capped by the model, lowered in steps of 64
    until no side of the result exceeds the model's ``max_size`` (so its pixels stay within max_size²); an
    aspect ratio that cannot fit is refused before anything is decoded."""
    width, height = size
    resolution = fitting_resolution(width, height, min(requested, spec.max_size), spec.max_size)
    if resolution is None:
        out_w, out_h = official_resize_dims(width, height, 64)
        raise invalid("image", f"image: a {width}x{height} picture resizes to at least {out_w}x{out_h} (sides are "
                               f"multiples of 64); model {spec.name!r} takes at most {spec.max_size} per side: "
                               f"crop it to an aspect ratio of at most {spec.max_size // 64}:1")
    return resolution


def normalised_input(image_bytes: bytes, settings: Settings,
                     resolution: int) -> tuple[int, int, bytes, tuple[int, int]]:
    """(width, height, PNG) of the upload after the official resize, and the upright upload's own (width, height)
    (EXIF orientation applied): the decoded picture lives only in here."""
    image = load_image(image_bytes, settings.limits)
    width, height = official_resize_dims(image.width, image.height, resolution)
    return width, height, png_bytes(official_resize(image, resolution)), (image.width, image.height)


def random_seed() -> int:
    return secrets.randbelow(SEED_MAX + 1)


def output_seeds(request: EditRequest) -> list[int]:
    """One seed per output: ``seeds`` as given, else ``num_outputs`` consecutive seeds from ``seed`` (random when
    omitted; wrapping past SEED_MAX), as AUTOMATIC1111 numbers a batch."""
    if request.seeds:
        return list(request.seeds)
    first = request.seed if request.seed is not None else random_seed()
    return [(first + i) % (SEED_MAX + 1) for i in range(request.num_outputs)]


def ip2p_seeds(request: IP2PEditRequest) -> list[int]:
    """One seed per sweep cell, cells ordered image_guidance × text_guidance × seeds (outer to inner).

    The seed axis is ``sweep.seeds``, else the outputs (``seeds`` / ``num_outputs``, see ``output_seeds``): every
    guidance cell shares it, so a guidance sweep compares guidance values on the same noise, as in the IP2P
    paper's grids.
    """
    image_axis, text_axis, _ = request.cells_axes()
    sweep = request.sweep
    axis = list(sweep.seeds) if sweep and sweep.seeds else output_seeds(request)
    return [s for _ in range(len(image_axis) * len(text_axis)) for s in axis]


InversionLookup = Callable[[str, str], "dict[str, str] | None"]
"""``(inversion_id, tenant)`` → the inversion's record (``service.editview.load_record``) or None."""


def from_inversion(request: P2PEditRequest, tenant: str, lookup: InversionLookup | None) -> P2PEditRequest:
    """A P2P edit naming ``inversion_id``: the tenant's succeeded inversion, its model, size, steps, scheduler and
    guidance as the edit's defaults, and any explicit value that differs refused naming its field."""
    if lookup is None:
        raise invalid("inversion_id", "this path cannot look inversions up")
    record = lookup(request.inversion_id, tenant)
    holds_one = record is not None and (record.get("kind") == "inversion" or bool(record.get("inversion")))
    if record is None or not holds_one or record.get("tenant") != tenant:
        raise ApiError(404, f"inversion_id: no inversion {request.inversion_id} of yours", type=ErrorType.not_found,
                       field="inversion_id")
    if record.get("status") != "succeeded":
        raise ApiError(409, f"inversion_id: inversion {request.inversion_id} is {record.get('status')}; an edit "
                            "needs a succeeded one", type=ErrorType.conflict, field="inversion_id")
    payload = json.loads(record["payload"])
    bk, inv = payload["batch_key"], payload["request"]
    own = {"model": bk["model"], "steps": bk["steps"], "height": bk["height"], "width": bk["width"],
           "scheduler": bk["scheduler"], "guidance_scale": inv["guidance_scale"]}
    for field, value in own.items():
        given = getattr(request, field)
        if field in request.model_fields_set and given is not None and given != value:
            where = "inversion_id" if field in ("model", "steps", "height", "width") else field
            raise invalid(where, f"{field} {given!r} does not match inversion {request.inversion_id}'s {value!r}: an "
                                 "edit from an inversion runs its model, size, steps, ddim and guidance")
    return request.model_copy(update=own)


InversionFinder = Callable[[str, str], "str | None"]
"""``(tenant, reuse digest)`` → the id of a usable stored inversion (``service.inversion_cache.usable_inversion``)."""


def photo_edit(request: P2PEditRequest, image_bytes: bytes, spec: ModelSpec, steps: int, *, settings: Settings,
               tenant: str, finder: InversionFinder | None, decode_gate: DecodeGate | None):
    """A P2P edit of a photo: (size, the reused inversion's id or None, the reuse digest, the square photo PNG to
    store or None). Inversion is square and DDIM; a finished equal inversion is reused instead of the photo."""
    from service.imaging import square_photo
    from service.inversion_cache import inversion_digest

    if request.scheduler not in (None, "ddim"):
        raise invalid("scheduler", f"scheduler: a photo edit runs its inversion's ddim, not {request.scheduler!r}")
    if request.height is not None and request.width is not None and request.height != request.width:
        raise invalid("width", "width: a photo edit is square (the photo is centre-cropped); give one size")
    size = request.height or request.width or spec.default_size
    if size > spec.max_size:
        raise invalid("height", f"height {size} is above model {spec.name!r}'s maximum of {spec.max_size}")
    options = request.inversion or InversionOptions()
    digest = inversion_digest(model=spec.name, image_sha256=hashlib.sha256(image_bytes).hexdigest(),
                              caption=request.source_prompt, method=options.method, steps=steps,
                              guidance_scale=request.guidance_scale, scheduler="ddim", size=size)
    found = finder(tenant, digest) if finder is not None else None
    if found is not None:
        return size, found, digest, None
    probe_image(image_bytes, settings.limits)

    def normalise() -> bytes:
        return png_bytes(square_photo(load_image(image_bytes, settings.limits), size))

    return size, None, digest, decode_gate.run(normalise) if decode_gate else normalise()


def prepare_submission(request: EditRequest, image_bytes: bytes | None, *, settings: Settings,
                       counter: PromptTokenCounter, tenant: str, edit_id: str, now: datetime,
                       decode_gate: DecodeGate | None = None,
                       inversion_lookup: InversionLookup | None = None,
                       inversion_finder: InversionFinder | None = None) -> Submission:
    """Validate beyond pydantic, decode the image, resolve defaults; raises ApiError (4xx) on bad input."""
    if isinstance(request, P2PEditRequest) and request.inversion_id is not None:
        request = from_inversion(request, tenant, inversion_lookup)
    spec = resolve_model(request, settings)
    check_prompts(request, spec, counter, settings.limits.max_prompt_tokens)
    check_webhook(request.webhook, settings)
    steps = request.steps or edit_kind(request.kind).default_steps
    scheduler = request.scheduler or spec.scheduler
    input_png: bytes | None = None
    input_size: tuple[int, int] | None = None
    image_digest = ""
    inversion_id = getattr(request, "inversion_id", None)
    inversion_digest = None
    if isinstance(request, P2PEditRequest):
        if image_bytes is not None and inversion_id is not None:
            raise invalid("image", "image: give either a photo (`image`) or `inversion_id`, not both")
        if request.inversion is not None and image_bytes is None:
            raise invalid("inversion", "inversion: options for inverting a photo need the photo (`image`)")
        check_p2p_words(request)
        for field in ("height", "width"):
            value = getattr(request, field)
            if value is not None and value > spec.max_size:
                raise invalid(field, f"{field} {value} is above model {spec.name!r}'s maximum of {spec.max_size}")
        height, width = request.height or spec.default_size, request.width or spec.default_size
        update: dict = {}
        if image_bytes is not None:
            image_digest = hashlib.sha256(image_bytes).hexdigest()
            size, inversion_id, inversion_digest, input_png = photo_edit(
                request, image_bytes, spec, steps, settings=settings, tenant=tenant, finder=inversion_finder,
                decode_gate=decode_gate)
            height = width = size
            scheduler = "ddim"
            update = {"image": None, "inversion": request.inversion or InversionOptions()}
            if inversion_id is not None:
                inversion_digest = None  # reused: nothing to remember
        seeds = output_seeds(request)
        if (inversion_id is not None or image_bytes is not None) and len(seeds) > 1:
            field = "seeds" if request.seeds else "num_outputs"
            raise invalid(field, f"{field}: an edit of a photo starts from its inversion's x_T, so seeds make no "
                                 "difference; ask for one output")
        resolved = request.model_copy(update={"model": spec.name, "steps": steps, "scheduler": scheduler,
                                              "height": height, "width": width, **update})
    else:
        if image_bytes is None:
            raise invalid("image", "an IP2P edit needs an input image (multipart `image` part, base64 `image` or "
                                   "an https `image_url`)")
        image_digest = hashlib.sha256(image_bytes).hexdigest()
        resolution = ip2p_resolution(probe_image(image_bytes, settings.limits), request.resolution, spec)
        args = (image_bytes, settings, resolution)
        width, height, input_png, input_size = (decode_gate.run(normalised_input, *args) if decode_gate
                                                else normalised_input(*args))
        seeds = ip2p_seeds(request)
        resolved = request.model_copy(update={"model": spec.name, "steps": steps, "scheduler": scheduler,
                                              "resolution": resolution, "image": None})
    batch_key = BatchKey(model=spec.name, kind=request.kind, height=height, width=width, steps=steps,
                         scheduler=scheduler)
    payload = JobPayload(id=edit_id, tenant=tenant, request=resolved, batch_key=batch_key, seeds=seeds,
                         input_image_key=input_key(edit_id) if input_png is not None else None,
                         input_size=input_size, created_at=now, inversion_id=inversion_id,
                         inversion_digest=inversion_digest)
    fingerprint_source = request.model_dump_json(exclude={"image"}) + "|" + image_digest
    return Submission(payload=payload, webhook=request.webhook,
                      fingerprint=hashlib.sha256(fingerprint_source.encode()).hexdigest(), input_png=input_png)
