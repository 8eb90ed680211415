"""P2P controllers whose per-step decisions are device tensors indexed by a step tensor.

Why: a captured UNet step (CUDA graph, ``torch.compile``) replays the same kernels with the same Python
decisions baked in. Today's controllers decide on the host, step by step (``begin_step`` sets booleans, the
router then picks SDPA or explicit attention per layer), so a captured step would hold for one step of one
job only. Here the structure is fixed per job — explicit attention on every layer where the job's P2P ever
needs probabilities, fused SDPA everywhere else — and what changes with the step is data: the cross α row,
the self-attention gate and the local-blend gate are gathered from per-call tables with ``step``, a device
tensor that ``begin_step`` fills (``fill_`` is one device kernel, no host sync). Nothing inside the step
reads a tensor value on the host (no ``.item()``, no branching on values).

The gates are exact: with α ∈ {0, 1} (and a 0/1 gate) ``edit·α + target·(1 − α)`` is the edit or the target
bit for bit, so results equal today's path up to the rounding of explicit softmax vs SDPA in the steps where
today's path skips the explicit maps (tested ≤ 1e-4 on fp32 latents).
"""

from __future__ import annotations

import torch
from torch import Tensor

from worker.editing.controllers import (
    STORE_PLACES,
    AttentionController,
    AttentionStore,
    EditController,
    LocalBlend,
)


class TensorStore(AttentionStore):
    """``AttentionStore`` with a preallocated sum and a device counter: same averages, no host state per step."""

    def __init__(self, num_prompts: int, grid: tuple[int, int]):
        super().__init__(num_prompts, grid)
        self.count: Tensor | None = None  # (), maps added per prompt, on the device

    def reset(self) -> None:
        if self.total is not None:
            self.total.zero_()
            self.count.zero_()

    def add(self, cond: Tensor, place: str) -> None:
        if place not in STORE_PLACES or cond.shape[2] != self.queries:
            return
        if self.total is None or self.total.device != cond.device:
            self.total = cond.new_zeros((self.num_prompts, self.queries, cond.shape[3]), dtype=torch.float32)
            self.count = cond.new_zeros((), dtype=torch.float32)
        self.total.add_(cond.sum(dim=1, dtype=torch.float32))
        self.count.add_(cond.shape[1])

    def average(self) -> Tensor:
        if self.total is None:
            raise RuntimeError(f"no cross-attention maps at {self.grid[0]}×{self.grid[1]} were stored")
        return self.total / self.count.clamp_min(1.0)


class TensorController:
    """Drop-in for an ``AttentionController`` (same processor protocol), decisions as step-indexed tensors.

    Built from a validated controller (``build_controller``): its mappers, equalizer, blend and schedules
    become per-call tables of ``num_steps`` rows (UNet evaluations).
    """

    def __init__(self, base: AttentionController):
        self.base = base
        self.prompts = base.prompts
        self.num_prompts = base.num_prompts
        self.num_steps = base.num_steps
        self.tokenizer = base.tokenizer
        self.blend: LocalBlend | None = base.blend
        self.store = None if base.store is None else TensorStore(base.num_prompts, base.store.grid)
        base_maps = base.map_store
        self.map_store = (self.store if base_maps is None or base_maps is base.store
                          else TensorStore(base.num_prompts, base_maps.grid))
        steps = torch.arange(self.num_steps)
        self.editing = isinstance(base, EditController)
        if self.editing:
            alpha = base.cross_alpha
            table = torch.zeros(self.num_steps, *alpha.shape[1:])
            rows = min(self.num_steps, alpha.shape[0])
            table[:rows] = alpha[:rows]
            lo, hi = base.self_window
            self.cross_table = table  # (calls, targets, tokens); rows past α are 0: no injection
            self.self_table = ((steps >= lo) & (steps < hi)).float()  # (calls,)
            self.cross_active = bool(table.any())  # static: does this job ever edit cross maps
            self.self_active = hi > lo
            self.self_max_queries = base.self_max_queries
        else:
            self.cross_active = self.self_active = False
        start = base.blend.start_step if base.blend is not None else 0
        self.blend_table = (steps >= start)  # (calls,) bool
        # a job that never reads or edits a map (edit "none", no maps, no blend) leaves the UNet's own processors
        self.needs_hook = self.cross_active or self.self_active or self.store is not None or self.map_store is not None
        self.step = -1  # host copy, for range checks and results only
        self._step_t: Tensor | None = None
        self._device_tables: dict[torch.device, dict[str, Tensor]] = {}

    # --- sampler-facing -------------------------------------------------------------------------
    def reset(self) -> None:
        self.step = -1
        if self.store is not None:
            self.store.reset()
        if self.map_store is not None and self.map_store is not self.store:
            self.map_store.reset()

    def begin_step(self, step: int) -> None:
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} outside [0, {self.num_steps}): num_steps = UNet evaluations per run")
        if step == 0:
            self.reset()
        self.step = step
        if self._step_t is not None:
            self._step_t.fill_(step)

    def step_tensor(self, device: torch.device) -> Tensor:
        """The device scalar every per-step table is indexed by; a captured step reads it, the host fills it."""
        if self._step_t is None or self._step_t.device != device:
            self._step_t = torch.full((1,), max(self.step, 0), dtype=torch.long, device=device)
        return self._step_t

    def _tables(self, device: torch.device) -> dict[str, Tensor]:
        tables = self._device_tables.get(device)
        if tables is None:
            tables = {"blend": self.blend_table.to(device)}
            if self.editing:
                tables["cross"] = self.cross_table.to(device)
                tables["self"] = self.self_table.to(device)
            self._device_tables[device] = tables
        return tables

    def needs_probs(self, is_cross: bool, num_queries: int) -> bool:
        """Static: the same answer at every step, so the attention layout never changes inside a run."""
        if is_cross:
            return (self.cross_active or (self.store is not None and self.store.wants(num_queries))
                    or (self.map_store is not None and self.map_store.wants(num_queries)))
        return self.self_active and num_queries <= self.self_max_queries

    def on_attention(self, probs: Tensor, is_cross: bool, place: str, num_queries: int) -> Tensor:
        probs = probs.clone() if probs.requires_grad else probs.contiguous()
        rows, queries, keys = probs.shape
        if rows % (2 * self.num_prompts):
            raise ValueError(f"{rows} attention rows do not split into 2 × {self.num_prompts} prompts × heads")
        heads = rows // (2 * self.num_prompts)
        cond = probs[rows // 2:].view(self.num_prompts, heads, queries, keys)
        step = self.step_tensor(probs.device)
        tables = self._tables(probs.device)
        if is_cross:
            if self.cross_active:
                targets = cond[1:]
                edited = self.base.replace_cross(cond[0], targets)
                alpha = tables["cross"].index_select(0, step)[0].to(cond.dtype)[:, None, None, :]
                targets.copy_(edited * alpha + (1 - alpha) * targets)
            if self.store is not None:
                self.store.add(cond, place)
            if self.map_store is not None and self.map_store is not self.store:
                self.map_store.add(cond, place)
        elif self.self_active and num_queries <= self.self_max_queries:
            gate = tables["self"].index_select(0, step).to(cond.dtype)
            cond[1:] = cond[:1] * gate + cond[1:] * (1 - gate)
        return probs

    def after_step(self, latents: Tensor) -> Tensor:
        if self.blend is None:
            return latents
        if latents.shape[0] != self.num_prompts:
            raise ValueError(f"expected latents for {self.num_prompts} prompts, got {tuple(latents.shape)}")
        if self.store is None or self.store.total is None:
            raise RuntimeError(
                f"local blend found no cross-attention maps at {self.blend.grid[0]}×{self.blend.grid[1]}: "
                "is latent_size the sampler's latent size, and were the processors installed?")
        on = self._tables(latents.device)["blend"].index_select(0, self.step_tensor(latents.device))
        mask = self.blend.masks(self.store.total)
        self.blend.last_mask = mask
        return self.blend.apply(latents, mask | ~on.view(1, 1, 1, 1))

    def attention_maps(self, prompt_index: int, render: bool = True):
        """As ``AttentionController.attention_maps`` (read once, after the run: host reads are fine here)."""
        if self.map_store is None or self.tokenizer is None:
            raise RuntimeError("attention maps were not requested for this job")
        self.base.map_store = _AveragedStore(self.map_store)
        return self.base.attention_maps(prompt_index, render)


class _AveragedStore:
    """Lends a ``TensorStore``'s average to ``AttentionController.attention_maps`` (which reads ``grid`` too)."""

    def __init__(self, store: TensorStore):
        self.grid = store.grid
        self._store = store

    def average(self) -> Tensor:
        return self._store.average()


def tensor_controller(controller: AttentionController) -> TensorController:
    """The tensor-indexed form of a validated controller (``controllers.build_controller``)."""
    return TensorController(controller)
