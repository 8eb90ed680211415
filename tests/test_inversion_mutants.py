"""Inversion's pieces on a stub model: fast, exact checks against the Prompt-to-Prompt reference's formulas.

Why a stub: tests/test_inversion.py checks the properties on a real (tiny) diffusion model, but each of its
inversions takes seconds. Here the UNet is a few small linear maps (eps linear in the text, so the null-text
problem is smooth) with the sub-layer names the per-job patches look for, the VAE is pooling/upsampling and the
scheduler is diffusers' DDIM as SD configures it. The runner is compared with the reference algorithm written
out below (``reference_*``: the null_text_w_ptp notebook's ``next_step``/``prev_step``/``ddim_loop``/
``null_optimization``), batched runs with each job alone, and every refusal names its field.
"""

from __future__ import annotations

import math
import threading
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from worker.editing.base import SamplingContext
from worker.editing.inversion import (
    Inversion,
    InversionResult,
    InversionRunner,
    InversionSpec,
    early_stop_threshold,
    encode_photo,
    invert,
    learning_rate,
    next_step,
    photo_tensor,
    prev_step,
    reconstruct,
    step_size,
    validate,
)
from worker.editing.jobs import EditValidationError, JobCanceled

SIZE, STEPS, DIM = 16, 4, 8
CAPTION = "a photo of a cat"


class RowSpy(torch.nn.Linear):
    """A Linear that records the row count of every call (to see the per-job patches split a batch)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[int] = []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return super().forward(x)


class StubUNet(torch.nn.Module):
    """eps = (0.5 + 0.1·tanh(time MLP))·x + text term, the text term linear in the embedding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.time_embedding = torch.nn.Module()
        self.time_embedding.linear_1 = RowSpy(1, 4)
        self.block = torch.nn.Module()
        self.block.attn2 = torch.nn.Module()
        self.block.attn2.to_k = RowSpy(DIM, 4, bias=False)
        self.block.attn2.to_v = RowSpy(DIM, 4, bias=False)

    def forward(self, x, timesteps, encoder_hidden_states, return_dict=True):
        assert timesteps.shape == (x.shape[0],)
        if x.dtype != torch.float32:  # as a real UNet's first conv refuses input of another dtype
            raise RuntimeError(f"input type {x.dtype} and weight type torch.float32 should be the same")
        temb = torch.tanh(self.time_embedding.linear_1(timesteps.float().reshape(-1, 1) / 1000))
        attn = self.block.attn2
        text = (attn.to_k(encoder_hidden_states) + 0.5 * attn.to_v(encoder_hidden_states)).mean(1)
        return ((0.5 + 0.1 * temb[:, :, None, None]) * x + text[:, :, None, None],)


class StubVAE:
    dtype = torch.float32
    config = SimpleNamespace(latent_channels=4, scaling_factor=0.5)

    def encode(self, pixels):
        pooled = F.avg_pool2d(pixels, 8)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)))

    def decode(self, latents, return_dict=False):
        return (F.interpolate(latents[:, :3].tanh(), scale_factor=8),)


class StubTokenizer:
    model_max_length = 77

    def __call__(self, text, add_special_tokens=True, truncation=False):
        return SimpleNamespace(input_ids=[0, *([1] * len(text.split())), 2])


class StubModel:
    def __init__(self):
        from diffusers.image_processor import VaeImageProcessor

        self.spec = SimpleNamespace(name="stub")
        self.unet, self.vae, self.tokenizer = StubUNet(), StubVAE(), StubTokenizer()
        self.pipe = SimpleNamespace(image_processor=VaeImageProcessor(vae_scale_factor=8))
        self.lock = threading.Lock()
        self.device, self.dtype, self.vae_scale_factor = torch.device("cpu"), torch.float32, 8

    def new_scheduler(self, name=None):
        from diffusers import DDIMScheduler

        return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)

    def encode_text(self, prompts):
        generator = torch.Generator().manual_seed(zlib.crc32(prompts[0].encode()))
        return torch.randn(1, 77, DIM, generator=generator)


@pytest.fixture(scope="module")
def model():
    return StubModel()


@pytest.fixture(scope="module")
def runner(model):
    return InversionRunner(model, height=SIZE, width=SIZE, steps=STEPS)


def photo_latent(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def scheduler(model, steps=STEPS):
    sched = model.new_scheduler()
    sched.set_timesteps(steps)
    return sched


# ---------------------------------------------------------------------------------------------------
# the reference, written out


def level(sched, t: int):
    return sched.alphas_cumprod[t] if t >= 0 else sched.final_alpha_cumprod


def move(eps, z, a_from, a_to):
    return a_to.sqrt() * (z - (1 - a_from).sqrt() * eps) / a_from.sqrt() + (1 - a_to).sqrt() * eps


def reference_next(sched, eps, t, z):
    return move(eps, z, level(sched, t - 1000 // sched.num_inference_steps), sched.alphas_cumprod[t])


def reference_prev(sched, eps, t, z):
    return move(eps, z, sched.alphas_cumprod[t], level(sched, t - 1000 // sched.num_inference_steps))


def eps_of(model, z, t, text):
    return model.unet(z, torch.full((1,), int(t)), encoder_hidden_states=text)[0]


@torch.no_grad()
def reference_walk(model, z0, caption, steps=STEPS):
    sched, cond = scheduler(model, steps), model.encode_text([caption])
    trajectory = [z0]
    for t in reversed([int(t) for t in sched.timesteps]):
        trajectory.append(reference_next(sched, eps_of(model, trajectory[-1], t, cond), t, trajectory[-1]))
    return trajectory


def reference_null_text(model, z0, caption, guidance=7.5, inner=10, epsilon=1e-5, steps=STEPS):
    """The notebook's ``null_optimization`` (one job, loss.backward, a new Adam per step)."""
    sched, cond = scheduler(model, steps), model.encode_text([caption])
    trajectory = reference_walk(model, z0, caption, steps)
    latent, uncond, embeddings, losses = trajectory[-1], model.encode_text([""]), [], []
    for i, t in enumerate(int(t) for t in sched.timesteps):
        uncond = uncond.clone().detach().requires_grad_(True)
        optimizer = torch.optim.Adam([uncond], lr=1e-2 * (1.0 - i / 100.0))
        target = trajectory[len(trajectory) - i - 2]
        with torch.no_grad():
            eps_c = eps_of(model, latent, t, cond)
        losses.append([])
        for _ in range(inner):
            eps_u = eps_of(model, latent, t, uncond)
            loss = F.mse_loss(reference_prev(sched, eps_u + guidance * (eps_c - eps_u), t, latent), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[-1].append(loss.item())
            if loss.item() < epsilon + i * 2e-5:
                break
        uncond = uncond.detach()
        embeddings.append(uncond)
        with torch.no_grad():
            eps_u = eps_of(model, latent, t, uncond)
            latent = reference_prev(sched, eps_u + guidance * (eps_c - eps_u), t, latent)
    return trajectory, torch.cat(embeddings), losses


@torch.no_grad()
def reference_sampling(model, x_t, uncond_per_step, caption, guidance, steps=STEPS):
    sched, cond, z = scheduler(model, steps), model.encode_text([caption]), x_t
    for i, t in enumerate(int(t) for t in sched.timesteps):
        eps_u, eps_c = eps_of(model, z, t, uncond_per_step[i:i + 1]), eps_of(model, z, t, cond)
        z = reference_prev(sched, eps_u + guidance * (eps_c - eps_u), t, z)
    return z


def close(a, b, tol=1e-6) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= tol


# ---------------------------------------------------------------------------------------------------
# schedules and DDIM arithmetic


def test_learning_rate_and_early_stop_threshold_are_the_reference_schedules():
    assert learning_rate(0) == pytest.approx(1e-2, rel=1e-12)
    assert learning_rate(25) == pytest.approx(7.5e-3, rel=1e-12)
    assert early_stop_threshold(1e-5, 0) == pytest.approx(1e-5, rel=1e-12)
    assert early_stop_threshold(3e-4, 4) == pytest.approx(3e-4 + 4 * 2e-5, rel=1e-12)


def test_prev_step_is_diffusers_ddim_and_next_step_undoes_it(model):
    """``prev_step`` is DDIM (eta 0) from t down one level; ``next_step`` from one level below t up to t
    (the least noisy step starts from the final alpha); with the same eps each undoes the other."""
    from diffusers import DDIMScheduler

    # SD's config, and one whose last level is timestep 0 with a final alpha of 1 (level 0 is not the final one)
    other = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True, steps_offset=0)
    other.set_timesteps(STEPS)
    assert other.timesteps[-1] == 0
    z, eps = photo_latent(1), photo_latent(2)
    for sched in (scheduler(model), other):
        assert step_size(sched) == 1000 // STEPS
        for t in (int(t) for t in sched.timesteps):
            down = prev_step(sched, eps, t, z)
            assert close(down, sched.step(eps, t, z, eta=0.0).prev_sample, 1e-5)
            assert close(down, reference_prev(sched, eps, t, z))
            up = next_step(sched, eps, t, z)
            assert close(up, reference_next(sched, eps, t, z))
            assert close(next_step(sched, eps, t, down), z, 1e-4)
            assert close(prev_step(sched, eps, t, up), z, 1e-4)


# ---------------------------------------------------------------------------------------------------
# inputs and validation


def test_photo_tensor_centre_crops_to_the_target_aspect_and_scales_to_plus_minus_one():
    """An odd margin (11 px) splits as 5 + 6, like the reference's ``load_512``; the crop is the target size,
    so the pixels are the photo's own, scaled from [0, 255] to [-1, 1]."""
    rows, cols = np.mgrid[0:15, 0:15]
    pattern = (cols * 15 + rows * 2).astype(np.uint8)
    wide = np.stack([pattern[:4], 255 - pattern[:4], pattern[:4] // 2], axis=-1)  # 4 x 15, RGB
    out = photo_tensor(Image.fromarray(wide), 4, 4)
    assert out.shape == (1, 3, 4, 4) and out.dtype == torch.float32
    assert torch.equal(out[0], torch.from_numpy(wide[:, 5:9].astype(np.float32) / 127.5 - 1).permute(2, 0, 1))
    tall = pattern[:, :4].copy()  # 15 x 4, greyscale: converted to RGB
    out = photo_tensor(Image.fromarray(tall), 4, 4)
    expected = torch.from_numpy(tall[5:9].astype(np.float32) / 127.5 - 1)
    assert out.shape == (1, 3, 4, 4) and all(torch.equal(channel, expected) for channel in out[0])
    assert torch.equal(photo_tensor(Image.fromarray(np.full((4, 4), 255, np.uint8)), 4, 4), torch.ones(1, 3, 4, 4))
    # non-square targets: 2:1 keeps the middle rows of a square photo, 1:2 its middle columns
    square = pattern[:8, :8]
    assert torch.equal(photo_tensor(Image.fromarray(square), 4, 8)[0, 0],
                       torch.from_numpy(square[2:6].astype(np.float32) / 127.5 - 1))
    assert torch.equal(photo_tensor(Image.fromarray(square), 8, 4)[0, 0],
                       torch.from_numpy(square[:, 2:6].astype(np.float32) / 127.5 - 1))


def test_encode_photo_is_the_scaled_posterior_mean(model):
    ctx = SamplingContext(model, SIZE, SIZE, STEPS, "ddim")
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    z = encode_photo(ctx, Image.fromarray(pixels))
    expected = model.vae.encode(photo_tensor(Image.fromarray(pixels), SIZE, SIZE)).latent_dist.mean * 0.5
    assert z.shape == (1, 4, 2, 2) and torch.equal(z, expected)


GOOD = dict(method="null-text", guidance_scale=7.5, num_inner_steps=10, early_stop_epsilon=1e-5)


@pytest.mark.parametrize("field, change, words", [
    ("method", {"method": "textual"}, ["'textual'", "null-text", "ddim", "negative-prompt"]),
    ("guidance_scale", {"guidance_scale": float("nan")}, ["[1, 30]", "nan"]),
    ("guidance_scale", {"guidance_scale": 0.99}, ["[1, 30]", "0.99"]),
    ("guidance_scale", {"guidance_scale": 30.01}, ["30.01"]),
    ("guidance_scale", {"guidance_scale": True}, ["True"]),
    ("guidance_scale", {"guidance_scale": "7"}, ["'7'"]),
    ("num_inner_steps", {"num_inner_steps": 0}, ["[1, 50]", "0"]),
    ("num_inner_steps", {"num_inner_steps": 51}, ["51"]),
    ("num_inner_steps", {"num_inner_steps": 5.0}, ["5.0"]),
    ("num_inner_steps", {"num_inner_steps": True}, ["True"]),
    ("early_stop_epsilon", {"early_stop_epsilon": -0.001}, ["[0, 1]", "-0.001"]),
    ("early_stop_epsilon", {"early_stop_epsilon": 1.5}, ["1.5"]),
    ("early_stop_epsilon", {"early_stop_epsilon": float("inf")}, ["inf"]),
    ("early_stop_epsilon", {"early_stop_epsilon": False}, ["False"]),
    ("early_stop_epsilon", {"early_stop_epsilon": None}, ["None"]),
    ("caption", {"caption": "cat " * 80}, ["77"]),
])
def test_validate_names_the_field_and_the_allowed_values(model, field, change, words):
    ctx = SamplingContext(model, SIZE, SIZE, STEPS, "ddim")
    spec = InversionSpec("bad", **{"caption": CAPTION, "latents": photo_latent(0), **GOOD, **change})
    with pytest.raises(EditValidationError) as err:
        validate(spec, ctx)
    assert err.value.field == field
    assert all(word in err.value.message for word in words), err.value.message


@pytest.mark.parametrize("edge", [
    {"guidance_scale": 1}, {"guidance_scale": 30.0}, {"num_inner_steps": 1}, {"num_inner_steps": 50},
    {"early_stop_epsilon": 0}, {"early_stop_epsilon": 1.0}, {"method": "ddim"}, {"method": "negative-prompt"},
    {"caption": "cat " * 75},
])
def test_validate_accepts_the_edges(model, edge):
    validate(InversionSpec("ok", **{"caption": CAPTION, "latents": photo_latent(0), **GOOD, **edge}),
             SamplingContext(model, SIZE, SIZE, STEPS, "ddim"))


def test_validate_wants_ddim_and_exactly_one_input_of_the_batch_size(model):
    ctx = SamplingContext(model, SIZE, SIZE, STEPS, "ddim")
    image = Image.new("RGB", (SIZE, SIZE))
    cases = [
        (SamplingContext(model, SIZE, SIZE, STEPS, "euler_a"), {"latents": photo_latent(0)}, "scheduler",
         ["DDIM", "'euler_a'"]),
        (ctx, {}, "image", ["exactly one"]),
        (ctx, {"latents": photo_latent(0), "image": image}, "image", ["exactly one"]),
        (ctx, {"latents": torch.zeros(1, 4, 2, 3)}, "image", ["(1, 4, 2, 3)", "(1, 4, 2, 2)"]),
        (ctx, {"latents": torch.zeros(1, 3, 2, 2)}, "image", ["(1, 3, 2, 2)", "(1, 4, 2, 2)"]),
    ]
    for context, inputs, field, words in cases:
        with pytest.raises(EditValidationError) as err:
            validate(InversionSpec("bad", CAPTION, **inputs), context)
        assert err.value.field == field and all(w in err.value.message for w in words), err.value.message
        if words == ["exactly one"]:
            assert err.value.message == "give exactly one of an image or its latents"
    validate(InversionSpec("ok", CAPTION, image=image), ctx)


def test_runner_refuses_sizes_off_the_latent_grid_and_zero_steps(model):
    for height, width in ((12, 16), (16, 20), (0, 16), (16, 0), (16, -8)):
        with pytest.raises(ValueError, match=f"multiples of 8, got {height}x{width}"):
            InversionRunner(model, height=height, width=width, steps=STEPS)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        InversionRunner(model, height=SIZE, width=SIZE, steps=0)
    assert InversionRunner(model, height=8, width=8, steps=1).ctx.steps == 1


# ---------------------------------------------------------------------------------------------------
# results against the reference


def test_ddim_and_negative_prompt_inversions_are_the_walk_with_a_fixed_unconditional_text(model, runner):
    z0 = photo_latent(3)
    walk = reference_walk(model, z0, CAPTION)
    ddim, negative = runner.run([InversionSpec("ddim", CAPTION, latents=z0, method="ddim", guidance_scale=3),
                                 InversionSpec("neg", CAPTION, latents=z0, method="negative-prompt")])
    for result, uncond, guidance in ((ddim, model.encode_text([""]), 3.0),
                                     (negative, model.encode_text([CAPTION]), 7.5)):
        assert result.ok and result.losses == []
        assert close(result.trajectory, torch.stack(walk))
        inv = result.inversion
        assert close(inv.x_t, walk[-1]) and torch.equal(inv.x_t, result.trajectory[-1])
        assert inv.guidance_scale == guidance and inv.caption == CAPTION
        assert inv.key_params() == {"model": "stub", "height": SIZE, "width": SIZE, "steps": STEPS, "scheduler": "ddim"}
        assert inv.uncond_embeddings.shape == (STEPS, 77, DIM)
        assert all(torch.equal(row, uncond[0]) for row in inv.uncond_embeddings)
        expected = reference_sampling(model, walk[-1], inv.uncond_embeddings, CAPTION, guidance)
        assert close(result.reconstruction_latents, expected)
        assert result.reconstruction_error == pytest.approx(F.mse_loss(expected, z0).item(), rel=1e-5)
        assert result.pixels.shape == (1, SIZE, SIZE, 3) and result.images[0].size == (SIZE, SIZE)
        assert result.unet_rows == STEPS + 2 * STEPS  # the walk, then 2 rows a step for the reconstruction
        assert result.params == {"model": "stub", "height": SIZE, "width": SIZE, "steps": STEPS,
                                 "scheduler": "ddim", "caption": CAPTION, "method": result.inversion.method,
                                 "guidance_scale": guidance, "num_inner_steps": 10, "early_stop_epsilon": 1e-5}
    assert ddim.inversion.method == "ddim" and negative.inversion.method == "negative-prompt"
    # the negative prompt's guided reconstruction is the guidance-1 one
    assert close(negative.reconstruction_latents,
                 reference_sampling(model, walk[-1], ddim.inversion.uncond_embeddings, CAPTION, 1.0), 1e-5)


@pytest.mark.parametrize("epsilon, inner", [(1e-5, 10), (None, 6)])
def test_null_text_is_the_reference_optimisation(model, runner, epsilon, inner):
    """Adam restarted per step at the decayed rate on the previous step's embedding, stopping early under
    ε + i·2e-5; ``None``: ε between the losses, so steps stop after different numbers of iterations."""
    z0 = photo_latent(4)
    if epsilon is None:
        losses = [x for step in reference_null_text(model, z0, CAPTION, inner=inner)[2] for x in step]
        epsilon = float(np.median(losses))
    walk, embeddings, losses = reference_null_text(model, z0, CAPTION, inner=inner, epsilon=epsilon)
    result = runner.run([InversionSpec("nt", CAPTION, latents=z0, num_inner_steps=inner,
                                       early_stop_epsilon=epsilon)])[0]
    assert result.ok and result.inversion.method == "null-text"
    assert close(result.trajectory, torch.stack(walk))
    assert [len(step) for step in result.losses] == [len(step) for step in losses]
    if epsilon > 1e-5:  # the median: some steps stop early, others run all their iterations
        assert {len(step) for step in losses} != {inner}
    assert np.allclose(sum(result.losses, []), sum(losses, []), rtol=1e-5, atol=0)
    assert close(result.inversion.uncond_embeddings, embeddings, 1e-5)
    assert close(result.reconstruction_latents,
                 reference_sampling(model, walk[-1], embeddings, CAPTION, 7.5), 1e-5)
    iterations = sum(len(step) for step in losses)
    assert result.unet_rows == STEPS + 2 * STEPS + 2 * iterations + 2 * STEPS


def test_batched_jobs_equal_each_alone_and_a_bad_job_fails_alone(model, runner):
    """Different captions, methods, inner-step counts and thresholds in one batch; rows never mix, and the
    per-job patches split every batched call of the row-vector and text-projection layers job by job."""
    specs = [
        InversionSpec("a", CAPTION, latents=photo_latent(5), num_inner_steps=3),
        InversionSpec("bad", CAPTION, latents=photo_latent(5), num_inner_steps=0),
        InversionSpec("b", "a dog", latents=photo_latent(6), num_inner_steps=7, early_stop_epsilon=2e-3),
        InversionSpec("c", "a bird", latents=photo_latent(7).double(), method="ddim", guidance_scale=2.0),
        InversionSpec("d", CAPTION, image=Image.new("RGB", (SIZE, SIZE), (200, 30, 90)), guidance_scale=4.0,
                      num_inner_steps=5, early_stop_epsilon=0.0),
    ]
    attn = model.unet.block.attn2
    spies = (attn.to_k, attn.to_v, model.unet.time_embedding.linear_1)
    for spy in spies:
        spy.rows.clear()
    batched = runner.run(specs)
    assert all(max(spy.rows) <= 2 for spy in spies)  # 1 row per job (inversion), 2 (reconstruction)
    assert all("forward" not in vars(spy) for spy in spies)  # the patches are gone
    bad = batched[1]
    assert isinstance(bad.error, EditValidationError) and bad.error.field == "num_inner_steps"
    assert not bad.ok and not bad.canceled and bad.inversion is None
    assert bad.params == runner.ctx.params() and bad.job_id == "bad"
    for spec, result in zip(specs, batched):
        if spec.job_id == "bad":
            continue
        alone = runner.run([spec])[0]
        assert result.ok and result.job_id == spec.job_id and result.trajectory.dtype == torch.float32
        assert close(result.trajectory, alone.trajectory)
        assert close(result.inversion.uncond_embeddings, alone.inversion.uncond_embeddings, 1e-6)
        assert close(result.reconstruction_latents, alone.reconstruction_latents)
        assert [len(x) for x in result.losses] == [len(x) for x in alone.losses]
        assert np.allclose(sum(result.losses, []), sum(alone.losses, []), rtol=1e-6, atol=0)
        assert result.unet_rows == alone.unet_rows
    assert [len(x) for x in batched[0].losses] == [3] * STEPS
    assert [len(x) for x in batched[4].losses] == [5] * STEPS  # ε = 0: never stops early
    assert all(len(x) <= 7 for x in batched[2].losses)
    assert close(batched[3].trajectory, runner.run([InversionSpec("c", "a bird", latents=photo_latent(7), method="ddim",
                                                                  guidance_scale=2.0)])[0].trajectory)


def test_an_accelerate_style_forward_hook_survives_the_run(model, runner):
    """A module's own instance-level ``forward`` (as accelerate's offload hooks set) is put back, not dropped."""
    layers = (model.unet.block.attn2.to_v, model.unet.time_embedding.linear_1)
    hooks = []
    for layer in layers:
        hook = layer.forward  # the bound class method: behaves the same
        layer.forward = hook
        hooks.append(hook)
    try:
        runner.run([InversionSpec("a", CAPTION, latents=photo_latent(5), num_inner_steps=1),
                    InversionSpec("b", CAPTION, latents=photo_latent(6), num_inner_steps=1)])
        assert all(vars(layer).get("forward") is hook for layer, hook in zip(layers, hooks))
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)


def test_progress_reports_both_phases_and_each_job_can_cancel_or_fail_alone(model, runner):
    """ddim progress counts walked levels; null-text progress counts inner iterations; returning True or
    raising JobCanceled cancels only that job, a broken callback fails only its job."""
    seen = []

    def on_progress(p):
        seen.append(p)
        if p.job_id == "stop-walk" and p.phase == "ddim" and p.step == 2:
            return True
        if p.job_id == "stop-nt" and p.phase == "null-text" and p.step == 1:
            raise JobCanceled()
        if p.job_id == "broken" and p.phase == "null-text" and p.step == 2:
            raise RuntimeError("sink down")
        return 0

    z = photo_latent(8)
    specs = [InversionSpec(name, CAPTION, latents=z, num_inner_steps=3) for name in (
        "stop-walk", "stop-nt", "broken", "keep")] + [InversionSpec("ddim", CAPTION, latents=z, method="ddim")]
    walk_stop, nt_stop, broken, keep, ddim = runner.run(specs, on_progress=on_progress)
    assert walk_stop.canceled and walk_stop.error is None and not walk_stop.ok and walk_stop.unet_rows == 2
    assert walk_stop.params["method"] == "null-text" and walk_stop.inversion is None
    assert nt_stop.canceled and nt_stop.error is None and nt_stop.unet_rows == STEPS + 2 + 2 * 3
    assert isinstance(broken.error, RuntimeError) and not broken.canceled and broken.job_id == "broken"
    assert keep.ok and ddim.ok
    alone = runner.run([specs[3]])[0]
    assert close(keep.inversion.uncond_embeddings, alone.inversion.uncond_embeddings)
    mine = [p for p in seen if p.job_id == "keep"]
    total = STEPS * (1 + 3)
    assert [(p.phase, p.step, p.steps, p.done, p.total) for p in mine if p.phase == "ddim"] == [
        ("ddim", k, STEPS, k, total) for k in range(1, STEPS + 1)]
    assert [(p.step, p.steps, p.inner, p.inner_total, p.done, p.total) for p in mine if p.phase == "null-text"] == [
        (i + 1, STEPS, len(keep.losses[i]), 3, STEPS + (i + 1) * 3, total) for i in range(STEPS)]
    assert [p.total for p in seen if p.job_id == "ddim"] == [STEPS] * STEPS
    assert [p.step for p in seen if p.job_id == "stop-walk"] == [1, 2]


def test_a_batch_canceled_in_either_phase_ends_cleanly(model, runner):
    for phase in ("ddim", "null-text"):
        results = runner.run([InversionSpec("x", CAPTION, latents=photo_latent(9), num_inner_steps=2)],
                             on_progress=lambda p, phase=phase: p.phase == phase)
        assert results[0].canceled and results[0].unet_rows == (1 if phase == "ddim" else STEPS + 2 + 2 * 2)


def test_without_reconstruction_or_with_a_failing_decoder(model, runner, monkeypatch):
    spec = InversionSpec("x", CAPTION, latents=photo_latent(10), method="ddim")
    plain = invert(model, spec, height=SIZE, width=SIZE, steps=STEPS, reconstruct=False)
    assert plain.ok and plain.reconstruction_latents is None and plain.pixels is None and plain.images == []
    full = invert(model, spec, height=SIZE, width=SIZE, steps=STEPS)  # the defaults: DDIM, reconstructed
    assert full.ok and full.reconstruction_latents is not None and len(full.images) == 1
    assert plain.unet_rows == STEPS and torch.equal(plain.trajectory, full.trajectory)

    def broken_decode(latents, return_dict=False):
        raise RuntimeError("decoder out of memory")

    monkeypatch.setattr(model.vae, "decode", broken_decode)
    failed = runner.run([spec])[0]
    assert isinstance(failed.error, RuntimeError) and failed.inversion is not None
    assert failed.reconstruction_latents is not None and failed.images == []


def test_reconstruct_samples_each_inversion_with_its_own_embeddings(model, runner):
    results = runner.run([InversionSpec("a", CAPTION, latents=photo_latent(11), num_inner_steps=2),
                          InversionSpec("b", "a dog", latents=photo_latent(12), method="ddim", guidance_scale=2)])
    inversions = [r.inversion for r in results]
    assert reconstruct(model, []) == []
    spy = model.unet.time_embedding.linear_1
    spy.rows.clear()
    latents = reconstruct(model, inversions)  # captions encoded from the inversions
    assert max(spy.rows) == 2 and "forward" not in vars(spy)  # job by job, then unpatched
    for inv, result, z in zip(inversions, results, latents):
        expected = reference_sampling(model, inv.x_t, inv.uncond_embeddings, inv.caption, inv.guidance_scale)
        assert close(z, expected) and close(z, result.reconstruction_latents)


def test_an_inversion_round_trips_through_arrays_and_meta():
    inv = Inversion(x_t=torch.randn(1, 4, 2, 2, dtype=torch.float64), uncond_embeddings=torch.randn(3, 77, DIM),
                    guidance_scale=7.5, method="null-text", caption="c", model="m", height=16, width=24, steps=3,
                    scheduler="ddim")
    arrays, meta = inv.to_arrays(), inv.meta()
    assert set(arrays) == {"x_t", "uncond_embeddings"} and all(a.dtype == np.float32 for a in arrays.values())
    assert inv.key_params() == {"model": "m", "height": 16, "width": 24, "steps": 3, "scheduler": "ddim"}
    assert meta == {**inv.key_params(), "guidance_scale": 7.5, "method": "null-text", "caption": "c"}
    back = Inversion.from_arrays(arrays, {k: str(v) for k, v in meta.items()})
    assert back.meta() == meta and back.x_t.dtype == torch.float32
    assert torch.equal(back.x_t, inv.x_t.float()) and torch.equal(back.uncond_embeddings, inv.uncond_embeddings)
    wide = Inversion.from_arrays({k: a.astype(np.float64) for k, a in arrays.items()}, meta)  # e.g. an npz in fp64
    assert wide.x_t.dtype == wide.uncond_embeddings.dtype == torch.float32
    assert math.isclose(InversionResult("j", trajectory=torch.zeros(2, 1, 1), reconstruction_latents=torch.ones(1, 1))
                        .reconstruction_error, 1.0)
