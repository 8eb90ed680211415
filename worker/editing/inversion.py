"""Invert real photos for Prompt-to-Prompt: DDIM inversion, null-text optimisation, negative-prompt inversion.

P2P edits only images whose initial noise and text conditioning it knows. For a photo, DDIM inversion
(guidance 1, the caption's embedding) walks the photo's latent z*_0 up to z*_T; sampling back from z*_T with
classifier-free guidance then drifts from the photo, because the unconditional branch was never part of the
walk. Three ways to use the walk:

- ``ddim``: keep x_T and the "" embedding; fast, drifts at guidance > 1.
- ``null-text`` (Mokady et al., as their notebook does it): for each step from the noisiest, optimise the
  unconditional embedding (Adam, ``lr = 1e-2·(1 − i/100)``, up to ``num_inner_steps`` iterations, early stop
  when the loss < ``ε + i·2e-5``) so that one guided DDIM step lands on the walk's next latent; one embedding
  per step.
- ``negative-prompt`` (Miyake et al.): use the caption's own embedding as the unconditional one; then
  ``eps_u + w·(eps_c − eps_u) = eps_c`` and the guided sampler *is* the guidance-1 sampler that inverts the
  walk, at DDIM cost.

Every result has the same shape — x_T plus one unconditional embedding per step — so an edit treats all
three alike (``P2PJobSpec.inversion``).

Batching: jobs of one key (model, size, steps, scheduler) run in lockstep and share every UNet call: the DDIM
walk, the conditional prediction of each null-text step, the inner iterations and the step's advance. In the
inner loop each job's loss and Adam state are its own; the batch back-propagates the *sum* of the jobs'
losses, whose gradient with respect to one job's embedding is that job's own gradient (rows never mix).
A job whose loss fell under its threshold leaves the inner loop, so it stops costing compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from worker.editing.base import SamplingContext, decode_many
from worker.editing.batch import PerJobRowVectors
from worker.editing.jobs import EditValidationError, JobCanceled

Method = Literal["null-text", "ddim", "negative-prompt"]
METHODS: tuple[str, ...] = ("null-text", "ddim", "negative-prompt")

# the reference's defaults (null-text notebook)
DEFAULT_GUIDANCE = 7.5
DEFAULT_INNER_STEPS = 10
DEFAULT_EARLY_STOP = 1e-5
EARLY_STOP_SLOPE = 2e-5  # threshold grows by this per step: later (less noisy) steps are allowed more error
MAX_INNER_STEPS = 50


def learning_rate(step: int) -> float:
    """Adam's learning rate at null-text step ``step`` (0 = noisiest), as the reference decays it."""
    return 1e-2 * (1.0 - step / 100.0)


def early_stop_threshold(epsilon: float, step: int) -> float:
    return epsilon + step * EARLY_STOP_SLOPE


@dataclass
class InversionSpec:
    """One photo to invert. ``image`` (PIL, RGB) is centre-cropped and resized to the batch size; tests and
    benchmarks may give the latent ``latents`` (1, 4, h, w) instead."""

    job_id: str
    caption: str
    image: Any = None
    latents: torch.Tensor | None = None
    method: Method = "null-text"
    guidance_scale: float = DEFAULT_GUIDANCE
    num_inner_steps: int = DEFAULT_INNER_STEPS
    early_stop_epsilon: float = DEFAULT_EARLY_STOP


@dataclass
class Inversion:
    """What an edit needs to start from a photo: x_T and one unconditional embedding per sampling step.

    ``uncond_embeddings[i]`` replaces "" at sampling step i (0 = noisiest), with ``guidance_scale``; valid only
    for the same model, size, step count and scheduler (``key_params``).
    """

    x_t: torch.Tensor  # (1, 4, h, w)
    uncond_embeddings: torch.Tensor  # (steps, 77, D)
    guidance_scale: float
    method: str
    caption: str
    model: str
    height: int
    width: int
    steps: int
    scheduler: str

    def key_params(self) -> dict[str, Any]:
        return {"model": self.model, "height": self.height, "width": self.width, "steps": self.steps,
                "scheduler": self.scheduler}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """fp32 arrays (safetensors/npz-friendly): ``x_t`` and ``uncond_embeddings``."""
        return {"x_t": self.x_t.detach().float().cpu().numpy(),
                "uncond_embeddings": self.uncond_embeddings.detach().float().cpu().numpy()}

    def meta(self) -> dict[str, Any]:
        return {**self.key_params(), "guidance_scale": self.guidance_scale, "method": self.method,
                "caption": self.caption}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Inversion:
        return cls(x_t=torch.from_numpy(np.asarray(arrays["x_t"], dtype=np.float32)),
                   uncond_embeddings=torch.from_numpy(np.asarray(arrays["uncond_embeddings"], dtype=np.float32)),
                   guidance_scale=float(meta["guidance_scale"]), method=str(meta["method"]),
                   caption=str(meta["caption"]), model=str(meta["model"]), height=int(meta["height"]),
                   width=int(meta["width"]), steps=int(meta["steps"]), scheduler=str(meta["scheduler"]))


@dataclass
class InversionResult:
    job_id: str
    inversion: Inversion | None = None
    trajectory: torch.Tensor | None = None  # (steps + 1, 1, 4, h, w): z*_0 (the photo) … z*_T, fp32
    losses: list[list[float]] = field(default_factory=list)  # null-text: each step's inner-iteration losses
    reconstruction_latents: torch.Tensor | None = None  # (1, 4, h, w) fp32: guided sampling from x_T
    pixels: Any = None  # (1, H, W, 3) float decoded reconstruction
    images: list[Any] = field(default_factory=list)  # [reconstruction PIL image]
    params: dict[str, Any] = field(default_factory=dict)
    unet_rows: int = 0  # UNet rows this job cost (forward rows; a backward counts as one more)
    error: Exception | None = None
    canceled: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.canceled

    @property
    def reconstruction_error(self) -> float:
        """MSE between the reconstruction's latent and the photo's latent (fp32)."""
        return float(F.mse_loss(self.reconstruction_latents, self.trajectory[0]).item())


@dataclass
class InversionProgress:
    """Where one job is: ``phase`` "ddim" (``step`` of ``steps`` walked) or "null-text" (step, and
    ``inner`` iterations done of at most ``inner_total`` at that step); ``done``/``total`` count both phases in
    UNet-work units so a progress bar moves evenly."""

    job_id: str
    phase: Literal["ddim", "null-text", "reconstruction"]
    step: int
    steps: int
    inner: int = 0
    inner_total: int = 0
    done: int = 0
    total: int = 0


OnProgress = Callable[[InversionProgress], Any]


# ---------------------------------------------------------------------------------------------------
# DDIM arithmetic (the reference's own formulas)


def _alpha(scheduler, timestep: int) -> torch.Tensor:
    return scheduler.alphas_cumprod[timestep] if timestep >= 0 else scheduler.final_alpha_cumprod


def _ddim_move(eps: torch.Tensor, latent: torch.Tensor, alpha_from: torch.Tensor, alpha_to: torch.Tensor):
    """Deterministic DDIM from noise level ā_from to ā_to given the noise estimate ``eps``."""
    original = (latent - (1 - alpha_from) ** 0.5 * eps) / alpha_from ** 0.5
    return alpha_to ** 0.5 * original + (1 - alpha_to) ** 0.5 * eps


def step_size(scheduler) -> int:
    return scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def next_step(scheduler, eps: torch.Tensor, timestep: int, latent: torch.Tensor) -> torch.Tensor:
    """Inversion step: from level ``timestep − 1000/T`` up to ``timestep`` (eps evaluated at ``timestep``)."""
    current = min(timestep - step_size(scheduler), 999)
    return _ddim_move(eps, latent, _alpha(scheduler, current), scheduler.alphas_cumprod[timestep])


def prev_step(scheduler, eps: torch.Tensor, timestep: int, latent: torch.Tensor) -> torch.Tensor:
    """Sampling step: from level ``timestep`` down to ``timestep − 1000/T`` (DDIM, eta 0)."""
    return _ddim_move(eps, latent, scheduler.alphas_cumprod[timestep],
                      _alpha(scheduler, timestep - step_size(scheduler)))


# ---------------------------------------------------------------------------------------------------
# Inputs


def photo_tensor(image, height: int, width: int) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]: RGB, centre crop to the target aspect, resize (the reference's ``load_512``)."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    aspect = width / height
    if w / h > aspect:
        new_w = round(h * aspect)
        box = ((w - new_w) // 2, 0, (w - new_w) // 2 + new_w, h)
    else:
        new_h = round(w / aspect)
        box = (0, (h - new_h) // 2, w, (h - new_h) // 2 + new_h)
    image = image.crop(box).resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


@torch.no_grad()
def encode_photo(ctx: SamplingContext, image) -> torch.Tensor:
    """z*_0 = VAE posterior mean × scaling factor (the reference encodes the mean, not a sample)."""
    vae = ctx.model.vae
    pixels = photo_tensor(image, ctx.height, ctx.width).to(device=ctx.device, dtype=vae.dtype)
    return (vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor).to(ctx.dtype)


def validate(spec: InversionSpec, ctx: SamplingContext) -> None:
    """Refuse what the inversion cannot run, naming the field (HTTP 4xx upstream)."""
    from worker.editing.words import check_prompt_length

    if spec.method not in METHODS:
        raise EditValidationError("method", f"unknown inversion method {spec.method!r}; choose from {list(METHODS)}")
    if ctx.scheduler != "ddim":
        raise EditValidationError("scheduler", f"inversion needs the deterministic DDIM scheduler, not {ctx.scheduler!r}")
    g = spec.guidance_scale
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or not 1.0 <= g <= 30.0:
        raise EditValidationError("guidance_scale", f"expected a number in [1, 30], got {g!r}")
    n = spec.num_inner_steps
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_INNER_STEPS:
        raise EditValidationError("num_inner_steps", f"expected an integer in [1, {MAX_INNER_STEPS}], got {n!r}")
    e = spec.early_stop_epsilon
    if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or not 0.0 <= e <= 1.0:
        raise EditValidationError("early_stop_epsilon", f"expected a number in [0, 1], got {e!r}")
    if (spec.image is None) == (spec.latents is None):
        raise EditValidationError("image", "give exactly one of an image or its latents")
    if spec.latents is not None:
        expected = (1, ctx.latent_channels, *ctx.latent_size)
        if tuple(spec.latents.shape) != expected:
            raise EditValidationError("image", f"latents of shape {tuple(spec.latents.shape)}, expected {expected}")
    check_prompt_length(spec.caption, ctx.model.tokenizer, "caption")


# ---------------------------------------------------------------------------------------------------
# One job's state


class InversionState:
    """One photo's walk and (null-text) per-step optimisation; the batch only borrows its UNet rows."""

    def __init__(self, spec: InversionSpec, ctx: SamplingContext):
        validate(spec, ctx)
        self.spec = spec
        self.ctx = ctx
        self.scheduler = ctx.new_scheduler()
        self.timesteps = [int(t) for t in self.scheduler.timesteps]  # descending
        z0 = spec.latents if spec.latents is not None else encode_photo(ctx, spec.image)
        self.latent = z0.to(device=ctx.device, dtype=ctx.dtype).detach()
        self.trajectory = [self.latent]
        self.cond = ctx.model.encode_text([spec.caption])
        self.uncond = ctx.null_text() if spec.method != "negative-prompt" else self.cond
        self.uncond_per_step: list[torch.Tensor] = []
        self.losses: list[list[float]] = []
        self.unet_rows = 0
        # null-text step state
        self.param: torch.Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.eps_cond: torch.Tensor | None = None
        self.stopped = False

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def optimises(self) -> bool:
        return self.spec.method == "null-text"

    @property
    def total_work(self) -> int:
        return self.steps * (1 + (self.spec.num_inner_steps if self.optimises else 0))

    # --- DDIM walk ---------------------------------------------------------------------------------
    def walk(self, eps: torch.Tensor, k: int) -> None:
        """Walk step k (0 = least noisy) with the caption-conditioned prediction at the destination level."""
        self.latent = next_step(self.scheduler, eps, self.timesteps[self.steps - 1 - k], self.latent)
        self.trajectory.append(self.latent)

    # --- null-text ---------------------------------------------------------------------------------
    def begin_step(self, i: int, eps_cond: torch.Tensor) -> None:
        """A new Adam on a copy of the previous step's embedding, as the reference restarts it each step."""
        self.param = self.uncond.detach().clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.param], lr=learning_rate(i))
        self.eps_cond = eps_cond
        self.stopped = False
        self.losses.append([])

    def loss(self, eps_uncond: torch.Tensor, i: int) -> torch.Tensor:
        """MSE between one guided DDIM step from the current latent and the walk's next-less-noisy latent."""
        eps = eps_uncond + self.spec.guidance_scale * (self.eps_cond - eps_uncond)
        landed = prev_step(self.scheduler, eps, self.timesteps[i], self.latent)
        return F.mse_loss(landed, self.trajectory[self.steps - 1 - i])

    def optimise(self, grad: torch.Tensor, loss: float, i: int) -> None:
        """One Adam step on this job's embedding; stop early once the (pre-step) loss is under threshold."""
        self.param.grad = grad
        self.optimizer.step()
        self.losses[-1].append(loss)
        if loss < early_stop_threshold(self.spec.early_stop_epsilon, i):
            self.stopped = True

    def end_step(self) -> None:
        self.uncond = self.param.detach()
        self.uncond_per_step.append(self.uncond)
        self.param = self.optimizer = None

    def advance(self, eps_uncond: torch.Tensor, i: int) -> None:
        """Move the current latent one guided step down with this step's final embedding."""
        eps = eps_uncond + self.spec.guidance_scale * (self.eps_cond - eps_uncond)
        self.latent = prev_step(self.scheduler, eps, self.timesteps[i], self.latent)
        self.eps_cond = None

    # --- result ------------------------------------------------------------------------------------
    def inversion(self) -> Inversion:
        if self.optimises:
            uncond = torch.cat(self.uncond_per_step)
        else:
            uncond = self.uncond.expand(self.steps, -1, -1).clone()
        ctx = self.ctx
        return Inversion(x_t=self.trajectory[-1].detach().clone(), uncond_embeddings=uncond.detach(),
                         guidance_scale=float(self.spec.guidance_scale), method=self.spec.method,
                         caption=self.spec.caption, model=ctx.model.spec.name, height=ctx.height,
                         width=ctx.width, steps=ctx.steps, scheduler=ctx.scheduler)

    def params(self) -> dict[str, Any]:
        s = self.spec
        return {**self.ctx.params(), "caption": s.caption, "method": s.method, "guidance_scale": s.guidance_scale,
                "num_inner_steps": s.num_inner_steps, "early_stop_epsilon": s.early_stop_epsilon}


# ---------------------------------------------------------------------------------------------------
# Sampling from an inversion (the source branch of an edit, alone)


@torch.no_grad()
def reconstruct(model, inversions: Sequence[Inversion], captions_cond: Sequence[torch.Tensor] | None = None,
                row_vectors: PerJobRowVectors | None = None) -> list[torch.Tensor]:
    """Guided DDIM sampling from each inversion's x_T with its per-step unconditional embeddings, batched.

    This is what an edit's source branch computes, without attention control.
    """
    if not inversions:
        return []
    first = inversions[0]
    ctx = SamplingContext(model, first.height, first.width, first.steps, first.scheduler)
    scheduler = ctx.new_scheduler()
    conds = list(captions_cond) if captions_cond is not None else [model.encode_text([inv.caption])
                                                                   for inv in inversions]
    latents = [inv.x_t.to(device=ctx.device, dtype=ctx.dtype) for inv in inversions]
    own_rows = row_vectors is None
    row_vectors = row_vectors or PerJobRowVectors(model.unet)
    try:
        row_vectors.segments = [2] * len(inversions)
        for i, t in enumerate(scheduler.timesteps):
            x = torch.cat([torch.cat([z, z]) for z in latents])
            text = torch.cat([torch.cat([inv.uncond_embeddings[i:i + 1].to(device=ctx.device, dtype=ctx.dtype), c])
                              for inv, c in zip(inversions, conds)])
            eps = model.unet(x, t.reshape(1).expand(x.shape[0]), encoder_hidden_states=text, return_dict=False)[0]
            for j, (inv, rows) in enumerate(zip(inversions, eps.split(2))):
                uncond, cond = rows.chunk(2)
                guided = uncond + inv.guidance_scale * (cond - uncond)
                latents[j] = prev_step(scheduler, guided, int(t), latents[j])
    finally:
        if own_rows:
            row_vectors.restore()
    return latents


# ---------------------------------------------------------------------------------------------------
# Runner


class PerJobTextProjections(PerJobRowVectors):
    """Cross-attention key/value projections computed job by job, forward and backward.

    Why: their GEMMs have jobs × 77 rows, and the kernel (hence the rounding) depends on the row count. The
    inner loop's gradients flow through them to the embeddings, and Adam divides each coordinate by its own
    gradient's magnitude, so a 1-ulp difference on a near-zero gradient becomes a full ``lr`` step: a batched
    null-text inversion would not equal the job alone.
    """

    def __init__(self, unet):  # noqa: D107 — same machinery as the base, other modules
        self.segments = None
        self._patched = []
        for name, module in unet.named_modules():
            if name.endswith(("attn2.to_k", "attn2.to_v")) and isinstance(module, torch.nn.Linear):
                own = module.__dict__.get("forward")
                module.forward = self._per_job(module.forward)
                self._patched.append((module, own))


class _Segmented:
    """Both per-job patches of one UNet, set together."""

    def __init__(self, unet):
        self.parts = [PerJobRowVectors(unet), PerJobTextProjections(unet)]

    @property
    def segments(self):
        return self.parts[0].segments

    @segments.setter
    def segments(self, value) -> None:
        for part in self.parts:
            part.segments = value

    def restore(self) -> None:
        for part in reversed(self.parts):
            part.restore()


class InversionRunner:
    """Inverts compatible photos — same (model, height, width, steps, scheduler) — sharing every UNet call.

    ``run`` returns one ``InversionResult`` per spec, in order; errors and cancellation stay with their job.
    ``on_progress`` (an ``InversionProgress``) may cancel its job by returning True or raising ``JobCanceled``.
    """

    def __init__(self, model, *, height: int, width: int, steps: int, scheduler: str = "ddim",
                 reconstruct: bool = True):
        factor = model.vae_scale_factor
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.model = model
        self.ctx = SamplingContext(model, height, width, steps, scheduler)
        self.with_reconstruction = reconstruct

    def run(self, specs: Sequence[InversionSpec], on_progress: OnProgress | None = None) -> list[InversionResult]:
        results: list[InversionResult | None] = [None] * len(specs)
        live: list[tuple[int, InversionState]] = []
        with self.model.lock:
            for index, spec in enumerate(specs):
                try:
                    live.append((index, InversionState(spec, self.ctx)))
                except Exception as exc:  # noqa: BLE001 — validation belongs to the job
                    results[index] = InversionResult(job_id=spec.job_id, error=exc, params=self.ctx.params())
            row_vectors = _Segmented(self.model.unet)
            try:
                live = self._walk(live, results, row_vectors, on_progress)
                live = self._null_text(live, results, row_vectors, on_progress)
                self._finish(live, results, row_vectors)
            finally:
                row_vectors.restore()
        return results  # type: ignore[return-value]

    # --- plumbing ----------------------------------------------------------------------------------
    def _unet(self, row_vectors: PerJobRowVectors, latents: list[torch.Tensor], t: int,
              text: list[torch.Tensor]) -> torch.Tensor:
        """One UNet call, one row per job; each job's timestep embedding computed as if it ran alone."""
        row_vectors.segments = [1] * len(latents)
        x = torch.cat(latents)
        timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return self.model.unet(x, timesteps, encoder_hidden_states=torch.cat(text), return_dict=False)[0]

    def _report(self, state: InversionState, progress: InversionProgress, on_progress: OnProgress | None) -> bool:
        """True when the job's callback asks to stop it."""
        if on_progress is None:
            return False
        try:
            return bool(on_progress(progress))
        except JobCanceled:
            return True

    def _settle(self, live, results, stop: dict[int, Exception | None]) -> list[tuple[int, InversionState]]:
        """Drop jobs that were canceled (None) or failed (an exception) from ``live``."""
        kept = []
        for index, state in live:
            if index in stop:
                exc = stop[index]
                results[index] = InversionResult(job_id=state.job_id, error=exc, canceled=exc is None,
                                                 params=state.params(), unet_rows=state.unet_rows)
            else:
                kept.append((index, state))
        return kept

    def _progress_each(self, live, results, make: Callable[[InversionState], InversionProgress], on_progress):
        stop: dict[int, Exception | None] = {}
        for index, state in live:
            try:
                if self._report(state, make(state), on_progress):
                    stop[index] = None
            except Exception as exc:  # noqa: BLE001 — a broken progress sink fails its own job
                stop[index] = exc
        return self._settle(live, results, stop)

    # --- phases ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _walk(self, live, results, row_vectors, on_progress):
        """DDIM inversion at guidance 1: one shared UNet call per level, timesteps ascending."""
        steps = self.ctx.steps
        for k in range(steps):
            if not live:
                break
            states = [s for _, s in live]
            t = states[0].timesteps[steps - 1 - k]
            eps = self._unet(row_vectors, [s.latent for s in states], t, [s.cond for s in states])
            for s, rows in zip(states, eps.split(1)):
                s.walk(rows, k)
                s.unet_rows += 1
            live = self._progress_each(live, results, lambda s: InversionProgress(
                s.job_id, "ddim", k + 1, steps, done=k + 1, total=s.total_work), on_progress)
        return live

    def _null_text(self, live, results, row_vectors, on_progress):
        """Per step: the conditional prediction once, then the inner loop over still-optimising jobs, then the
        guided advance with the step's final embeddings — each a shared UNet call."""
        optimising = [(i, s) for i, s in live if s.optimises]
        others = [(i, s) for i, s in live if not s.optimises]
        for s in (s for _, s in optimising):
            s.latent = s.trajectory[-1]
        for i in range(self.ctx.steps):
            if not optimising:
                break
            states = [s for _, s in optimising]
            t = states[0].timesteps[i]
            with torch.no_grad():
                eps_cond = self._unet(row_vectors, [s.latent for s in states], t, [s.cond for s in states])
            for s, rows in zip(states, eps_cond.split(1)):
                s.begin_step(i, rows)
                s.unet_rows += 1
            inner_total = max(s.spec.num_inner_steps for s in states)
            for j in range(inner_total):
                active = [s for s in states if not s.stopped and j < s.spec.num_inner_steps]
                if not active:
                    break
                with torch.enable_grad():
                    eps_u = self._unet(row_vectors, [s.latent for s in active], t, [s.param for s in active])
                    losses = [s.loss(rows, i) for s, rows in zip(active, eps_u.split(1))]
                    grads = torch.autograd.grad(torch.stack(losses).sum(), [s.param for s in active])
                for s, loss, grad in zip(active, losses, grads):
                    s.optimise(grad, loss.item(), i)
                    s.unet_rows += 2
            for s in states:
                s.end_step()
            with torch.no_grad():
                eps_u = self._unet(row_vectors, [s.latent for s in states], t, [s.uncond for s in states])
            for s, rows in zip(states, eps_u.split(1)):
                s.advance(rows, i)
                s.unet_rows += 1

            def progress(s: InversionState, i=i) -> InversionProgress:
                inner = s.spec.num_inner_steps
                return InversionProgress(s.job_id, "null-text", i + 1, s.steps, inner=len(s.losses[-1]),
                                         inner_total=inner, done=s.steps + (i + 1) * inner,
                                         total=s.total_work)

            optimising = self._progress_each(optimising, results, progress, on_progress)
        return others + optimising

    def _finish(self, live, results, row_vectors) -> None:
        if not live:
            return
        states = [s for _, s in live]
        inversions = [s.inversion() for s in states]
        reconstructions: list[torch.Tensor | None] = [None] * len(states)
        outcomes: list[Any] = [None] * len(states)
        if self.with_reconstruction:
            reconstructions = reconstruct(self.model, inversions, [s.cond for s in states], row_vectors)
            outcomes = decode_many(self.model, reconstructions)
            for s in states:
                s.unet_rows += 2 * s.steps
        for (index, s), inv, rec, outcome in zip(live, inversions, reconstructions, outcomes):
            result = InversionResult(job_id=s.job_id, inversion=inv,
                                     trajectory=torch.stack([z.detach().float().cpu() for z in s.trajectory]),
                                     losses=s.losses, params=s.params(), unet_rows=s.unet_rows)
            if rec is not None:
                result.reconstruction_latents = rec.float().cpu()
            if isinstance(outcome, Exception):
                result.error = outcome
            elif outcome is not None:
                result.pixels, result.images = outcome
            results[index] = result


def invert(model, spec: InversionSpec, *, height: int, width: int, steps: int, scheduler: str = "ddim",
           reconstruct: bool = True) -> InversionResult:
    """One photo alone (the batched runner with a batch of one)."""
    return InversionRunner(model, height=height, width=width, steps=steps, scheduler=scheduler,
                           reconstruct=reconstruct).run([spec])[0]
