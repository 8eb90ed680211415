"""negative_prompt in the editing core (issue 13): it replaces "" in the unconditional branches, exactly as
diffusers' pipelines use ``negative_prompt``; checked on fp32 latents and float pixels, alone and batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from worker.editing.batch import BatchRunner
from worker.editing.jobs import IP2PCell, IP2PJobSpec, P2PJobSpec

SIZE, STEPS, TOL = 128, 5, 1e-4
NEGATIVE = "blurry, low quality, watermark"


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def run_ok(runner, specs):
    results = runner.run(specs)
    for result in results:
        assert result.ok, result.error
    return results


def test_p2p_negative_prompt_matches_diffusers_and_batches_exactly(runner, sd_model):
    from diffusers import StableDiffusionPipeline

    spec = P2PJobSpec("neg", "a cat riding a bicycle", ["a dog riding a bicycle"], seed=11, edit="replace",
                      cross_replace_steps=0.0, self_replace_steps=0.0, negative_prompt=NEGATIVE)
    plain = P2PJobSpec("plain", spec.source_prompt, spec.target_prompts, seed=11, edit="replace",
                       cross_replace_steps=0.0, self_replace_steps=0.0)
    (ours,) = run_ok(runner, [spec])
    pipe = StableDiffusionPipeline(**{**sd_model.pipe.components, "scheduler": sd_model.new_scheduler("ddim")})
    pipe.set_progress_bar_config(disable=True)
    x_t = randn_tensor((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(11))
    kwargs = {"latents": x_t.expand(2, -1, -1, -1), "num_inference_steps": STEPS, "guidance_scale": 7.5,
              "negative_prompt": [NEGATIVE, NEGATIVE]}
    assert max_diff(ours.latents, pipe(spec.prompts, output_type="latent", **kwargs).images) <= TOL
    assert np.abs(ours.pixels - pipe(spec.prompts, output_type="np", **kwargs).images).max() <= TOL

    (without,) = run_ok(runner, [plain])
    assert max_diff(ours.latents, without.latents) > 1e-3  # the negative prompt really steers
    batched_neg, batched_plain = run_ok(runner, [spec, plain])  # mixed negatives in one UNet batch
    assert max_diff(batched_neg.latents, ours.latents) <= TOL
    assert max_diff(batched_plain.latents, without.latents) <= TOL


@pytest.fixture(scope="module")
def ip2p_model(tiny_models):
    from service.config import Settings
    from worker.models.registry import ModelRegistry

    return ModelRegistry(Settings(models_dir=tiny_models["tiny-ip2p"].parent)).get("tiny-ip2p")


def test_ip2p_negative_prompt_matches_diffusers(ip2p_model):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    runner = BatchRunner(ip2p_model, height=SIZE, width=SIZE, steps=STEPS, scheduler="euler_a")
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    cell = IP2PCell(7.5, 1.5, 21)
    with_neg, without = run_ok(runner, [IP2PJobSpec("neg", image, "make it snow", [cell], negative_prompt=NEGATIVE),
                                        IP2PJobSpec("plain", image, "make it snow", [cell])])
    pipe = StableDiffusionInstructPix2PixPipeline(**{**ip2p_model.pipe.components,
                                                     "scheduler": ip2p_model.new_scheduler("euler_a")})
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("make it snow", image=image, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                     guidance_scale=7.5, image_guidance_scale=1.5, generator=torch.Generator().manual_seed(21),
                     output_type="latent").images
    assert max_diff(with_neg.latents, reference.float()) <= TOL
    assert max_diff(with_neg.latents, without.latents) > 1e-3
