"""Store a finished job's outputs in S3 under ``edits/{id}/`` and describe them for ``JobStore.mark_succeeded``.

Why fixed keys (``output-{i}-{name}.{ext}``, ``attn-{p}.png``, ``attn-{p}.npy``): a retried attempt (after a crash or
a presumed-dead worker coming back) overwrites the same objects instead of adding new ones, so an edit
never ends up with duplicate outputs. Seeds are fixed per job, so the bytes are the same too.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable

import numpy as np

from service.storage import Storage, StorageError, attention_array_key, attention_grid_key
from worker.editing.jobs import AttentionMaps, JobResult, JobSpec
from worker.runtime.outputs import OutputPlan

log = logging.getLogger("editserve.worker")

PNG = "image/png"
OUTAGE_RETRY_SECONDS = 2.0  # between whole-upload attempts once the storage client's own retries ran out
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
                   before_each: Callable[[], None] = lambda: None,
                   plan: OutputPlan = OutputPlan()) -> tuple[list[dict], list[dict]]:
    """Upload images and attention maps; return (results, attention_maps) dicts for the JobStore.

    ``plan`` (from the job's payload) says the file format and the parameters embedded in each image.

    ``before_each`` runs before every object (the worker renews heartbeats there: uploads retry with
    backoff and may take longer than a denoising step).
    """
    results = []
    for index, image in enumerate(result.images):
        encoded = plan.encode(spec, index, image)
        key = encoded.key
        before_each()
        storage.put_bytes(key, encoded.data, encoded.content_type)
        label = result.labels[index] if index < len(result.labels) else str(index)
        results.append({"index": index, "label": label, "key": key, "width": encoded.width, "height": encoded.height,
                        **spec.image_params(index)})
        if index < len(result.scores) and result.scores[index] is not None:
            results[-1]["scores"] = result.scores[index]
    maps = []
    for attn in result.attention_maps:
        before_each()
        maps.append(upload_attention(storage, spec.job_id, attn))
    return results, maps


def upload_outputs_through_outage(storage: Storage, spec: JobSpec, result: JobResult, *, window_seconds: float,
                                  retry_seconds: float = OUTAGE_RETRY_SECONDS,
                                  clock: Callable[[], float] = time.monotonic,
                                  sleep: Callable[[float], None] = time.sleep,
                                  plan: OutputPlan = OutputPlan()) -> tuple[list[dict], list[dict]]:
    """``upload_outputs``, tried again (every object: keys are fixed, so nothing is duplicated) until it works or
    ``window_seconds`` have passed since the first failure; then the last StorageError is raised.

    Why: a computed result is the expensive part. The storage client retries for seconds; an outage of minutes
    used to fail edits whose images were already made. Meanwhile the result stays in memory, the edit stays
    ``processing`` and its heartbeats are renewed (the finisher waits on this and touches the keeper).
    """
    deadline: float | None = None
    while True:
        try:
            return upload_outputs(storage, spec, result, plan=plan)
        except StorageError as exc:
            now = clock()
            deadline = deadline if deadline is not None else now + window_seconds
            if now >= deadline:
                raise
            log.warning("edit %s: storing its result failed (%s); kept, retrying for %.0fs more",
                        spec.job_id, exc, deadline - now)
            sleep(min(retry_seconds, max(deadline - now, 0.0)))


def upload_attention(storage: Storage, edit_id: str, attn: AttentionMaps) -> dict:
    grid_key = attention_grid_key(edit_id, attn.prompt_index)
    array_key = attention_array_key(edit_id, attn.prompt_index)
    storage.put_bytes(grid_key, attn.grid_png, PNG)
    storage.put_bytes(array_key, npy_bytes(attn.maps), NPY)
    return {"prompt_index": attn.prompt_index, "prompt": attn.prompt, "tokens": list(attn.tokens),
            "grid_key": grid_key, "array_key": array_key}
