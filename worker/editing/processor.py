"""The UNet attention hook: a diffusers attention processor that lets P2P controllers edit probabilities.

Why a processor: modern diffusers routes every ``Attention`` module through a swappable processor,
which survives library upgrades better than the reference's monkey-patched ``forward``. Several
jobs may share one UNet batch; a ``BatchAttentionRouter`` says which rows belong to which job's
controller. Probabilities are materialised (softmax(QKᵀ·scale)) only for the row ranges whose
controller needs them at this layer and step; every other row goes through fused SDPA, so the
64×64 self-attention of SD never builds its 4096×4096 maps. Each job's rows are computed by the
method its own controller asks for, so a job's result does not depend on its batch neighbours.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from worker.editing.controllers import AttentionController

PLACES = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}

Segment = tuple[int, int, AttentionController | None]


class BatchAttentionRouter:
    """Maps row ranges of the UNet batch to job controllers; the sampler sets ``segments`` before each UNet call.

    ``segments``: (start_row, stop_row, controller) with rows = batch samples (not × heads); a job's
    rows are [uncond × prompts, cond × prompts]. Rows outside any segment, or with controller
    None, run plain SDPA. ``num_calls`` counts hooked attention calls (32 per SD-1.x evaluation).
    """

    def __init__(self, segments: list[Segment] | None = None):
        self.segments: list[Segment] = list(segments or [])
        self.num_calls = 0

    def plan(self, is_cross: bool, num_queries: int, batch: int) -> list[Segment] | None:
        """Contiguous runs covering the batch, each with the controller that needs probabilities or None.

        None (the common case) means no row needs probabilities: one SDPA call for the whole batch.
        """
        explicit = [
            (start, stop, ctrl) for start, stop, ctrl in self.segments
            if ctrl is not None and ctrl.needs_probs(is_cross, num_queries)
        ]
        if not explicit:
            return None
        runs: list[Segment] = []
        cursor = 0
        for start, stop, ctrl in sorted(explicit, key=lambda seg: seg[0]):
            if start < cursor or stop <= start or stop > batch:
                raise ValueError(f"segment rows [{start}, {stop}) overlap another or fall outside the batch of {batch}")
            if start > cursor:
                runs.append((cursor, start, None))
            runs.append((start, stop, ctrl))
            cursor = stop
        if cursor < batch:
            runs.append((cursor, batch, None))
        return runs


def place_of(processor_name: str) -> str | None:
    """"down" / "mid" / "up" from a processor key like ``up_blocks.1.attentions.0...``; None elsewhere."""
    return PLACES.get(processor_name.split(".", 1)[0])


class P2PAttnProcessor:
    """``AttnProcessor2_0`` with a controller hook between softmax and the value product, per row range."""

    def __init__(self, router: BatchAttentionRouter, place: str):
        self.router = router
        self.place = place

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = encoder_hidden_states.shape if is_cross else hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        scale = attn.scale
        hidden_states = self.attend(query, key, value, attention_mask, scale, is_cross, attn.upcast_attention)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attend(
        self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float, is_cross: bool,
        upcast: bool = False,
    ) -> Tensor:
        """Attention output (batch, heads, queries, head_dim), explicit only where a controller asks."""
        self.router.num_calls += 1
        runs = self.router.plan(is_cross, query.shape[2], query.shape[0])
        if runs is None:
            return _sdpa(query, key, value, mask, scale)
        if len(runs) == 1 and runs[0][2] is not None:  # one job spans the batch: no slices, no concat
            return self._explicit(query, key, value, mask, scale, is_cross, runs[0][2], upcast)
        outputs = []
        for start, stop, controller in runs:
            rows = slice(start, stop)
            run_mask = None if mask is None else mask[rows]
            if controller is None:
                outputs.append(_sdpa(query[rows], key[rows], value[rows], run_mask, scale))
            else:
                outputs.append(self._explicit(query[rows], key[rows], value[rows], run_mask, scale, is_cross,
                                              controller, upcast))
        return torch.cat(outputs)

    def _explicit(
        self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float, is_cross: bool,
        controller: AttentionController, upcast: bool,
    ) -> Tensor:
        """softmax(QKᵀ·scale) → the controller → ·V, as 3-D batched GEMMs with the scale folded into the first.

        Few operators on purpose: on a GPU an SD step at small batch is bound by the host's launches
        (bench/gpu_profile.py; figures in bench/results/), and this runs at ~22 layers per step; 4-D matmuls cost twice the operators."""
        rows, heads, queries, dim = query.shape
        keys = key.shape[2]
        q = query.reshape(rows * heads, queries, dim)
        k = key.reshape(rows * heads, keys, dim)
        if upcast:
            q, k = q.float(), k.float()
        if mask is None:
            scores = torch.baddbmm(q.new_empty(1, 1, 1), q, k.transpose(1, 2), beta=0, alpha=scale)
        else:
            bias = mask.expand(rows, heads, queries, keys).reshape(rows * heads, queries, keys).to(q.dtype)
            scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
        probs = scores.softmax(dim=-1, dtype=torch.float32)  # edits (reweight up to ×10) want fp32 maps
        probs = controller.on_attention(probs, is_cross, self.place, queries)
        out = torch.bmm(probs.to(value.dtype), value.reshape(rows * heads, keys, dim))
        return out.view(rows, heads, queries, dim)


def _sdpa(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    default = 1.0 / math.sqrt(query.shape[-1])
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
        scale=None if math.isclose(scale, default, rel_tol=1e-6) else scale,
    )


def install_p2p_processors(unet, router: BatchAttentionRouter) -> dict:
    """Put a ``P2PAttnProcessor`` on every attention module of the down, mid and up blocks.

    Returns the previous processors; restore them with ``unet.set_attn_processor(previous)``.
    Install after anything else that sets processors (e.g. xformers), which would remove the hook.
    """
    previous = dict(unet.attn_processors)
    processors = {}
    for name, old in previous.items():
        place = place_of(name)
        processors[name] = old if place is None else P2PAttnProcessor(router, place)
    unet.set_attn_processor(processors)
    return previous


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # unet -> (router, its P2P processors)


def install_shared_p2p_processors(unet) -> tuple[BatchAttentionRouter, dict]:
    """Install this UNet's one set of P2P processors (made on first use) and return (router, previous).

    Why one set per UNet: a compiled UNet guards on its processors; fresh ones per batch would recompile it
    per batch. The router's segments are cleared: the caller routes its own jobs.
    """
    cached = _SHARED.get(unet)
    if cached is None:
        router = BatchAttentionRouter()
        previous = install_p2p_processors(unet, router)
        _SHARED[unet] = cached = (router, dict(unet.attn_processors))
    else:
        previous = dict(unet.attn_processors)
        unet.set_attn_processor(dict(cached[1]))
    cached[0].segments = []
    return cached[0], previous
