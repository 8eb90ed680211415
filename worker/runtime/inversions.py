"""Inversions as stored resources: request -> core spec, batched run, and the S3 objects edits start from.

Why safetensors with a JSON header entry: the arrays (x_T and one unconditional embedding per step) must
come back bit-exact in fp32 so that an edit from a stored inversion equals the edit from the in-memory one,
and the key parameters (model, size, steps, scheduler, guidance, method, caption) must travel with them so a
loader can refuse a mismatched edit without another lookup. safetensors never unpickles.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np

from editserve.contract import InversionProgress as InversionResourceProgress
from editserve.contract import InversionRequest
from service.storage import Storage, inversion_arrays_key, inversion_reconstruction_key
from worker.editing.inversion import Inversion, InversionResult, InversionRunner, InversionSpec, OnProgress
from worker.runtime.uploads import PNG, png_bytes

SAFETENSORS = "application/octet-stream"
META_KEY = "editserve.inversion"

FetchBytes = Callable[[str], bytes]


def inversion_spec(job_id: str, request: InversionRequest, image) -> InversionSpec:
    """The core's spec for a validated request and its decoded photo (PIL, RGB)."""
    return InversionSpec(job_id=job_id, caption=request.caption, image=image, method=request.method,
                         guidance_scale=request.guidance_scale, num_inner_steps=request.num_inner_steps,
                         early_stop_epsilon=request.early_stop_epsilon)


def inversion_bytes(inversion: Inversion) -> bytes:
    from safetensors.numpy import save

    arrays = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in inversion.to_arrays().items()}
    return save(arrays, metadata={META_KEY: json.dumps(inversion.meta())})


def inversion_from_bytes(data: bytes) -> Inversion:
    from safetensors.numpy import load

    meta = _metadata(data)
    try:
        arrays = load(data)
    except Exception as exc:  # noqa: BLE001 — safetensors raises its own error type for a corrupt body
        raise ValueError(f"not a readable safetensors object: {exc}") from exc
    if META_KEY not in meta or set(arrays) != {"x_t", "uncond_embeddings"}:
        raise ValueError("not an editserve inversion object")
    return Inversion.from_arrays(arrays, json.loads(meta[META_KEY]))


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (8-byte little-endian length, then JSON)."""
    size = int.from_bytes(data[:8], "little")
    if size <= 0 or size > len(data) - 8:
        raise ValueError("not a safetensors object")
    try:
        header = json.loads(data[8:8 + size])
    except ValueError as exc:
        raise ValueError(f"not a safetensors header: {exc}") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def store_inversion(storage: Storage, result: InversionResult, before_each: Callable[[], None] = lambda: None) \
        -> dict:
    """Upload a finished inversion's arrays and reconstruction (fixed keys: a retry overwrites them)."""
    inversion_id = result.job_id
    before_each()
    storage.put_bytes(inversion_arrays_key(inversion_id), inversion_bytes(result.inversion), SAFETENSORS)
    out = {"arrays_key": inversion_arrays_key(inversion_id)}
    if result.images:
        before_each()
        storage.put_bytes(inversion_reconstruction_key(inversion_id), png_bytes(result.images[0]), PNG)
        out["reconstruction_key"] = inversion_reconstruction_key(inversion_id)
        out["reconstruction_error"] = result.reconstruction_error
    return out


def load_inversion(fetch: FetchBytes, inversion_id: str) -> Inversion:
    """The stored inversion an edit names (``inversion_id``)."""
    return inversion_from_bytes(fetch(inversion_arrays_key(inversion_id)))


def run_inversions(model, specs: Sequence[InversionSpec], *, size: int, steps: int,
                   on_progress: OnProgress | None = None) -> list[InversionResult]:
    """Compatible inversions (same model, size, steps) share every UNet call (the core's batched runner)."""
    return InversionRunner(model, height=size, width=size, steps=steps, scheduler="ddim").run(
        specs, on_progress=on_progress)


def progress_view(progress) -> InversionResourceProgress:
    """The core's per-job progress as the resource shows it: DDIM steps walked, and null-text's inner
    iterations at the current step (a job that stops early reports fewer than ``inner_total``)."""
    phase = progress.phase if progress.phase in ("ddim", "null-text") else None
    return InversionResourceProgress(phase=phase, step=progress.step, total=progress.steps,
                                     inner_iterations=progress.inner, inner_total=progress.inner_total)
