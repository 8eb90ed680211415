"""Prompt-to-Prompt sampling state for one job: shared x_T, CFG text rows, and the attention controller.

The attention edits themselves live in ``controllers``/``processor``; this module only wires a job into
the batch: rows [uncond × n, cond × n] (the router's segment for the job), classic CFG, the job's own
scheduler step, then the controller's after-step hook (local blend).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from worker.editing.attention_maps import job_peak, render_token_grid
from worker.editing.base import JobState, SamplingContext, seeded_generator
from worker.editing.jobs import AttentionMaps, EditValidationError, JobResult, P2PJobSpec


def cfg_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_u + g·(eps_c − eps_u), in diffusers' operation order (bit-equal to StableDiffusionPipeline)."""
    return uncond + scale * (cond - uncond)


def shared_initial_latent(ctx: SamplingContext, generator: torch.Generator) -> torch.Tensor:
    """x_T (1, 4, h, w): ONE draw for the whole job, so source and targets start from the same noise."""
    shape = (1, ctx.latent_channels, *ctx.latent_size)
    return randn_tensor(shape, generator=generator, device=ctx.device, dtype=ctx.dtype)


def twin_generators(generator: torch.Generator, count: int) -> list[torch.Generator]:
    """``count`` generators in the same state: ancestral samplers then add the SAME noise to every prompt,
    which keeps source and targets aligned (as the IP2P dataset engine does); deterministic DDIM ignores them."""
    state = generator.get_state()
    twins = []
    for _ in range(count):
        twin = torch.Generator("cpu")
        twin.set_state(state)
        twins.append(twin)
    return twins


def build_job_controller(spec: P2PJobSpec, ctx: SamplingContext, num_steps: int):
    """The job's controller over ``num_steps`` UNet calls, its windows fractions of the requested steps."""
    from worker.editing.controllers import build_controller

    controller = build_controller(spec, ctx.model.tokenizer, num_steps, ctx.latent_size, schedule_steps=ctx.steps)
    if ctx.tensor_controllers:
        from worker.editing.tensor_controller import TensorController

        return TensorController(controller)
    return controller


def check_inversion_fits(inversion, ctx: SamplingContext) -> None:
    """An inversion's embeddings belong to its exact steps, scheduler, size and model: refuse any other."""
    expected = {"model": ctx.model.spec.name, "height": ctx.height, "width": ctx.width, "steps": ctx.steps,
                "scheduler": ctx.scheduler}
    for name, value in inversion.key_params().items():
        if value != expected[name]:
            raise EditValidationError(name, f"the inversion was made with {name} {value!r}, this edit uses "
                                            f"{expected[name]!r}")
    if tuple(inversion.uncond_embeddings.shape[:1]) != (ctx.steps,):
        raise EditValidationError("inversion", f"{inversion.uncond_embeddings.shape[0]} embeddings for "
                                               f"{ctx.steps} steps")


class P2PJobState(JobState):
    """One P2P job: prompt 0 is the source, 1..n−1 the targets; all from one x_T."""

    spec: P2PJobSpec

    @classmethod
    def create(cls, spec: P2PJobSpec, ctx: SamplingContext) -> JobState:
        if len(spec.group_seeds) > 1:
            return P2PGroupsJobState(spec, ctx)
        return cls(spec, ctx)

    def __init__(self, spec: P2PJobSpec, ctx: SamplingContext):
        prompts = spec.prompts
        n = len(prompts)
        generator = seeded_generator(spec.seed)
        inversion = spec.inversion
        if inversion is not None:
            check_inversion_fits(inversion, ctx)
            x_t = inversion.x_t.to(device=ctx.device, dtype=ctx.dtype)
        else:
            x_t = shared_initial_latent(ctx, generator)
        super().__init__(spec, ctx, twin_generators(generator, n))
        self.controller = build_job_controller(spec, ctx, self.total_steps)
        self.latents = x_t.repeat(n, 1, 1, 1) * self.scheduler.init_noise_sigma
        model = ctx.model
        self.guidance_scale = spec.guidance_scale if inversion is None else inversion.guidance_scale
        self._cond_rows = model.encode_text(prompts)
        self._text_rows = torch.cat([ctx.unconditional_text(spec.negative_prompt).expand(n, -1, -1), self._cond_rows])
        self._uncond_per_step = None
        if inversion is not None:  # one more per-row input: step i's unconditional embedding replaces ""
            self.per_step_text = True
            self._uncond_per_step = inversion.uncond_embeddings.to(device=ctx.device, dtype=ctx.dtype)

    @property
    def num_prompts(self) -> int:
        return len(self.spec.prompts)

    @property
    def num_rows(self) -> int:
        return 2 * self.num_prompts

    def text_rows(self) -> torch.Tensor:
        if self._uncond_per_step is None:
            return self._text_rows
        uncond = self._uncond_per_step[self.step_index:self.step_index + 1]
        return torch.cat([uncond.expand(self.num_prompts, -1, -1), self._cond_rows])

    def model_input(self) -> torch.Tensor:
        self.controller.begin_step(self.step_index)
        return self.scheduler.scale_model_input(torch.cat([self.latents] * 2), self.timestep())

    def guide(self, noise_pred: torch.Tensor) -> torch.Tensor:
        uncond, cond = noise_pred.chunk(2)
        return cfg_guidance(uncond, cond, self.guidance_scale)

    def after_step(self, latents: torch.Tensor) -> torch.Tensor:
        return self.controller.after_step(latents)

    def params(self) -> dict[str, Any]:
        s = self.spec
        return {**self.ctx.params(), "seed": s.seed, "guidance_scale": self.guidance_scale, "edit": s.edit,
                "prompts": s.prompts, "cross_replace_steps": s.cross_replace_steps,
                "self_replace_steps": s.self_replace_steps}

    def result(self, pixels: np.ndarray, images: list) -> JobResult:
        maps = shared_scale_grids([self.controller.attention_maps(i, render=False)
                                   for i in self.spec.attention_map_prompts],
                                  images if self.spec.attention_overlay else None)
        return JobResult(job_id=self.job_id, images=images, labels=list(self.spec.prompts),
                         latents=self.latents.float().cpu(), pixels=pixels, attention_maps=maps,
                         params=self.params())


def shared_scale_grids(maps: list[AttentionMaps], images: list | None) -> list[AttentionMaps]:
    """Every grid of a job drawn on one scale (``attention_maps.job_peak``), titled with its prompt and, with
    ``images`` (the job's outputs, by prompt index), over its prompt's image."""
    peak = job_peak([m.maps for m in maps])
    for m in maps:
        image = images[m.prompt_index] if images is not None else None
        m.grid_png = render_token_grid(m.tokens, m.maps, peak=peak, title=m.prompt, image=image)
    return maps


class P2PGroupsJobState(JobState):
    """Several outputs of one P2P job (``seeds``): one ``P2PJobState`` per seed — its own x_T, generators,
    scheduler and controller, exactly the state a request with that seed alone would have — whose rows are laid
    one group after another in the job's UNet rows. Each group is its own attention segment and its own
    row-vector group, so every group's arithmetic is that of the lone request (the batch's invariance).

    Attention maps come from the first group only (they would repeat the prompts' maps per seed)."""

    spec: P2PJobSpec

    def __init__(self, spec: P2PJobSpec, ctx: SamplingContext):
        if spec.inversion is not None:
            raise EditValidationError("seeds", "an edit from an inversion starts from its x_T: one output only")
        self.spec = spec
        self.ctx = ctx
        self.groups = [P2PJobState(dataclasses.replace(spec, seed=seed, seeds=None,
                                                       attention_map_prompts=spec.attention_map_prompts if i == 0
                                                       else []), ctx)
                       for i, seed in enumerate(spec.group_seeds)]
        self.controller = self.groups[0].controller
        self.per_step_text = any(g.per_step_text for g in self.groups)

    @property
    def step_index(self) -> int:
        return self.groups[0].step_index

    @property
    def timesteps(self) -> torch.Tensor:
        return self.groups[0].timesteps

    @property
    def latents(self) -> torch.Tensor:
        return torch.cat([g.latents for g in self.groups])

    @property
    def num_rows(self) -> int:
        return sum(g.num_rows for g in self.groups)

    @property
    def row_groups(self) -> list[int]:
        return [n for g in self.groups for n in g.row_groups]

    def attention_segments(self) -> list[tuple[int, Any]]:
        return [seg for g in self.groups for seg in g.attention_segments()]

    def text_rows(self) -> torch.Tensor:
        return torch.cat([g.text_rows() for g in self.groups])

    def model_input(self) -> torch.Tensor:
        return torch.cat([g.model_input() for g in self.groups])

    def row_timesteps(self) -> torch.Tensor:
        return torch.cat([g.row_timesteps() for g in self.groups])

    def guide(self, noise_pred: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a P2P job of several groups advances group by group")

    def advance(self, noise_pred: torch.Tensor) -> None:
        for group, rows in zip(self.groups, noise_pred.split([g.num_rows for g in self.groups])):
            group.advance(rows)
        made = [g.take_preview() for g in self.groups]
        if all(m is not None for m in made):  # one preview of every output (groups step together)
            self.preview = (made[0][0], [image for m in made for image in m[1]])

    def params(self) -> dict[str, Any]:
        return {**self.groups[0].params(), "seed": self.spec.group_seeds[0], "seeds": self.spec.group_seeds}

    def result(self, pixels: np.ndarray, images: list) -> JobResult:
        n = len(self.spec.prompts)  # the first group's images are images[:n]
        maps = shared_scale_grids([self.groups[0].controller.attention_maps(i, render=False)
                                   for i in self.spec.attention_map_prompts],
                                  images[:n] if self.spec.attention_overlay else None)
        seeds = self.spec.group_seeds
        labels = [prompt for _ in seeds for prompt in self.spec.prompts]
        return JobResult(job_id=self.job_id, images=images, labels=labels, latents=self.latents.float().cpu(),
                         pixels=pixels, attention_maps=maps, params=self.params())
