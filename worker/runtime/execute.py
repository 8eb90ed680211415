"""Translate a queued ``JobPayload`` into the editing core's job specs.

Why a separate step: the HTTP contract is shaped for clients (one reweight mapping for all targets, flat
local-blend words, ``attention_maps: true``), the core wants one explicit entry per target prompt. Errors
here are the job's own (``EditValidationError`` naming the field), never the batch's.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from editserve.contract import InversionRequest, IP2PEditRequest, JobPayload, P2PEditRequest
from editserve.kinds import sweep_cells
from worker.editing.jobs import EditValidationError, IP2PCell, IP2PJobSpec, JobSpec, LocalBlendSpec, P2PJobSpec

FetchBytes = Callable[[str], bytes]
"""Download an S3 key (``Storage.get_bytes``); injected so translation stays testable without S3."""


def to_job_spec(payload: JobPayload, fetch: FetchBytes | None = None) -> JobSpec:
    """The core's spec for a queued payload, by its edit kind (``SPEC_BUILDERS``)."""
    request = payload.request
    if request.kind == "inversion":  # not an edit method (no JobState row): the processor's inversion branch
        return inversion_job_spec(payload, request, fetch)
    builder = SPEC_BUILDERS.get(request.kind)
    if builder is None:
        raise ValueError(f"the worker cannot translate edit kind {request.kind!r}")
    return builder(payload, request, fetch)


def p2p_spec(payload: JobPayload, request: P2PEditRequest, fetch: FetchBytes | None = None) -> P2PJobSpec:
    n = len(request.target_prompts)
    if not payload.seeds:
        raise EditValidationError("seed", "the payload carries no seed")
    return P2PJobSpec(
        job_id=payload.id,
        source_prompt=request.source_prompt,
        target_prompts=list(request.target_prompts),
        seed=payload.seeds[0],
        seeds=list(payload.seeds) if len(payload.seeds) > 1 else None,
        edit=request.edit,
        reweight=per_target_reweight(request.reweight, n),
        local_blend=local_blend_spec(request, n),
        cross_replace_steps=request.cross_replace_steps,
        self_replace_steps=request.self_replace_steps,
        self_replace_layers=request.self_replace_layers,
        guidance_scale=request.guidance_scale,
        attention_map_prompts=attention_map_prompts(request.attention_maps, n),
        attention_overlay=request.attention_maps_overlay,
        preview_every=request.preview_every or 0,
        negative_prompt=request.negative_prompt,
        score=request.metrics,
        inversion=stored_inversion(payload, fetch) or photo_to_invert(payload, request, fetch),
    )


def photo_to_invert(payload: JobPayload, request: P2PEditRequest, fetch: FetchBytes | None):
    """A P2P edit that sent a photo and found no finished inversion: the ``InversionSpec`` the worker runs first
    (``BatchProcessor._invert_first``), its caption the source prompt; None for a generated source."""
    if payload.input_image_key is None:
        return None
    from worker.runtime.inversions import inversion_spec

    if fetch is None:
        raise ValueError("a P2P payload with a photo needs a fetch function")
    options = request.inversion
    inversion_request = InversionRequest(caption=request.source_prompt, guidance_scale=request.guidance_scale,
                                         **(options.model_dump() if options is not None else {}))
    return inversion_spec(payload.id, inversion_request, _stored_image(fetch, payload.input_image_key))


def stored_inversion(payload: JobPayload, fetch: FetchBytes | None):
    """The finished inversion a P2P payload names, loaded from S3 (no inversion work runs for the edit)."""
    if payload.inversion_id is None:
        return None
    if fetch is None:
        raise ValueError("a P2P payload naming an inversion needs a fetch function")
    from worker.runtime.inversions import load_inversion

    try:
        return load_inversion(fetch, payload.inversion_id)
    except ValueError as exc:
        raise EditValidationError("inversion_id", f"inversion {payload.inversion_id} is unreadable: {exc}") from exc


def per_target_reweight(reweight: dict[str, float] | list[dict[str, float]] | None, n: int):
    if reweight is None:
        return None
    if isinstance(reweight, dict):
        return [dict(reweight) for _ in range(n)]
    return [dict(m) for m in reweight]


def local_blend_spec(request: P2PEditRequest, n: int) -> LocalBlendSpec | None:
    lb = request.local_blend
    if lb is None:
        return None
    words = lb.target_words
    per_target = [list(w) for w in words] if words and isinstance(words[0], list) else [list(words) for _ in range(n)]
    return LocalBlendSpec(source_words=list(lb.source_words), target_words=per_target, threshold=lb.threshold,
                          start_blend=lb.start_blend, substruct_words=lb.substruct_words)


def attention_map_prompts(value: bool | list[int], n: int) -> list[int]:
    if value is True:
        return list(range(n + 1))  # prompt 0 is the source
    if value is False:
        return []
    return list(value)


def ip2p_spec(payload: JobPayload, request: IP2PEditRequest, fetch: FetchBytes | None = None) -> IP2PJobSpec:
    from PIL import Image

    if fetch is None:
        raise ValueError("an IP2P payload needs a fetch function for its input image")
    key = payload.input_image_key or f"edits/{payload.id}/input.png"
    try:
        image = Image.open(io.BytesIO(fetch(key)))
        image.load()
    except OSError as exc:  # PIL's UnidentifiedImageError is an OSError
        raise EditValidationError("image", f"stored input {key} is not a readable image: {exc}") from exc
    captions = (request.input_caption, request.output_caption) \
        if request.input_caption is not None and request.output_caption is not None else None
    return IP2PJobSpec(job_id=payload.id, image=image.convert("RGB"), instruction=request.instruction,
                       cells=ip2p_cells(request, payload.seeds), score=request.metrics, captions=captions,
                       negative_prompt=request.negative_prompt, preview_every=request.preview_every or 0)


def inversion_job_spec(payload: JobPayload, request, fetch: FetchBytes | None = None):
    """An inversion job: its stored photo (the gateway's centre-cropped square) and the core's spec."""
    from worker.runtime.inversions import inversion_spec

    if fetch is None:
        raise ValueError("an inversion payload needs a fetch function for its photo")
    image = _stored_image(fetch, payload.input_image_key or f"edits/{payload.id}/input.png")
    return inversion_spec(payload.id, request, image)


def _stored_image(fetch: FetchBytes, key: str):
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(fetch(key)))
        image.load()
    except OSError as exc:  # PIL's UnidentifiedImageError is an OSError
        raise EditValidationError("image", f"stored input {key} is not a readable image: {exc}") from exc
    return image.convert("RGB")


def ip2p_cells(request: IP2PEditRequest, seeds: list[int]) -> list[IP2PCell]:
    """``editserve.kinds.sweep_cells`` as the core's cells; a seed count that fits no grid is the job's error."""
    try:
        cells = sweep_cells(request, seeds)
    except ValueError as exc:
        raise EditValidationError("seeds", str(exc)) from exc
    return [IP2PCell(text_guidance=tg, image_guidance=ig, seed=seed) for ig, tg, seed in cells]


SpecBuilder = Callable[[JobPayload, object, "FetchBytes | None"], JobSpec]
SPEC_BUILDERS: dict[str, SpecBuilder] = {"p2p": p2p_spec, "ip2p": ip2p_spec}
"""Payload → core spec per edit kind: one entry per row of ``worker.editing.methods.METHODS`` (tested)."""


def run_single(payload_json: str) -> None:
    """The RQ function of every edit job: a marker, never executed by the batching worker.

    The batching worker claims jobs itself and never calls ``job.perform()``. A stock ``rq worker`` that
    picks an edit by mistake fails loudly here instead of running the model outside a batch (and loading
    the weights per job).
    """
    raise RuntimeError("edit jobs are served by `python -m worker.runtime.worker`, not by a plain rq worker")
