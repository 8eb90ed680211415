"""Store a finished job's outputs in S3 under ``edits/{id}/`` and describe them for ``JobStore.mark_succeeded``.

Why fixed keys (``output-{i}.png``, ``attn-{p}.png``, ``attn-{p}.npy``): a retried attempt (after a crash or
a presumed-dead worker coming back) overwrites the same objects instead of adding new ones, so an edit
never ends up with duplicate outputs. Seeds are fixed per job, so the bytes are the same too.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np

from service.storage import Storage, attention_array_key, attention_grid_key, output_key
from worker.editing.jobs import AttentionMaps, IP2PJobSpec, JobResult, JobSpec, P2PJobSpec

PNG = "image/png"
NPY = "application/x-npy"


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def upload_outputs(storage: Storage, spec: JobSpec, result: JobResult,
                   before_each: Callable[[], None] = lambda: None) -> tuple[list[dict], list[dict]]:
    """Upload images and attention maps; return (results, attention_maps) dicts for the JobStore.

    ``before_each`` runs before every object (the worker renews heartbeats there: uploads retry with
    backoff and may take longer than a denoising step).
    """
    results = []
    for index, image in enumerate(result.images):
        key = output_key(spec.job_id, index)
        before_each()
        storage.put_bytes(key, png_bytes(image), PNG)
        label = result.labels[index] if index < len(result.labels) else str(index)
        results.append({"index": index, "label": label, "key": key, "width": image.width, "height": image.height,
                        **image_params(spec, index)})
        if index < len(result.scores) and result.scores[index] is not None:
            results[-1]["scores"] = result.scores[index]
    maps = []
    for attn in result.attention_maps:
        before_each()
        maps.append(upload_attention(storage, spec.job_id, attn))
    return results, maps


def image_params(spec: JobSpec, index: int) -> dict[str, Any]:
    """The per-image parameters a client needs to reproduce it."""
    if isinstance(spec, P2PJobSpec):
        return {"seed": spec.seed}
    if isinstance(spec, IP2PJobSpec) and index < len(spec.cells):
        cell = spec.cells[index]
        return {"seed": cell.seed, "text_guidance": cell.text_guidance, "image_guidance": cell.image_guidance}
    return {}


def upload_attention(storage: Storage, edit_id: str, attn: AttentionMaps) -> dict:
    grid_key = attention_grid_key(edit_id, attn.prompt_index)
    array_key = attention_array_key(edit_id, attn.prompt_index)
    storage.put_bytes(grid_key, attn.grid_png, PNG)
    storage.put_bytes(array_key, npy_bytes(attn.maps), NPY)
    return {"prompt_index": attn.prompt_index, "prompt": attn.prompt, "tokens": list(attn.tokens),
            "grid_key": grid_key, "array_key": array_key}
