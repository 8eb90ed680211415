"""The request/job/response contract, defined once.

The gateway validates with these models, the worker reads job payloads with them, and the SDK
sends and parses them. Nothing here imports torch, Redis or FastAPI.
"""

from __future__ import annotations

import math
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

API_VERSION = "v1"
MAX_TARGETS = 8
MAX_SWEEP_CELLS = 16
MAX_OUTPUTS = 16
"""``num_outputs`` / ``seeds``: at most this many seeds (outputs, or P2P groups) per edit."""
MAX_OUTPUT_IMAGES = 24
"""Images one edit may make: P2P outputs × (1 + targets), IP2P outputs × sweep cells (guidance grid × seeds)."""
REWEIGHT_RANGE = (-10.0, 10.0)
SEED_MAX = 2**32 - 1
MAX_PROMPT_CHARS = 1000
MAX_PROMPT_WORDS = 75
"""CLIP reads at most 77 tokens, two of them start/end: no prompt has more words than this, so no per-word
list or mapping needs more entries (every such limit below follows from it, and keeps validation cost small)."""


Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
StepRange = Union[Fraction, tuple[Fraction, Fraction]]
"""A fraction f means steps [0, f·T); a pair [start, end] (start <= end) means steps [start·T, end·T)."""
Word = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
"""A word or phrase of a prompt."""
WordList = Annotated[list[Word], Field(min_length=1, max_length=MAX_PROMPT_WORDS)]
CrossReplaceSteps = Union[StepRange, Annotated[dict[Word, StepRange], Field(max_length=MAX_PROMPT_WORDS + 1)]]
"""Either one StepRange, or per-word ranges with the key ``default_`` for all other tokens."""
WordWeights = Annotated[dict[Word, float], Field(min_length=1, max_length=MAX_PROMPT_WORDS)]
TargetWordWeights = Annotated[dict[Word, float], Field(max_length=MAX_PROMPT_WORDS)]
"""One target's faders in the per-target list form: ``{}`` leaves that target unweighted."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _kind_required(schema: dict[str, Any]) -> None:
    """``kind`` selects the request type: the API needs it even though the Python models default it."""
    schema["required"] = ["kind", *[name for name in schema.get("required", []) if name != "kind"]]


EditKind = Literal["p2p", "ip2p", "inversion"]
"""Every kind of job record: the edit methods, and ``inversion`` (a photo inverted for P2P, ``POST
/v1/inversions``, an edit-like record in the same store); what each needs (model kind, default steps, ...) is
``editserve.kinds.EDIT_KINDS``."""
ModelKind = Literal["text2image", "instruct"]
# Samplers by the names people know them by (AUTOMATIC1111 / ComfyUI): DDIM (P2P's null-text notebook), PNDM
# (SD-1.4's own, T + 1 UNet calls), Euler-a (IP2P's official sigma schedule), Euler, DPM-Solver++ 2M with and
# without Karras sigmas, UniPC. Every model runs every one of them.
SchedulerName = Literal["ddim", "pndm", "euler_a", "euler", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]
SCHEDULERS: tuple[str, ...] = SchedulerName.__args__


class EditStatus(str, Enum):
    queued = "queued"
    processing = "processing"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES: frozenset[EditStatus] = frozenset({EditStatus.succeeded, EditStatus.failed, EditStatus.canceled})
"""An edit in one of these never changes again. The one definition: Redis scripts receive it as an argument."""

ALLOWED_FROM: dict[EditStatus, frozenset[EditStatus]] = {
    EditStatus.processing: frozenset({EditStatus.queued}),
    EditStatus.queued: frozenset({EditStatus.processing}),  # requeue after a crash
    # Terminal from queued too: a reaper may fail a job it never saw start, and a "dead" worker that finished
    # anyway should not lose its results; the stale queue entry is skipped when the edit is no longer queued.
    **{status: frozenset({EditStatus.queued, EditStatus.processing}) for status in TERMINAL_STATUSES},
}
"""The status transition table: the statuses each status may be entered from (the transition script checks it
atomically, so a terminal edit never changes again and a late or duplicate write is a no-op)."""


class WebhookEventType(str, Enum):
    started = "started"
    progress = "progress"
    completed = "completed"


class WebhookSpec(_Strict):
    url: str = Field(description="http(s) URL; private/loopback/link-local destinations are refused")
    events: list[WebhookEventType] = Field(
        default_factory=lambda: [WebhookEventType.started, WebhookEventType.completed], max_length=3,
        description="which events to send; `completed` covers succeeded, failed and canceled",
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not (v.startswith("http://") or v.startswith("https://")) or len(v) > 2048:
            raise ValueError("webhook url must be an http:// or https:// URL of at most 2048 characters")
        return v


class _EditBase(_Strict):
    model: str | None = Field(None, max_length=100, description="model name from GET /v1/models; default per kind")
    steps: int | None = Field(None, ge=1, le=200, description="denoising steps")
    scheduler: SchedulerName | None = Field(None, description="sampler; default per model (GET /v1/models)",
                                            examples=["dpmpp_2m_karras"])
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="random when omitted; echoed in params; with "
                             "`num_outputs` n: the first of the seeds seed, seed+1, ..., seed+n-1")
    num_outputs: int = Field(1, ge=1, le=MAX_OUTPUTS, examples=[2],
                                    description="outputs per request, each from its own seed (consecutive seeds "
                                                "from `seed`, random when omitted): P2P a source and its targets "
                                                "per seed, IP2P one image per seed (per sweep cell)")
    seeds: list[Annotated[int, Field(ge=0, le=SEED_MAX)]] | None = Field(
        None, min_length=1, max_length=MAX_OUTPUTS, examples=[[1, 2]],
        description="explicit seeds, one output each (P2P: a source and its targets per seed); instead of "
                    "`seed` and `num_outputs`")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="what to steer away from: replaces "
                                 "the empty text of the unconditional branches (one per edit)",
                                 examples=["blurry, low quality"])
    output_format: Literal["png", "webp", "jpeg"] = Field(
        "png", description="file type of every result; each file carries the generation parameters (PNG text "
                           "chunk `parameters`, EXIF UserComment for webp and jpeg)", examples=["webp"])
    output_quality: int = Field(90, ge=1, le=100, description="webp and jpeg quality (png is lossless)")
    webhook: WebhookSpec | None = None
    priority: Literal["high", "normal", "low"] = "normal"
    metrics: bool = Field(False, description="CLIP scores per output (IP2P paper metrics), computed on the worker "
                                             "and returned in `results[].scores`")
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] = Field(
        default_factory=dict, max_length=16, description="echoed back, not used (16 keys of at most 64 characters, "
                                                         "values of at most 512)")
    preview_every: int | None = Field(
        None, ge=0, le=200, description="a small preview image every k denoising steps (SSE `preview` events and "
                                        "`preview` in GET); 0 or null = none", examples=[5])

    @model_validator(mode="after")
    def _preview_within_steps(self):
        if self.preview_every and self.steps is not None and self.preview_every > self.steps:
            raise ValueError(f"preview_every: must be at most steps ({self.steps}), got {self.preview_every}")
        return self

    @model_validator(mode="after")
    def _one_way_to_seed(self):
        if self.seeds is not None and self.seed is not None:
            raise ValueError("seeds: give either `seeds` or `seed`, not both")
        if self.seeds is not None and self.num_outputs not in (1, len(self.seeds)):
            raise ValueError(f"num_outputs: {self.num_outputs} outputs but {len(self.seeds)} `seeds` (one output "
                             "each): give one or the other")
        return self

    @property
    def output_count(self) -> int:
        """Outputs asked for: one per seed of ``seeds``, else ``num_outputs`` (default 1)."""
        return len(self.seeds) if self.seeds else self.num_outputs


class LocalBlend(_Strict):
    """Edit only where the given words attend (P2P §local blending)."""

    source_words: list[Word] = Field(min_length=1, max_length=8)
    target_words: WordList | Annotated[list[WordList], Field(min_length=1, max_length=MAX_TARGETS)] = Field(
        description="words in the target prompt(s); one flat list applies to every target"
    )
    threshold: float = Field(0.3, gt=0.0, lt=1.0, allow_inf_nan=False)
    start_blend: Fraction = Field(0.0, description="no blending during this first fraction of steps")
    substruct_words: WordList | None = Field(None, description="source words whose region is excluded")


InversionMethod = Literal["null-text", "ddim", "negative-prompt"]
INVERSION_METHODS: tuple[str, ...] = InversionMethod.__args__
MAX_INVERSION_INNER_STEPS = 50


class InversionOptions(_Strict):
    """How a P2P edit that sends a photo (``image``) inverts it when no equal finished inversion exists."""

    method: InversionMethod = Field("null-text", description="null-text (reference), ddim, or negative-prompt")
    num_inner_steps: int = Field(10, ge=1, le=MAX_INVERSION_INNER_STEPS,
                                 description="null-text: optimiser iterations per step at most")
    early_stop_epsilon: float = Field(1e-5, ge=0.0, le=1.0, allow_inf_nan=False,
                                      description="null-text: stop a step's optimisation below this loss")


class P2PEditRequest(_EditBase):
    """Prompt-to-Prompt: a source prompt and target prompts, generated from one shared initial latent."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_kind_required)
    kind: Literal["p2p"] = "p2p"
    source_prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    target_prompts: list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]] = Field(
        min_length=1, max_length=MAX_TARGETS
    )
    edit: Literal["replace", "refine", "reweight", "none"] = Field(
        "replace", description="replace = word swap; refine = added words; reweight alone; none = no injection"
    )
    reweight: (WordWeights | Annotated[list[TargetWordWeights], Field(min_length=1, max_length=MAX_TARGETS)]
               | None) = Field(
        None, description="word → attention factor in [-10, 10]; composes with replace/refine; a list is per target"
    )
    local_blend: LocalBlend | None = None
    cross_replace_steps: CrossReplaceSteps = 0.8
    self_replace_steps: StepRange = 0.4
    self_replace_layers: Literal["low", "medium"] = Field(
        "low", description="low: self-attention maps up to latent/4 (16² at 512px); medium: up to latent/2"
    )
    guidance_scale: float = Field(7.5, ge=0.0, le=30.0, allow_inf_nan=False)
    height: int | None = Field(None, ge=64, le=2048, multiple_of=64)
    width: int | None = Field(None, ge=64, le=2048, multiple_of=64)
    attention_maps: bool | Annotated[list[int], Field(max_length=MAX_TARGETS + 1)] = Field(
        False, description="true: maps for every prompt; or prompt indices (0 = source). Grids share one colour "
                           "scale per edit and carry their prompt as a title"
    )
    attention_maps_overlay: bool = Field(
        False, description="draw each attention-map tile over its prompt's generated image (needs attention_maps)"
    )
    inversion_id: str | None = Field(
        None, min_length=1, max_length=64, pattern=r"^[0-9a-z]+$",
        description="edit a real photo: a succeeded inversion of yours (POST /v1/inversions) whose x_T and per-step "
                    "unconditional embeddings the source branch starts from; model, size and steps must match it, "
                    "the scheduler is ddim and `guidance_scale` the inversion's (both set from it when omitted)")
    image: str | None = Field(
        None, description="edit a real photo whose caption is `source_prompt`: base64 (or data: URL), or a multipart "
                          "file. A finished inversion of yours with the same key (model, photo, caption, method, "
                          "steps, guidance, size) is reused; otherwise the worker inverts it first (`inversion`)")
    inversion: InversionOptions | None = Field(None, description="with `image`: how to invert it (default null-text)")

    @field_validator("reweight")
    @classmethod
    def _weights_in_range(cls, v):
        for mapping in [v] if isinstance(v, dict) else (v or []):
            for word, factor in mapping.items():
                if not math.isfinite(factor) or not REWEIGHT_RANGE[0] <= factor <= REWEIGHT_RANGE[1]:
                    raise ValueError(f"reweight factor for {word!r} must be finite and within {REWEIGHT_RANGE}")
        return v

    @model_validator(mode="after")
    def _ordered_windows(self):
        windows = [("self_replace_steps", self.self_replace_steps)]
        if isinstance(self.cross_replace_steps, dict):
            windows += [(f"cross_replace_steps.{w}", r) for w, r in self.cross_replace_steps.items()]
        else:
            windows.append(("cross_replace_steps", self.cross_replace_steps))
        for field, window in windows:
            if isinstance(window, tuple) and window[0] > window[1]:
                raise ValueError(f"{field}: a [start, end] window needs start <= end, got [{window[0]}, {window[1]}]")
        return self

    @model_validator(mode="after")
    def _one_photo_source(self):
        if self.image is not None and self.inversion_id is not None:
            raise ValueError("image: give either a photo (`image`) or `inversion_id`, not both")
        return self

    @model_validator(mode="after")
    def _per_target_lists(self):
        n = len(self.target_prompts)
        if isinstance(self.reweight, list) and len(self.reweight) != n:
            raise ValueError(f"reweight: a list needs one mapping per target prompt ({n}), got {len(self.reweight)}")
        if self.edit == "reweight" and not (any(self.reweight) if isinstance(self.reweight, list) else self.reweight):
            raise ValueError("reweight: edit='reweight' needs at least one word and factor")
        lb = self.local_blend
        if lb and lb.target_words and isinstance(lb.target_words[0], list) and len(lb.target_words) != n:
            raise ValueError(f"local_blend.target_words: needs one list per target prompt ({n})")
        if isinstance(self.attention_maps, list) and any(not 0 <= i <= n for i in self.attention_maps):
            raise ValueError(f"attention_maps: prompt indices must be within 0..{n}")
        if self.attention_maps_overlay and not self.attention_maps:
            raise ValueError("attention_maps_overlay: needs attention_maps (true or prompt indices)")
        images = self.output_count * (n + 1)
        if images > MAX_OUTPUT_IMAGES:
            field = "seeds" if self.seeds else "num_outputs"
            raise ValueError(f"{field}: {self.output_count} outputs × {n + 1} prompts = {images} images, at most "
                             f"{MAX_OUTPUT_IMAGES} per edit")
        return self


class Sweep(_Strict):
    """A grid over image guidance × text guidance × seeds (IP2P paper Fig. 8); every cell is returned."""

    image_guidance: list[Annotated[float, Field(ge=0.0, le=30.0, allow_inf_nan=False)]] | None = Field(
        None, max_length=MAX_SWEEP_CELLS)
    text_guidance: list[Annotated[float, Field(ge=0.0, le=30.0, allow_inf_nan=False)]] | None = Field(
        None, max_length=MAX_SWEEP_CELLS)
    seeds: list[Annotated[int, Field(ge=0, le=SEED_MAX)]] | None = Field(None, max_length=MAX_SWEEP_CELLS)


class IP2PEditRequest(_EditBase):
    """InstructPix2Pix: an input image and a written instruction."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_kind_required)
    kind: Literal["ip2p"] = "ip2p"
    instruction: str = Field(max_length=MAX_PROMPT_CHARS, description="empty: the resized input comes back unchanged")
    image: str | None = Field(None, description="base64 (or data: URL) image; or send it as a multipart file")
    image_url: str | None = Field(None, max_length=2048, description="instead of `image`: an https URL the gateway "
                                  "fetches (public addresses only; redirects re-checked; size and time capped)",
                                  examples=["https://images.example.com/cat.png"])
    text_guidance: float = Field(7.5, ge=0.0, le=30.0, allow_inf_nan=False, description="s_T; applied ungated")
    image_guidance: float = Field(1.5, ge=0.0, le=30.0, allow_inf_nan=False, description="s_I; applied ungated")
    resolution: int = Field(512, ge=64, le=2048, description="long side R of the official resize (capped per model)")
    output_size: Literal["model", "input"] = Field(
        "model", examples=["input"],
        description="model (default): outputs at the official resize the model ran at (e.g. 512x384 for a "
                    "4032x3024 photo at resolution 512); input: resized back to the input's own width and height")
    sweep: Sweep | None = None
    input_caption: str | None = Field(None, max_length=1000, description="with `metrics` and `output_caption`: "
                                                                         "directional CLIP similarity too")
    output_caption: str | None = Field(None, max_length=1000, description="the edited image's caption (metrics)")

    @model_validator(mode="after")
    def _sweep_size(self):
        if self.sweep:
            cells = 1
            for axis in (self.sweep.image_guidance, self.sweep.text_guidance, self.sweep.seeds):
                cells *= len(axis) if axis else 1
            if cells > MAX_SWEEP_CELLS:
                raise ValueError(f"sweep: {cells} cells requested, at most {MAX_SWEEP_CELLS}")
        if (self.seeds or self.num_outputs > 1) and self.sweep and self.sweep.seeds:
            field = "seeds" if self.seeds else "num_outputs"
            raise ValueError(f"{field}: the sweep already has a seed axis (`sweep.seeds`); give one or the other")
        image_axis, text_axis, seed_axis = self.cells_axes()
        images = len(image_axis) * len(text_axis) * seed_axis
        if images > MAX_OUTPUT_IMAGES:
            field = "seeds" if self.seeds else "num_outputs" if self.num_outputs else "sweep"
            raise ValueError(f"{field}: {images} images (sweep cells × outputs), at most {MAX_OUTPUT_IMAGES} "
                             "per edit")
        return self

    def cells_axes(self) -> tuple[list[float], list[float], int]:
        """(image guidance axis, text guidance axis, length of the seed axis) of the cells grid: the seed axis
        is ``sweep.seeds``, else the outputs (``seeds`` / ``num_outputs``)."""
        sweep = self.sweep
        image_axis = (sweep.image_guidance if sweep else None) or [self.image_guidance]
        text_axis = (sweep.text_guidance if sweep else None) or [self.text_guidance]
        seed_axis = len(sweep.seeds) if sweep and sweep.seeds else self.output_count
        return list(image_axis), list(text_axis), seed_axis


EditRequest = Annotated[Union[P2PEditRequest, IP2PEditRequest], Field(discriminator="kind")]


class BatchKey(BaseModel):
    """Jobs with equal keys can share one UNet call per step."""

    model_config = ConfigDict(frozen=True)
    model: str
    kind: EditKind
    height: int
    width: int
    steps: int
    scheduler: str

    def queue_suffix(self) -> str:
        return f"{self.model}:{self.kind}:{self.height}x{self.width}:s{self.steps}:{self.scheduler}"


class JobPayload(BaseModel):
    """What the gateway enqueues and the worker executes: the request with every default resolved."""

    id: str
    tenant: str
    request: JobRequest
    batch_key: BatchKey
    seeds: list[int] = Field(description="P2P: one seed per output (group of source and targets); IP2P: one per "
                                         "sweep cell")
    input_image_key: str | None = Field(None, description="S3 key of the normalised input PNG (IP2P)")
    input_size: tuple[int, int] | None = Field(None, description="IP2P: (width, height) of the uploaded image "
                                                                 "before the official resize (`output_size: input`)")
    inversion_id: str | None = Field(None, description="P2P from a real photo: the finished inversion (checked for "
                                                       "tenancy by the gateway) whose x_T and embeddings it starts from")
    inversion_digest: str | None = Field(None, description="an inversion job: its reuse key "
                                                           "(``service.inversion_cache.inversion_digest``)")
    created_at: datetime


class Progress(BaseModel):
    step: int
    total: int

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


class ClipScores(BaseModel):
    """CLIP similarities of one output against its input (IP2P paper §3.1 filter, Fig. 8 metrics).

    P2P: the input is the source image (index 0) and its prompt, the output a target and its prompt.
    IP2P: the input image and output; caption scores only when the request gave both captions.
    """

    image_image: float = Field(description="cos(E(input image), E(output image))")
    input_caption: float | None = Field(None, description="cos(E(input image), E(input caption))")
    output_caption: float | None = Field(None, description="cos(E(output image), E(output caption))")
    directional: float | None = Field(None, description="cos(E(out) - E(in), E(out caption) - E(in caption))")


class ResultImage(BaseModel):
    index: int
    label: str = Field(description="P2P: the prompt; IP2P: the sweep cell")
    url: str
    expires_at: datetime
    width: int
    height: int
    seed: int | None = None
    text_guidance: float | None = None
    image_guidance: float | None = None
    scores: ClipScores | None = Field(None, description="with `metrics: true`: CLIP scores of this output")


class AttentionMapResult(BaseModel):
    prompt_index: int
    prompt: str
    tokens: list[str]
    grid_url: str = Field(description="PNG grid, one captioned tile per token")
    array_url: str = Field(description=".npy array of shape (tokens, h, w)")
    expires_at: datetime


class PreviewImage(BaseModel):
    """The latest intermediate preview of a running edit (asked with ``preview_every``)."""

    step: int = Field(description="denoising steps done when it was made")
    total: int
    url: str = Field(description="small WebP (≤ 128 px per output, outputs side by side), presigned")
    expires_at: datetime


class ErrorType(str, Enum):
    """Every error ``type`` editserve reports, the one catalogue: a request's ``{"error": {"type", ...}}``
    (``service.errors`` maps each to its HTTP status) and a failed edit's ``error.type`` (``job_error``).
    Clients branch on these strings; adding one here is adding it to the API."""

    # a request refused (HTTP 4xx/5xx)
    bad_request = "bad_request"
    malformed_json = "malformed_json"
    unauthorized = "unauthorized"
    forbidden = "forbidden"
    not_found = "not_found"
    method_not_allowed = "method_not_allowed"
    conflict = "conflict"
    idempotency_conflict = "idempotency_conflict"
    payload_too_large = "payload_too_large"
    unsupported_media_type = "unsupported_media_type"
    invalid_request = "invalid_request"
    too_many_requests = "too_many_requests"
    rate_limited = "rate_limited"
    tenant_queue_full = "tenant_queue_full"
    tenant_dataset_limit = "tenant_dataset_limit"
    queue_full = "queue_full"
    no_live_worker = "no_live_worker"
    service_unavailable = "service_unavailable"
    decoder_busy = "decoder_busy"
    storage_unavailable = "storage_unavailable"
    queue_unavailable = "queue_unavailable"
    not_ready = "not_ready"
    internal_error = "internal_error"
    client_disconnected = "client_disconnected"  # logged, never read: the client has gone
    error = "error"  # any other status
    # an edit that ran (or was to run) and failed: ``Edit.error.type``
    validation_error = "validation_error"
    invalid_payload = "invalid_payload"
    invalid_input = "invalid_input"
    non_finite_output = "non_finite_output"
    storage_error = "storage_error"
    inference_error = "inference_error"
    output_error = "output_error"
    worker_error = "worker_error"
    worker_crashed = "worker_crashed"
    queue_entry_lost = "queue_entry_lost"
    # the SDK's CLI only (never sent by the server)
    usage = "usage"


class ErrorInfo(BaseModel):
    type: str
    message: str
    field: str | None = None


def job_error(type: ErrorType, message: str, field: str | None = None) -> ErrorInfo:
    """A failed edit's error record: the one way to build one, so its ``type`` is always in the catalogue."""
    return ErrorInfo(type=ErrorType(type).value, message=message, field=field)


class RunMetrics(BaseModel):
    queue_wait_seconds: float | None = None
    run_seconds: float | None = None
    batch_id: str | None = None
    batch_size: int | None = None
    attempts: int = 0


class WebhookDeliveryState(BaseModel):
    url: str
    events: list[WebhookEventType]
    delivered: int = 0
    failed: int = 0
    last_error: str | None = None


class Edit(BaseModel):
    """The edit resource returned by GET /v1/edits/{id}."""

    id: str
    object: Literal["edit"] = "edit"
    kind: EditKind
    model: str
    status: EditStatus
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    progress: Progress | None = None
    queue_position: int | None = None
    eta_seconds: float | None = Field(None, description="null when unknown (e.g. no live worker serves the model)")
    workers: int | None = Field(None, description="queued edits: live workers serving its model now; 0 means it "
                                "waits for one (an autoscaler may start one) and its ETA is unknown")
    params: dict[str, Any] = Field(description="the parameters actually used, seeds included")
    results: list[ResultImage] = Field(default_factory=list)
    attention_maps: list[AttentionMapResult] = Field(default_factory=list)
    preview: PreviewImage | None = Field(None, description="the latest preview (edits with preview_every)")
    error: ErrorInfo | None = None
    metrics: RunMetrics = Field(default_factory=RunMetrics)
    webhook: WebhookDeliveryState | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    random_weights: bool = Field(False, description="true when the model has random test weights: images are noise")
    cancel_requested: bool = Field(False, description="a cancel was asked while processing; the worker stops soon")
    revision: int = Field(0, description="increases with every change; stream readers drop older snapshots")


class EditList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Edit]
    next_cursor: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class WebhookEvent(BaseModel):
    """Body of a webhook POST (Standard Webhooks: `type`, `timestamp`, `data`)."""

    type: Literal["edit.started", "edit.progress", "edit.completed"]
    timestamp: datetime
    data: Edit


class ModelThroughput(BaseModel):
    """What the model's workers finished recently (from the workers' reports in Redis)."""

    window_seconds: float = Field(description="the time the figures cover (the configured window, whole minutes)")
    edits: int = Field(0, description="edits that succeeded in the window")
    images: int = Field(0, description="result images of those edits")
    steps: int = Field(0, description="denoising steps of those edits")
    edits_per_minute: float = 0.0
    images_per_minute: float = 0.0
    steps_per_second: float = 0.0


class ModelInfo(BaseModel):
    name: str
    kind: ModelKind
    edit_kinds: list[EditKind]
    default_size: int
    max_size: int
    random_weights: bool
    scheduler: SchedulerName = Field(description="the default sampler")
    schedulers: list[SchedulerName] = Field(description="samplers a request may name in `scheduler`")
    workers: int = Field(0, description="live workers serving the model now (from their heartbeats)")
    queued: int = Field(0, description="edits waiting in the model's worker queues")
    throughput: ModelThroughput | None = Field(None, description="recent work finished for the model")
    require_live_worker: bool = Field(False, description="true: an edit is refused (503 `no_live_worker`) while "
                                      "`workers` is 0; false: it is accepted and waits (autoscaling from zero)")


# ---------------------------------------------------------------------------------------------- dataset jobs

MAX_SAMPLES_PER_TRIPLET = 200
Guidance = Annotated[float, Field(ge=0.0, le=30.0, allow_inf_nan=False)]
Similarity = Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)]


class CaptionTriplet(_Strict):
    """One line of the IP2P text dataset: input caption, instruction, edited caption."""

    input: str = Field(min_length=1, max_length=1000, description="the input image's caption")
    instruction: str = Field("", max_length=1000, description="the edit instruction (stored with each pair)")
    output: str = Field(min_length=1, max_length=1000, description="the edited image's caption")


class ClipThresholds(_Strict):
    """The keep rule's thresholds; defaults are the reference script's (the paper states image_image 0.75)."""

    image_image: Similarity = 0.70
    image_caption: Similarity = Field(0.20, description="for both image–caption similarities")
    directional: Similarity = 0.20


class DatasetRequest(_Strict):
    """An IP2P data-engine job: each triplet's caption pair → ``samples_per_triplet`` P2P pairs (random seed,
    P2P fraction, guidance), CLIP-filtered, the best ``keep_best`` kept."""

    triplets: list[CaptionTriplet] | None = Field(None, min_length=1, max_length=100_000,
                                                  description="inline triplets; or give `triplets_key`")
    triplets_key: str | None = Field(None, min_length=1, max_length=1024,
                                     description="S3 key (in the service's bucket) of a JSONL object, one "
                                                 "{input, instruction, output} per line (`caption` and `edit` "
                                                 "are accepted for `input` and `instruction`)")
    samples_per_triplet: int = Field(100, ge=1, le=MAX_SAMPLES_PER_TRIPLET)
    p2p_fraction: tuple[Fraction, Fraction] = Field((0.1, 0.9), description="range of p ~ U(lo, hi): the "
                                                    "fraction of steps whose self-attention is shared")
    guidance: tuple[Guidance, Guidance] = Field((7.5, 15.0), description="range of the CFG scale ~ U(lo, hi)")
    thresholds: ClipThresholds = Field(default_factory=ClipThresholds)
    keep_best: int = Field(4, ge=1, le=MAX_SAMPLES_PER_TRIPLET, description="kept pairs per triplet, at most")
    self_replace_layers: Literal["low", "medium"] = "medium"
    model: str | None = Field(None, max_length=100, description="a text2image model; default per kind")
    steps: int | None = Field(None, ge=1, le=200)
    height: int | None = Field(None, ge=64, le=2048, multiple_of=64)
    width: int | None = Field(None, ge=64, le=2048, multiple_of=64)
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="fixes every sample's seed, p and guidance")
    webhook: WebhookSpec | None = None
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] = Field(
        default_factory=dict, max_length=16)

    @model_validator(mode="after")
    def _one_source_and_ordered_ranges(self):
        if (self.triplets is None) == (self.triplets_key is None):
            raise ValueError("triplets: give exactly one of `triplets` and `triplets_key`")
        for name in ("p2p_fraction", "guidance"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: the range's low end {lo} is above its high end {hi}")
        return self


class DatasetProgress(BaseModel):
    done: int = Field(description="triplets finished (generated, scored, filtered, written)")
    total: int


class DatasetCounts(BaseModel):
    samples: int = Field(0, description="samples generated and scored (kept or rejected)")
    kept: int = 0
    failed: int = Field(0, description="samples whose edit failed (counted as rejected)")
    triplets_with_pairs: int = 0


class DatasetOutput(BaseModel):
    prefix: str = Field(description="S3 key prefix of the output")
    manifest_url: str
    metadata_url: str
    shard_urls: list[str]
    expires_at: datetime


class Dataset(BaseModel):
    """The dataset job returned by GET /v1/datasets/{id}."""

    id: str
    object: Literal["dataset"] = "dataset"
    status: EditStatus
    model: str
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    progress: DatasetProgress
    counts: DatasetCounts = Field(default_factory=DatasetCounts)
    params: dict[str, Any] = Field(description="the parameters actually used (seed, size, steps included)")
    output: DatasetOutput | None = None
    error: ErrorInfo | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    random_weights: bool = False
    cancel_requested: bool = False


class DatasetWebhookEvent(BaseModel):
    type: Literal["dataset.started", "dataset.progress", "dataset.completed"]
    timestamp: datetime
    data: Dataset


# ---------------------------------------------------------------------------------------------------
# Inversions (issue 11): a photo + its caption turned into x_T and per-step unconditional embeddings, a
# resource that P2P edits start from. Defaults are the null-text reference's.



class InversionRequest(_Strict):
    """``POST /v1/inversions``: the photo (base64 / data: URL here, or a multipart file) and its caption.

    Inversion walks the deterministic DDIM trajectory, so the scheduler is fixed to ``ddim``; edits from it
    must use the same model, size and step count.
    """

    kind: Literal["inversion"] = Field("inversion", description="optional; always `inversion`")
    caption: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="the photo's source caption")
    model: str | None = Field(None, max_length=100, description="a text2image model; default: the P2P default")
    method: InversionMethod = Field("null-text", description="null-text (reference), ddim (inversion only), or "
                                                             "negative-prompt (the caption as the unconditional "
                                                             "embedding, no optimisation)")
    steps: int | None = Field(None, ge=1, le=200, description="DDIM steps; an edit from it must use the same count")
    scheduler: Literal["ddim"] = "ddim"
    guidance_scale: float = Field(7.5, ge=1.0, le=30.0, allow_inf_nan=False,
                                  description="the guidance the stored embeddings are optimised for")
    num_inner_steps: int = Field(10, ge=1, le=MAX_INVERSION_INNER_STEPS,
                                 description="null-text: optimiser iterations per step at most")
    early_stop_epsilon: float = Field(1e-5, ge=0.0, le=1.0, allow_inf_nan=False,
                                      description="null-text: stop a step's optimisation below this loss")
    resolution: int = Field(512, ge=64, le=2048, description="side of the centre-cropped square (capped per model)")
    image: str | None = Field(None, description="base64 (or data: URL) image; or send it as a multipart file")
    image_url: str | None = Field(None, max_length=2048, description="instead of `image`: an https URL the gateway "
                                  "fetches (public addresses only; redirects re-checked; size and time capped)",
                                  examples=["https://images.example.com/cat.png"])
    webhook: WebhookSpec | None = Field(None, description="edit.started / edit.progress / edit.completed events "
                                                          "whose `data` is the record's Edit view (kind inversion)")
    priority: Literal["high", "normal", "low"] = "normal"
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] = Field(
        default_factory=dict, max_length=16, description="echoed back, not used")


JobRequest = Annotated[Union[P2PEditRequest, IP2PEditRequest, InversionRequest], Field(discriminator="kind")]
"""What a queued job runs: an edit, or an inversion."""


class InversionProgress(_Strict):
    """DDIM steps walked (phase ``ddim``), then for null-text the optimised steps (phase ``null-text``) with the
    inner optimiser iterations run at the latest step out of the most possible (early stop runs fewer)."""

    phase: Literal["ddim", "null-text"] | None = None
    step: int
    total: int
    inner_iterations: int = 0
    inner_total: int = 0


class InversionResultUrls(BaseModel):
    reconstruction_url: str = Field(description="PNG decoded from the inversion (random tiny models: noise)")
    arrays_url: str = Field(description="safetensors with `x_t` (1, 4, h, w) and `uncond_embeddings` (steps, 77, D)")
    expires_at: datetime


class Inversion(BaseModel):
    """An inversion resource; ``id`` goes into a P2P edit's ``inversion_id``."""

    id: str
    object: Literal["inversion"] = "inversion"
    status: EditStatus
    model: str
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    request: dict[str, Any] = Field(description="the request with defaults resolved (model, steps, size), image "
                                                "omitted")
    progress: InversionProgress | None = None
    result: InversionResultUrls | None = None
    reconstruction_error: float | None = Field(None, description="latent MSE of the reconstruction vs the photo")
    error: ErrorInfo | None = None
    metrics: RunMetrics = Field(default_factory=RunMetrics)
    metadata: dict[str, str] = Field(default_factory=dict)
    random_weights: bool = False
    cancel_requested: bool = False
    reused: bool = Field(False, description="POST answered with an equal finished inversion of yours (same model, "
                                            "photo, caption, method, steps, guidance, size): nothing was rerun")


class InversionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Inversion]
    next_cursor: str | None = None


JobPayload.model_rebuild()
