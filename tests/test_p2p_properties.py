"""Prompt-to-Prompt properties end to end on tiny-sd (p2p.md §9: 1, 2, 5, 6, 7).

The tiny model's cross-attention has real signal, but a word swap moves final latents by only ~0.1,
so every assertion is on fp32 latents (and float pixels), never on 8-bit images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from worker.editing.batch import BatchRunner
from worker.editing.jobs import LocalBlendSpec, P2PJobSpec

SIZE, STEPS, TOL = 128, 6, 1e-4


def run_one(runner, spec):
    result = runner.run([spec])[0]
    assert result.ok, result.error
    return result


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# --- (1) zero injection = plain generation ----------------------------------------------------------------

def test_zero_injection_equals_plain_generation_from_the_same_x_t(runner, sd_model):
    from diffusers import StableDiffusionPipeline

    spec = P2PJobSpec("zero", "a cat riding a bicycle", ["a dog riding a bicycle", "a cow riding a bicycle"],
                      seed=11, edit="replace", cross_replace_steps=0.0, self_replace_steps=0.0, guidance_scale=7.5)
    ours = run_one(runner, spec)
    pipe = StableDiffusionPipeline(**{**sd_model.pipe.components, "scheduler": sd_model.new_scheduler("ddim")})
    pipe.set_progress_bar_config(disable=True)
    x_t = randn_tensor((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(11))
    n = len(spec.prompts)
    kwargs = {"latents": x_t.expand(n, -1, -1, -1), "num_inference_steps": STEPS, "guidance_scale": 7.5}
    latents = pipe(spec.prompts, output_type="latent", **kwargs).images
    pixels = pipe(spec.prompts, output_type="np", **kwargs).images
    assert max_diff(ours.latents, latents) <= TOL
    assert np.abs(ours.pixels - pixels).max() <= TOL
    assert max_diff(ours.latents[0], ours.latents[1]) > 1e-2  # the prompts really differ
    # a lone diffusers call per prompt agrees too (different BLAS batch shapes: looser)
    alone = pipe(spec.target_prompts[0], latents=x_t, num_inference_steps=STEPS, guidance_scale=7.5,
                 output_type="latent").images
    assert max_diff(ours.latents[1:2], alone) <= 5e-4


# --- (2) identical prompts -------------------------------------------------------------------------------

@pytest.mark.parametrize("edit,extra", [
    ("replace", {}),
    ("refine", {}),
    ("reweight", {"reweight": [{"red": 1.0}]}),
    ("replace", {"local_blend": LocalBlendSpec(["car"], [["car"]]), "cross_replace_steps": (0.2, 0.9)}),
], ids=["replace", "refine", "reweight-1", "replace+blend"])
def test_identical_prompts_give_identical_images(runner, edit, extra):
    spec = P2PJobSpec("same", "a red car in the snow", ["a red car in the snow"], seed=5, edit=edit,
                      cross_replace_steps=extra.pop("cross_replace_steps", 0.8), self_replace_steps=0.5, **extra)
    result = run_one(runner, spec)
    assert max_diff(result.latents[0], result.latents[1]) <= TOL
    assert np.abs(result.pixels[0] - result.pixels[1]).max() <= TOL


def test_ancestral_sampler_adds_the_same_noise_to_every_prompt(sd_model):
    """With Euler-a each prompt gets the SAME ancestral noise (twin generators), so identical prompts stay
    identical; independent noise would put them tens of units apart."""
    euler = BatchRunner(sd_model, height=SIZE, width=SIZE, steps=4, scheduler="euler_a")
    same = P2PJobSpec("same", "a red car in the snow", ["a red car in the snow"], seed=3, edit="none",
                      cross_replace_steps=0.0, self_replace_steps=0.0)
    other = P2PJobSpec("other", same.source_prompt, ["a blue car in the snow"], seed=3, edit="none",
                       cross_replace_steps=0.0, self_replace_steps=0.0)
    same_result, other_result = euler.run([same, other])
    assert max_diff(same_result.latents[0], same_result.latents[1]) <= TOL
    assert max_diff(other_result.latents[0], same_result.latents[0]) <= TOL  # the source does not care
    assert max_diff(other_result.latents[0], other_result.latents[1]) > 1.0


# --- (5) reweight shows in the maps and in the target ----------------------------------------------------

def test_reweight_scales_the_word_map_and_changes_the_target(runner, sd_model):
    from worker.editing.words import token_indices

    def spec(factor):
        return P2PJobSpec("rw", "a red car", ["a red car"], seed=8, edit="reweight", reweight=[{"red": factor}],
                          cross_replace_steps=1.0, self_replace_steps=0.0, attention_map_prompts=[0, 1])

    neutral, boosted = run_one(runner, spec(1.0)), run_one(runner, spec(4.0))
    red = token_indices("a red car", "red", sd_model.tokenizer)
    source_maps, target_maps = boosted.attention_maps[0].maps, boosted.attention_maps[1].maps
    others = [k for k in range(source_maps.shape[0]) if k not in red]
    np.testing.assert_allclose(target_maps[red], 4.0 * source_maps[red], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(target_maps[others], source_maps[others], rtol=1e-4, atol=1e-6)
    assert boosted.attention_maps[1].tokens == neutral.attention_maps[1].tokens and boosted.attention_maps[1].grid_png
    assert max_diff(boosted.latents[0], neutral.latents[0]) <= TOL  # the source is untouched
    assert max_diff(boosted.latents[1], neutral.latents[1]) > 1e-3  # the target moved


# --- (6) local blend extremes ----------------------------------------------------------------------------

def test_local_blend_extremes(runner, monkeypatch):
    from worker.editing import controllers

    blended = P2PJobSpec("lb", "a cat on a sofa", ["a lion on a sofa", "a tiger on a sofa"], seed=6,
                         local_blend=LocalBlendSpec(["cat"], [["lion"], ["tiger"]]))
    unblended = P2PJobSpec("nolb", blended.source_prompt, blended.target_prompts, seed=6)

    monkeypatch.setattr(controllers.LocalBlend, "masks", lambda self, maps: torch.zeros(
        maps.shape[0] - 1, 1, *self.latent_size, dtype=torch.bool))
    empty = run_one(runner, blended)
    for target in (1, 2):
        assert max_diff(empty.latents[target], empty.latents[0]) == 0.0  # each target IS the source

    monkeypatch.setattr(controllers.LocalBlend, "masks", lambda self, maps: torch.ones(
        maps.shape[0] - 1, 1, *self.latent_size, dtype=torch.bool))
    full = run_one(runner, blended)
    monkeypatch.undo()
    assert max_diff(full.latents, run_one(runner, unblended).latents) <= TOL  # blend changed nothing

    real = run_one(runner, blended)
    assert 0 < max_diff(real.latents[1], real.latents[0])


# --- (7) batched == alone across modes -------------------------------------------------------------------

MIXED = [
    P2PJobSpec("replace", "a cat riding a bicycle", ["a dog riding a bicycle"], seed=1,
               cross_replace_steps=0.8, self_replace_steps=0.4),
    P2PJobSpec("refine", "a cat", ["a fluffy cat", "a cat at night"], seed=2, edit="refine",
               cross_replace_steps=(0.1, 0.6), self_replace_steps=0.2, guidance_scale=5.0),
    P2PJobSpec("reweight", "a red car", ["a red car"], seed=3, edit="reweight", reweight=[{"red": 3.0}],
               guidance_scale=9.0, attention_map_prompts=[0, 1]),
    P2PJobSpec("replace+reweight", "a cat on the grass", ["a dog on the grass"], seed=4,
               reweight=[{"grass": -2.0}], cross_replace_steps={"default_": 1.0, "dog": 0.4},
               self_replace_steps=(0.2, 0.6), self_replace_layers="medium"),
    P2PJobSpec("blend", "a cat on a sofa", ["a lion on a sofa", "a tiger on a sofa", "a bear on a sofa"], seed=5,
               local_blend=LocalBlendSpec(["cat"], [["lion"], ["tiger"], ["bear"]], start_blend=0.2),
               guidance_scale=6.0),
    P2PJobSpec("none", "a house", ["a castle"], seed=6, edit="none", self_replace_steps=0.0),
]


def test_batched_equals_alone_across_modes(runner):
    batched = runner.run(MIXED)
    for spec, result in zip(MIXED, batched):
        assert result.ok, (spec.job_id, result.error)
        alone = run_one(runner, spec)
        assert result.latents.shape == (len(spec.prompts), 4, SIZE // 8, SIZE // 8)
        assert max_diff(result.latents, alone.latents) <= TOL, spec.job_id
        assert np.abs(result.pixels - alone.pixels).max() <= TOL, spec.job_id
        assert result.labels == spec.prompts and len(result.images) == len(spec.prompts)
        assert result.params["seed"] == spec.seed and result.params["steps"] == STEPS
    maps = batched[2].attention_maps
    assert [m.prompt_index for m in maps] == [0, 1] and maps[0].maps.shape[1:] == (16, 16)  # 128 px: map_grid
