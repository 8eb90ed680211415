"""Row-count buckets: the UNet batch sizes a worker compiles or captures once and reuses.

Why: a captured CUDA graph or a compiled UNet holds for one input shape. Padding each step's rows up to the
next bucket keeps the set of shapes small (warm-up covers all of them), at the cost of some wasted rows.
Padding rows are zeros with the batch's last timestep and an all-zero text embedding; every UNet layer
treats rows independently, so they never change a job's result (tested), and their outputs are dropped.
The admission side (step-level continuous batching by UNet rows) asks ``bucket_for`` as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def parse_buckets(value: str | Iterable[int] | None) -> tuple[int, ...]:
    """"1,2,4,8" or [1, 2, 4, 8] → (1, 2, 4, 8): positive, unique, ascending; empty means no padding."""
    if value is None:
        return ()
    items = [p for p in value.replace(" ", "").split(",") if p] if isinstance(value, str) else list(value)
    try:
        buckets = sorted({int(item) for item in items})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"row buckets must be positive integers, got {value!r}") from exc
    if any(b < 1 for b in buckets):
        raise ValueError(f"row buckets must be positive integers, got {value!r}")
    return tuple(buckets)


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``rows``; ``rows`` itself when there are no buckets or it exceeds them all
    (such a step runs unpadded, uncaptured)."""
    for bucket in buckets:
        if bucket >= rows:
            return bucket
    return rows


def padding_for(rows: int, buckets: Sequence[int]) -> int:
    """Rows to add so that ``rows`` fills its bucket."""
    return bucket_for(rows, buckets) - rows
