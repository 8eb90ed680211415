"""Per edit kind, what the gateway, the worker and the SDK look up about it: one table, torch-free.

Why one table: an edit kind used to be spelled out in six places (default steps, the model kind it runs
on, the default model, the union tags of error paths, queue-name parsing, the models listing). Adding an
edit method now means one row here, its request model in ``editserve.contract`` (and its ``EditKind``
literal), and its state class on the worker side (see docs/architecture.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import get_args

from editserve.contract import EditKind, IP2PEditRequest, ModelKind


@dataclass(frozen=True)
class EditKindInfo:
    name: str
    model_kind: ModelKind
    """The kind of model (``ModelSpec.kind``) that can run it."""
    default_steps: int
    default_model_setting: str
    """The ``Settings`` field naming the model used when a request names none."""
    takes_image: bool
    """Whether the request may carry an input image (stored in S3 at submission): IP2P's input, an inversion's
    photo, a P2P edit's photo (inverted, or matched to a finished inversion)."""
    is_edit: bool = True
    """False for ``inversion``: a job record that edits start from, not an edit (not in ``ModelInfo.edit_kinds``)."""


EDIT_KINDS: dict[str, EditKindInfo] = {
    "p2p": EditKindInfo("p2p", model_kind="text2image", default_steps=50, default_model_setting="default_p2p_model",
                        takes_image=True),
    "ip2p": EditKindInfo("ip2p", model_kind="instruct", default_steps=100, default_model_setting="default_ip2p_model",
                         takes_image=True),
    "inversion": EditKindInfo("inversion", model_kind="text2image", default_steps=50,
                              default_model_setting="default_p2p_model", takes_image=True, is_edit=False),
}
assert set(EDIT_KINDS) == set(get_args(EditKind)), "EDIT_KINDS and contract.EditKind must name the same kinds"


def edit_kind(name: str) -> EditKindInfo:
    return EDIT_KINDS[name]


def edit_kinds_for_model(model_kind: str) -> list[str]:
    """The edit kinds a model of ``model_kind`` can run (``GET /v1/models``)."""
    return [k.name for k in EDIT_KINDS.values() if k.model_kind == model_kind and k.is_edit]


def sweep_cells(request: IP2PEditRequest, seeds: list[int]) -> list[tuple[float, float, int]]:
    """IP2P cells as ``(image_guidance, text_guidance, seed)`` in the order image_guidance × text_guidance ×
    seeds (seed varies fastest): the gateway's ``Edit.params`` and the worker's job spec both use this. The seed
    axis is ``sweep.seeds``, else the request's outputs (``seeds`` / ``num_outputs``).

    ``seeds`` (resolved by the gateway) holds one seed per cell; a list as long as the seed axis is
    accepted too and broadcast over the guidance axes. Any other length raises ``ValueError``.
    """
    image_axis, text_axis, seed_axis_len = request.cells_axes()
    grid = list(itertools.product(image_axis, text_axis, range(seed_axis_len)))
    if len(seeds) == len(grid):
        cell_seeds = list(seeds)
    elif len(seeds) == seed_axis_len:
        cell_seeds = [seeds[s] for _, _, s in grid]
    else:
        raise ValueError(f"{len(seeds)} seeds for {len(grid)} sweep cells")
    return [(ig, tg, seed) for (ig, tg, _), seed in zip(grid, cell_seeds)]
