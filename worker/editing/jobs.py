"""What the editing core is asked to do, and what it gives back — independent of the HTTP contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np

StepRange = Union[float, tuple[float, float]]
CrossSteps = Union[StepRange, dict[str, StepRange]]


class EditValidationError(ValueError):
    """A request the core cannot run as asked; ``field`` names the offending input (for HTTP 4xx)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class JobCanceled(Exception):
    """Raised inside the runner when a job's progress callback asks to stop it."""


@dataclass
class LocalBlendSpec:
    source_words: list[str]
    target_words: list[list[str]]  # one list per target prompt
    threshold: float = 0.3
    start_blend: float = 0.0
    substruct_words: list[str] | None = None


@dataclass
class P2PJobSpec:
    """One Prompt-to-Prompt job: prompt 0 is the source, 1..n the targets, all from one x_T."""

    job_id: str
    source_prompt: str
    target_prompts: list[str]
    seed: int
    edit: Literal["replace", "refine", "reweight", "none"] = "replace"
    reweight: list[dict[str, float]] | None = None  # one mapping per target, or None
    local_blend: LocalBlendSpec | None = None
    cross_replace_steps: CrossSteps = 0.8
    self_replace_steps: StepRange = 0.4
    self_replace_layers: Literal["low", "medium"] = "low"
    guidance_scale: float = 7.5
    attention_map_prompts: list[int] = field(default_factory=list)
    attention_overlay: bool = False  # grids drawn over each prompt's generated image
    preview_every: int = 0  # a preview every k steps (worker.editing.previews); 0 = none
    preview_decoder: str | None = None  # a TAESD folder or hub id; None = the linear latent→RGB factors
    negative_prompt: str = ""  # the unconditional branches' text, shared by every prompt of the job
    score: bool = False  # CLIP scores of every target against the source (worker.scoring)
    # a real photo: start from its inversion's x_T with its per-step unconditional embeddings and guidance
    # (``worker.editing.inversion.Inversion``); the seed is then unused
    inversion: Any = None
    # several outputs: one group (source + targets, its own x_T) per seed, in this order; None = [seed]
    seeds: list[int] | None = None

    @property
    def prompts(self) -> list[str]:
        return [self.source_prompt, *self.target_prompts]

    @property
    def group_seeds(self) -> list[int]:
        """One seed per group of outputs (the source and its targets)."""
        return list(self.seeds) if self.seeds else [self.seed]

    def group_of(self, index: int) -> tuple[int, int]:
        """(group, prompt index within it) of output ``index``: outputs are the groups' images one after another."""
        return divmod(index, len(self.prompts))

    def image_params(self, index: int) -> dict[str, Any]:
        """What a client needs to reproduce output ``index``: its group's seed (shared by the group's prompts)."""
        seeds = self.group_seeds
        group = min(self.group_of(index)[0], len(seeds) - 1)
        return {"seed": seeds[group]}


@dataclass
class IP2PCell:
    text_guidance: float
    image_guidance: float
    seed: int


@dataclass
class IP2PJobSpec:
    """One InstructPix2Pix job: an RGB input already resized to the batch's height × width."""

    job_id: str
    image: Any  # PIL.Image.Image, RGB, batch size
    instruction: str
    cells: list[IP2PCell]  # one output per cell (a plain edit has one cell; a sweep several)
    negative_prompt: str = ""  # the text of the image-only and unconditional rows, as diffusers' pipeline
    score: bool = False  # CLIP scores of every output against the input (worker.scoring)
    captions: tuple[str, str] | None = None  # (input, output) captions for the caption and directional scores
    preview_every: int = 0  # as P2PJobSpec
    preview_decoder: str | None = None

    def image_params(self, index: int) -> dict[str, Any]:
        """What a client needs to reproduce output ``index``: its cell's seed and guidance scales."""
        if not 0 <= index < len(self.cells):
            return {}
        cell = self.cells[index]
        return {"seed": cell.seed, "text_guidance": cell.text_guidance, "image_guidance": cell.image_guidance}


JobSpec = Union[P2PJobSpec, IP2PJobSpec]


@dataclass
class AttentionMaps:
    """Per-token average cross-attention maps of one prompt (P2P paper Fig. 4)."""

    prompt_index: int
    prompt: str
    tokens: list[str]
    # (tokens, h, w) float32, raw: the mean over steps, layers and heads of the conditional cross-attention
    # probabilities (after the edit) at ``attention_maps.map_grid``; each pixel's row over all 77 tokens sums
    # to 1 before a reweight, so values lie in [0, 1] then (a reweight scales its words' columns)
    maps: np.ndarray
    grid_png: bytes


@dataclass
class JobResult:
    job_id: str
    images: list[Any] = field(default_factory=list)  # PIL images: P2P [source, targets...]; IP2P one per cell
    labels: list[str] = field(default_factory=list)
    latents: Any = None  # final fp32 latents (tests compare these, not 8-bit images)
    pixels: Any = None  # decoded float images (N, H, W, 3) in [0, 1], before 8-bit rounding
    attention_maps: list[AttentionMaps] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)  # what was actually used (seeds, sizes)
    error: EditValidationError | Exception | None = None
    canceled: bool = False
    scores: list[dict[str, float] | None] = field(default_factory=list)  # per image, when the job asked for them

    @property
    def ok(self) -> bool:
        return self.error is None and not self.canceled
