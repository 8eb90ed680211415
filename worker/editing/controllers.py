"""Prompt-to-Prompt attention controllers: one per job, called from every UNet attention layer.

The job's prompts run as one batch from one initial latent: prompt 0 is the source, 1..n the
targets. On the conditional half of classifier-free guidance a controller overwrites the targets'
attention probabilities with maps built from the source's (cross-attention on the α schedule,
low-resolution self-attention inside its step window), keeps the running sum of the maps that
local blending and the Fig. 4 visualisation read, and after each scheduler step may copy the
source latent back outside the edited region.

Lifecycle, driven by the sampler: ``begin_step(i)`` before UNet evaluation i (``begin_step(0)``
starts a fresh run, so a controller can be reused), the processor's ``needs_probs`` /
``on_attention`` calls inside the UNet, then ``after_step(latents)`` after the scheduler step.
The step index is given, not counted, so a missed or extra attention call cannot shift schedules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from worker.editing.attention_maps import map_grid, render_token_grid
from worker.editing.jobs import AttentionMaps, EditValidationError, LocalBlendSpec, P2PJobSpec
from worker.editing.schedules import cross_alpha, self_range, step_range
from worker.editing.seq_aligner import refine_mapper, replace_mapper
from worker.editing.words import check_prompt_length, decoded_tokens, max_tokens, token_indices

REWEIGHT_RANGE = (-10.0, 10.0)
STORE_PLACES = ("down", "up")  # the reference reads maps from these blocks only, never mid


def blend_grid(latent_size: tuple[int, int]) -> tuple[int, int]:
    """The "latent/4" resolution (16×16 for SD at 512 px) where maps are stored and blended."""
    return max(1, latent_size[0] // 4), max(1, latent_size[1] // 4)


class _DeviceCache:
    """Per-device copies of a controller's constant tensors, made once instead of on each of 32 calls."""

    def __init__(self) -> None:
        self._copies: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    def get(self, tensor: Tensor, like: Tensor, keep_dtype: bool = False) -> Tensor:
        dtype = tensor.dtype if keep_dtype else like.dtype
        key = (id(tensor), like.device, dtype)
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = tensor.to(device=like.device, dtype=dtype)
        return copy


class AttentionStore:
    """Running sum of the conditional cross-attention maps at latent/4, over steps, layers and heads.

    Why only these: local blend and the visualisation read nothing else. The reference keeps every
    map up to 32² per layer (about 1 GB at 512 px); this is (prompts × queries × tokens) floats.
    """

    def __init__(self, num_prompts: int, grid: tuple[int, int]):
        self.num_prompts = num_prompts
        self.grid = grid
        self.queries = grid[0] * grid[1]
        self.total: Tensor | None = None  # (prompts, queries, tokens), float32
        self.maps_added = 0  # layer × head maps per prompt in `total`

    def reset(self) -> None:
        self.total = None
        self.maps_added = 0

    def wants(self, num_queries: int) -> bool:
        return num_queries == self.queries

    def add(self, cond: Tensor, place: str) -> None:
        """Add post-edit maps ``cond`` (prompts, heads, queries, tokens) of one layer."""
        if place not in STORE_PLACES or cond.shape[2] != self.queries:
            return
        layer_sum = cond.sum(dim=1, dtype=torch.float32)
        self.total = layer_sum if self.total is None else self.total.add_(layer_sum)
        self.maps_added += cond.shape[1]

    def average(self) -> Tensor:
        """Mean map per prompt over steps, layers and heads: (prompts, queries, tokens)."""
        if self.total is None or not self.maps_added:
            raise RuntimeError(f"no cross-attention maps at {self.grid[0]}×{self.grid[1]} were stored")
        return self.total / self.maps_added


class LocalBlend:
    """Keeps each target equal to the source outside the region its blend words attend to.

    Mask per target = (source words' region) ∪ (target words' region), minus the substruct
    words' region; regions come from the cumulative post-edit maps, 3×3 max-pooled, resized
    (nearest) to the latent, divided by their max and thresholded. A map that is zero (or nowhere
    positive) gives an empty region, never NaN.
    """

    def __init__(
        self,
        word_columns: Tensor,
        latent_size: tuple[int, int],
        grid: tuple[int, int],
        threshold: float = 0.3,
        start_step: int = 0,
        substruct_columns: Tensor | None = None,
    ):
        self.word_columns = word_columns.float()  # (prompts, tokens) 0/1: which tokens form each prompt's words
        self.substruct_columns = None if substruct_columns is None else substruct_columns.float()  # (tokens,)
        self.latent_size = tuple(latent_size)
        self.grid = tuple(grid)
        self.threshold = threshold
        self.start_step = start_step
        self.last_mask: Tensor | None = None  # (targets, 1, h, w) bool, for inspection and tests
        self._cache = _DeviceCache()

    def region(self, maps: Tensor, columns: Tensor, pool: bool) -> Tensor:
        """Binary region (prompts, 1, h, w) where the chosen tokens of ``maps`` (prompts, queries, tokens) attend."""
        columns = self._cache.get(columns, maps)
        word_map = torch.bmm(maps, columns.unsqueeze(-1)).view(maps.shape[0], 1, *self.grid)
        if pool:
            word_map = F.max_pool2d(word_map, kernel_size=3, stride=1, padding=1)
        word_map = F.interpolate(word_map, size=self.latent_size, mode="nearest")
        peak = word_map.amax(dim=(2, 3), keepdim=True)
        normalised = torch.where(peak > 0, word_map / peak.clamp_min(torch.finfo(word_map.dtype).tiny), 0.0)
        return normalised > self.threshold

    def masks(self, maps: Tensor) -> Tensor:
        """Per-target keep-the-edit mask (targets, 1, h, w), bool."""
        regions = self.region(maps, self.word_columns, pool=True)
        mask = regions[1:] | regions[:1]
        if self.substruct_columns is not None:
            excluded = self.region(maps[:1], self.substruct_columns.unsqueeze(0), pool=False)
            mask = mask & ~excluded
        return mask

    @staticmethod
    def apply(latents: Tensor, mask: Tensor) -> Tensor:
        """x_target ← x_source outside the mask (exact copies on both sides of it)."""
        targets = torch.where(mask.to(latents.device), latents[1:], latents[:1])
        return torch.cat([latents[:1], targets])

    def __call__(self, latents: Tensor, store: AttentionStore, step: int) -> Tensor:
        if step < self.start_step:
            return latents
        if store.total is None:
            raise RuntimeError(
                f"local blend found no cross-attention maps at {self.grid[0]}×{self.grid[1]}: "
                "is latent_size the sampler's latent size, and were the processors installed?"
            )
        self.last_mask = self.masks(store.total)
        return self.apply(latents, self.last_mask)


class AttentionController:
    """A job that injects nothing (edit "none"); may still store maps and blend latents.

    Subclasses say which steps and layers they edit and how; this class owns the step state, the
    cond-half slicing, the store and the blend.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        num_steps: int,
        *,
        store: AttentionStore | None = None,
        blend: LocalBlend | None = None,
        tokenizer=None,
        map_store: AttentionStore | None = None,
    ):
        if blend is not None and store is None:
            raise ValueError("a local blend needs an attention store")
        self.prompts = list(prompts)
        self.num_prompts = len(self.prompts)
        self.num_steps = num_steps
        self.store = store
        # the maps people see (``attention_maps``), at ``attention_maps.map_grid``; the blend's store when
        # that is the same grid (or when no separate one was given)
        self.map_store = map_store if map_store is not None else store
        self.blend = blend
        self.tokenizer = tokenizer
        self.step = -1
        self._cross_now = False
        self._self_now = False
        self._cache = _DeviceCache()

    # --- sampler-facing -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the current run (step, stored maps); ``begin_step(0)`` does this too."""
        self.step = -1
        self._cross_now = self._self_now = False
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
        self._cross_now = self.edits_cross_at(step)
        self._self_now = self.edits_self_at(step)

    def needs_probs(self, is_cross: bool, num_queries: int) -> bool:
        self._require_step()
        if is_cross:
            return (self._cross_now or (self.store is not None and self.store.wants(num_queries))
                    or (self.map_store is not None and self.map_store.wants(num_queries)))
        return self._self_now and self.edits_self_layer(num_queries)

    def on_attention(self, probs: Tensor, is_cross: bool, place: str, num_queries: int) -> Tensor:
        self._require_step()
        probs = probs.clone() if probs.requires_grad else probs.contiguous()  # in-place edits vs autograd
        rows, queries, keys = probs.shape
        if rows % (2 * self.num_prompts):
            raise ValueError(f"{rows} attention rows do not split into 2 × {self.num_prompts} prompts × heads")
        heads = rows // (2 * self.num_prompts)
        cond = probs[rows // 2 :].view(self.num_prompts, heads, queries, keys)  # edited in place
        if is_cross:
            if self._cross_now:
                self.edit_cross(cond)
            if self.store is not None:
                self.store.add(cond, place)
            if self.map_store is not None and self.map_store is not self.store:
                self.map_store.add(cond, place)
        elif self._self_now and self.edits_self_layer(num_queries):
            self.edit_self(cond)
        return probs

    def after_step(self, latents: Tensor) -> Tensor:
        if self.blend is None:
            return latents
        if latents.shape[0] != self.num_prompts:
            raise ValueError(f"expected latents for {self.num_prompts} prompts, got {tuple(latents.shape)}")
        return self.blend(latents, self.store, self.step)

    def attention_maps(self, prompt_index: int, render: bool = True) -> AttentionMaps:
        """Fig. 4: per-token average cross maps (tokens, h, w) of one prompt, start/end included, and (with
        ``render``) a grid PNG on the map's own scale; jobs re-render their grids on one shared scale."""
        store = self.map_store
        if store is None or self.tokenizer is None:
            raise RuntimeError("attention maps were not requested for this job")
        if not 0 <= prompt_index < self.num_prompts:
            raise IndexError(f"prompt index {prompt_index} outside 0..{self.num_prompts - 1}")
        prompt = self.prompts[prompt_index]
        tokens = decoded_tokens(prompt, self.tokenizer)
        average = store.average()[prompt_index, :, : len(tokens)]  # (queries, tokens)
        maps = average.T.reshape(len(tokens), *store.grid).float().cpu().numpy().astype(np.float32)
        return AttentionMaps(prompt_index, prompt, tokens, maps, render_token_grid(tokens, maps) if render else b"")

    # --- what subclasses decide ------------------------------------------------------------------
    def edits_cross_at(self, step: int) -> bool:
        return False

    def edits_self_at(self, step: int) -> bool:
        return False

    def edits_self_layer(self, num_queries: int) -> bool:
        return False

    def edit_cross(self, cond: Tensor) -> None:
        """Edit the targets' cross maps in ``cond`` (prompts, heads, queries, tokens) in place."""

    def edit_self(self, cond: Tensor) -> None:
        """Edit the targets' self maps in ``cond`` in place."""

    def _require_step(self) -> None:
        if self.step < 0:
            raise RuntimeError("call begin_step(step) before each UNet evaluation")


class EditController(AttentionController):
    """Injection on a schedule: target ← α·replace_cross(source, target) + (1 − α)·target per token.

    α (steps + 1, targets, tokens) comes from ``schedules.cross_alpha``; self-attention maps of
    layers with at most ``self_max_queries`` queries are copied from the source in ``self_window``.
    Subclasses define only ``replace_cross``.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        num_steps: int,
        *,
        cross_alpha: Tensor,
        self_window: tuple[int, int] = (0, 0),
        self_max_queries: int = 0,
        store: AttentionStore | None = None,
        blend: LocalBlend | None = None,
        tokenizer=None,
        map_store: AttentionStore | None = None,
    ):
        super().__init__(prompts, num_steps, store=store, blend=blend, tokenizer=tokenizer, map_store=map_store)
        if cross_alpha.dim() != 3 or cross_alpha.shape[1] != self.num_prompts - 1:
            raise ValueError(f"cross_alpha must be (steps, {self.num_prompts - 1} targets, tokens)")
        self.cross_alpha = cross_alpha.float()
        self.self_window = tuple(self_window)
        self.self_max_queries = self_max_queries
        active = self.cross_alpha.flatten(1)
        self._alpha_any = active.any(dim=1).tolist()
        self._alpha_all = (active == 1).all(dim=1).tolist()

    def edits_cross_at(self, step: int) -> bool:
        return step < len(self._alpha_any) and self._alpha_any[step]

    def edits_self_at(self, step: int) -> bool:
        return self.self_window[0] <= step < self.self_window[1]

    def edits_self_layer(self, num_queries: int) -> bool:
        return num_queries <= self.self_max_queries

    def replace_cross(self, source: Tensor, targets: Tensor) -> Tensor:
        """The edited target maps (targets, heads, queries, tokens) from the source's (heads, queries, tokens)."""
        raise NotImplementedError

    def edit_cross(self, cond: Tensor) -> None:
        source, targets = cond[0], cond[1:]
        edited = self.replace_cross(source, targets)
        if self._alpha_all[self.step]:
            targets.copy_(edited)
        else:
            alpha = self._cache.get(self.cross_alpha, cond)[self.step][:, None, None, :]
            targets.copy_(edited * alpha + (1 - alpha) * targets)

    def edit_self(self, cond: Tensor) -> None:
        cond[1:] = cond[:1]


class ReplaceController(EditController):
    """Word swap: target token n attends where the source's tokens M[:, n] attended."""

    def __init__(self, prompts: Sequence[str], num_steps: int, *, mapper: Tensor, **schedule):
        super().__init__(prompts, num_steps, **schedule)
        self.mapper = mapper.float()  # (targets, tokens, tokens) from seq_aligner.replace_mapper

    def replace_cross(self, source: Tensor, targets: Tensor) -> Tensor:
        mapper = self._cache.get(self.mapper, source)
        if mapper.shape[0] == 1:  # one target (the common pair): a plain GEMM, fewer operators than broadcasting
            return torch.matmul(source, mapper[0]).unsqueeze(0)
        return torch.matmul(source.unsqueeze(0), mapper.unsqueeze(1))


class RefineController(EditController):
    """Added words: aligned target tokens copy their source column, new tokens keep their own attention."""

    def __init__(self, prompts: Sequence[str], num_steps: int, *, mapper: Tensor, alphas: Tensor, **schedule):
        super().__init__(prompts, num_steps, **schedule)
        self.mapper = mapper.clamp_min(0).long()  # (targets, tokens); −1 (new token) is masked by alphas
        self.alphas = alphas.float()  # (targets, tokens)

    def replace_cross(self, source: Tensor, targets: Tensor) -> Tensor:
        mapper = self._cache.get(self.mapper, source, keep_dtype=True)
        alphas = self._cache.get(self.alphas, source)[:, None, None, :]
        n, tokens = mapper.shape
        picked = source.index_select(-1, mapper.flatten()).unflatten(-1, (n, tokens)).permute(2, 0, 1, 3)
        return picked * alphas + targets * (1 - alphas)


class ReweightController(EditController):
    """Attention fader: scales token columns of the base edit (or of the source maps) by per-target factors."""

    def __init__(
        self, prompts: Sequence[str], num_steps: int, *, equalizer: Tensor, base: EditController | None = None,
        **schedule,
    ):
        super().__init__(prompts, num_steps, **schedule)
        self.equalizer = equalizer.float()  # (targets, tokens), 1 except at reweighted words
        self.base = base  # only its mapping is used; its schedule, store and blend are not

    def replace_cross(self, source: Tensor, targets: Tensor) -> Tensor:
        base = self.base.replace_cross(source, targets) if self.base is not None else source.expand_as(targets)
        return base * self._cache.get(self.equalizer, source)[:, None, None, :]


# --- building a controller from a job spec ---------------------------------------------------------

def self_max_queries(layers: str, latent_size: tuple[int, int]) -> int:
    """Largest self-attention layer edited: "low" = latent/4 (16² at 512 px), "medium" = latent/2."""
    divisor = {"low": 4, "medium": 2}.get(layers)
    if divisor is None:
        raise EditValidationError("self_replace_layers", f"expected 'low' or 'medium', got {layers!r}")
    return (latent_size[0] // divisor) * (latent_size[1] // divisor)


def _per_target(value, count: int, field: str) -> list:
    """A single value applies to every target; a list must hold one entry per target."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise EditValidationError(field, f"needs one entry per target prompt ({count}), got {len(value)}")
        return list(value)
    return [value] * count


def _equalizer(spec: P2PJobSpec, tokenizer, max_len: int) -> Tensor | None:
    """Per-target factor vectors (targets, tokens); None when nothing is reweighted."""
    targets = spec.target_prompts
    mappings = _per_target(spec.reweight, len(targets), "reweight") if spec.reweight else [None] * len(targets)
    equalizer = torch.ones(len(targets), max_len)
    any_word = False
    for k, (prompt, mapping) in enumerate(zip(targets, mappings)):
        if mapping is None:
            continue
        if not isinstance(mapping, Mapping):
            raise EditValidationError("reweight", f"expected word → factor mappings, got {mapping!r}")
        for word, factor in mapping.items():
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not np.isfinite(factor):
                raise EditValidationError("reweight", f"factor for {word!r} must be a finite number, got {factor!r}")
            if not REWEIGHT_RANGE[0] <= factor <= REWEIGHT_RANGE[1]:
                raise EditValidationError("reweight", f"factor {factor} for {word!r} is outside {list(REWEIGHT_RANGE)}")
            equalizer[k, token_indices(prompt, word, tokenizer, "reweight")] = float(factor)
            any_word = True
    return equalizer if any_word else None


def _word_columns(prompt: str, words: Sequence[str], tokenizer, field: str, max_len: int) -> Tensor:
    columns = torch.zeros(max_len)
    for word in words:
        columns[token_indices(prompt, word, tokenizer, field)] = 1.0
    return columns


def _local_blend(
    spec: P2PJobSpec, lb: LocalBlendSpec, tokenizer, num_steps: int, latent_size: tuple[int, int], max_len: int
) -> LocalBlend:
    targets = spec.target_prompts
    if not lb.source_words:
        raise EditValidationError("local_blend.source_words", "give at least one source word")
    target_words = list(lb.target_words or [])
    if all(isinstance(w, str) for w in target_words):  # one flat list applies to every target
        target_words = [target_words] * len(targets)
    elif len(target_words) != len(targets):
        raise EditValidationError(
            "local_blend.target_words", f"needs one list per target prompt ({len(targets)}), got {len(target_words)}"
        )
    columns = [_word_columns(spec.source_prompt, lb.source_words, tokenizer, "local_blend.source_words", max_len)]
    for prompt, words in zip(targets, target_words):
        columns.append(_word_columns(prompt, words, tokenizer, "local_blend.target_words", max_len))
    substruct = None
    if lb.substruct_words:
        substruct = _word_columns(
            spec.source_prompt, lb.substruct_words, tokenizer, "local_blend.substruct_words", max_len
        )
    if not 0.0 < lb.threshold < 1.0:
        raise EditValidationError("local_blend.threshold", f"threshold {lb.threshold} must be in (0, 1)")
    start, _ = step_range((lb.start_blend, 1.0), "local_blend.start_blend")
    return LocalBlend(
        torch.stack(columns), latent_size, blend_grid(latent_size), threshold=lb.threshold,
        start_step=int(start * num_steps), substruct_columns=substruct,
    )


def build_controller(
    spec: P2PJobSpec, tokenizer, num_steps: int, latent_size: tuple[int, int], *, schedule_steps: int | None = None
) -> AttentionController:
    """Validate ``spec`` and build its controller (num_steps = UNet evaluations; latent_size = (h, w)).

    ``schedule_steps`` is the sampler's step count T that the windows are fractions of (default: num_steps).
    They differ under PNDM, which makes T + 1 UNet calls for T steps: the reference's α (T + 1 rows, bounds
    int(f·(T + 1))) already covers that extra call, so counting it again would inject one call too long.
    Raises ``EditValidationError`` with the HTTP contract's field names.
    """
    if num_steps < 1:
        raise ValueError("num_steps must be at least 1")
    steps = num_steps if schedule_steps is None else schedule_steps
    if steps < 1:
        raise ValueError("schedule_steps must be at least 1")
    latent_size = (int(latent_size[0]), int(latent_size[1]))
    source, targets = spec.source_prompt, list(spec.target_prompts)
    if not targets:
        raise EditValidationError("target_prompts", "give at least one target prompt")
    check_prompt_length(source, tokenizer, "source_prompt")
    for prompt in targets:
        check_prompt_length(prompt, tokenizer, "target_prompts")
    if spec.edit not in ("replace", "refine", "reweight", "none"):
        raise EditValidationError("edit", f"unknown edit {spec.edit!r}")
    max_len = max_tokens(tokenizer)
    prompts = spec.prompts

    for index in spec.attention_map_prompts:
        if not 0 <= index < len(prompts):
            raise EditValidationError("attention_maps", f"prompt index {index} outside 0..{len(prompts) - 1}")
    blend = None
    if spec.local_blend:
        blend = _local_blend(spec, spec.local_blend, tokenizer, steps, latent_size, max_len)
    store = AttentionStore(len(prompts), blend_grid(latent_size)) if blend else None
    map_store = None
    if spec.attention_map_prompts:
        grid = map_grid(latent_size)
        map_store = store if store is not None and store.grid == grid else AttentionStore(len(prompts), grid)
    extras = {"store": store, "blend": blend, "tokenizer": tokenizer, "map_store": map_store}

    schedule = dict(
        cross_alpha=cross_alpha(spec.cross_replace_steps, targets, tokenizer, steps, max_len),
        self_window=self_range(spec.self_replace_steps, steps),
        self_max_queries=self_max_queries(spec.self_replace_layers, latent_size),
        **extras,
    )
    equalizer = _equalizer(spec, tokenizer, max_len)
    if spec.edit == "none":
        if equalizer is not None:
            raise EditValidationError("reweight", "edit 'none' injects nothing to reweight; use edit 'reweight'")
        return AttentionController(prompts, num_steps, **extras)
    if spec.edit == "reweight" and equalizer is None:
        raise EditValidationError("reweight", "edit 'reweight' needs at least one word and factor")

    base: EditController | None = None
    if spec.edit == "replace":
        mapper = replace_mapper(source, targets, tokenizer, max_len)
        base = ReplaceController(prompts, num_steps, mapper=mapper, **schedule)
    elif spec.edit == "refine":
        mapper, alphas = refine_mapper(source, targets, tokenizer, max_len)
        base = RefineController(prompts, num_steps, mapper=mapper, alphas=alphas, **schedule)
    if equalizer is None:
        return base
    return ReweightController(prompts, num_steps, equalizer=equalizer, base=base, **schedule)
