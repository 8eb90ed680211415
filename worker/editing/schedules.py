"""When attention is injected: the cross-attention α table and the self-attention step window.

Why two conventions: the reference builds α with num_steps + 1 rows and bounds int(f·(T+1))
(written for PNDM's extra UNet call) but the self window with int(f·T). We keep both as the
reference has them, so its token/step vectors reproduce exactly; with DDIM (T calls) α's last row
is simply never read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from worker.editing.jobs import EditValidationError
from worker.editing.words import token_indices

DEFAULT_KEY = "default_"


def _fraction(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EditValidationError(field, f"expected a fraction in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise EditValidationError(field, f"fraction {value!r} is outside [0, 1]")
    return float(value)


def step_range(value: Any, field: str) -> tuple[float, float]:
    """A fraction f → (0, f); a pair [start, end] → (start, end); validated, start ≤ end."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise EditValidationError(field, f"expected a fraction or a [start, end] pair, got {value!r}")
        start, end = _fraction(value[0], field), _fraction(value[1], field)
        if start > end:
            raise EditValidationError(field, f"start {start} is after end {end}")
        return start, end
    return 0.0, _fraction(value, field)


def self_range(self_replace_steps: Any, num_steps: int) -> tuple[int, int]:
    """Steps [lo, hi) in which targets take the source's low-resolution self-attention."""
    start, end = step_range(self_replace_steps, "self_replace_steps")
    return int(start * num_steps), int(end * num_steps)


def cross_alpha(
    cross_replace_steps: Any, target_prompts: Sequence[str], tokenizer, num_steps: int, max_len: int = 77
) -> torch.Tensor:
    """α of shape (num_steps + 1, targets, max_len): 1 where target token n takes the edited map at a step.

    ``cross_replace_steps`` is a fraction, a [start, end] pair, or a dict of per-word ranges with
    the key ``default_`` for every other token (missing default: always). A per-word entry
    overrides that word's columns in each target containing it; a word in no target is refused.
    """
    field = "cross_replace_steps"
    rows = num_steps + 1
    entries: Mapping[str, Any] = cross_replace_steps if isinstance(cross_replace_steps, Mapping) else {
        DEFAULT_KEY: cross_replace_steps
    }
    alpha = torch.zeros(rows, len(target_prompts), max_len)

    def bounds(value: Any) -> slice:
        start, end = step_range(value, field)
        return slice(int(start * rows), int(end * rows))

    alpha[bounds(entries.get(DEFAULT_KEY, (0.0, 1.0)))] = 1.0
    for word, value in entries.items():
        if word == DEFAULT_KEY:
            continue
        steps = bounds(value)
        hits = 0
        for k, prompt in enumerate(target_prompts):
            try:
                columns = token_indices(prompt, word, tokenizer, field)
            except EditValidationError:
                continue
            hits += 1
            alpha[:, k, columns] = 0.0
            alpha[steps, k, columns] = 1.0
        if not hits:
            raise EditValidationError(field, f"word {word!r} does not occur in any target prompt")
    return alpha
