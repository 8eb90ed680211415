"""P2P under Euler-ancestral against a plain diffusers run (tiny-sd, fp32 latents).

DDIM's initial noise scale is 1, so the DDIM comparisons cannot see a forgotten ``init_noise_sigma``; Euler's
is σ_max (~14.6). Ancestral noise must come from the job's generator right after x_T was drawn, the same
noise for every prompt: each prompt then equals a lone diffusers call with that generator state.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from worker.editing.batch import BatchRunner
from worker.editing.jobs import P2PJobSpec

SIZE, STEPS, SEED = 64, 4, 13
# a lone diffusers call per prompt runs other BLAS batch shapes than our two-prompt batch; final Euler latents of
# the random model reach |x| ~ 30, so the tolerance is relative to their largest magnitude
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def euler_pipe(sd_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**{**sd_model.pipe.components, "scheduler": sd_model.new_scheduler("euler_a")})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_alone(pipe, prompt: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    x_t = randn_tensor((1, 4, SIZE // 8, SIZE // 8), generator=generator)  # the generator moves on, as ours does
    return pipe(prompt, latents=x_t, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5,
                generator=generator, output_type="latent").images


def test_euler_ancestral_zero_injection_equals_diffusers_per_prompt(sd_model, euler_pipe):
    assert euler_pipe.scheduler.init_noise_sigma > 2  # what this test is about
    runner = BatchRunner(sd_model, height=SIZE, width=SIZE, steps=STEPS, scheduler="euler_a")
    spec = P2PJobSpec("euler", "a cat riding a bicycle", ["a dog riding a bicycle"], seed=SEED,
                      cross_replace_steps=0.0, self_replace_steps=0.0)
    ours = runner.run([spec])[0]
    assert ours.ok, ours.error
    for index, prompt in enumerate(spec.prompts):
        reference = diffusers_alone(euler_pipe, prompt)
        scale = reference.abs().max().item()
        assert (ours.latents[index:index + 1] - reference).abs().max().item() <= REL_TOL * scale, prompt
    assert (ours.latents[0] - ours.latents[1]).abs().max().item() > 1e-2  # the prompts really differ
