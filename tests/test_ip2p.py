"""InstructPix2Pix sampler: the guidance algebra (ip2p.md §6), image conditioning, and parity with diffusers.

Parity is checked on fp32 latents and float images (never 8-bit): inside diffusers' guidance gate our
BatchRunner must reproduce ``StableDiffusionInstructPix2PixPipeline``; outside it we follow the formula.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from worker.editing.batch import BatchRunner, NonFiniteLatentsError
from worker.editing.ip2p import encode_image_latents, ip2p_guidance, split_branches
from worker.editing.jobs import IP2PCell, IP2PJobSpec, P2PJobSpec

SIZE, STEPS, TOL = 128, 5, 1e-4
REL_TOL = 1e-5  # of the largest latent magnitude, where batch shapes differ (mixed batches)


# --- guidance algebra (pure tensors) --------------------------------------------------------------------

@pytest.fixture
def branches():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))  # c, i, u


@pytest.mark.parametrize("s_t,s_i", [(7.5, 1.5), (1.0, 1.5), (7.5, 0.8), (0.0, 2.0), (3.0, 3.0)])
def test_guidance_is_affine_with_weights_summing_to_one(branches, s_t, s_i):
    c, i, u = branches
    weights = (1 - s_i, s_i - s_t, s_t)
    assert sum(weights) == pytest.approx(1.0)
    expected = weights[0] * u + weights[1] * i + weights[2] * c
    torch.testing.assert_close(ip2p_guidance(c, i, u, s_t, s_i), expected)


def test_guidance_special_cases(branches):
    c, i, u = branches
    torch.testing.assert_close(ip2p_guidance(c, i, u, 1.0, 1.0), c)  # s_T = s_I = 1: pure conditional
    other_u = torch.randn_like(u)
    torch.testing.assert_close(ip2p_guidance(c, i, u, 6.0, 1.0), i + 6.0 * (c - i))  # s_I = 1: u drops out
    torch.testing.assert_close(ip2p_guidance(c, i, u, 6.0, 1.0), ip2p_guidance(c, i, other_u, 6.0, 1.0))
    torch.testing.assert_close(ip2p_guidance(c, i, u, 4.0, 4.0), u + 4.0 * (c - u))  # joint-null CFG
    torch.testing.assert_close(ip2p_guidance(c, i, u, 0.0, 1.7), u + 1.7 * (i - u))  # instruction ignored


def test_guidance_on_x0_equals_guidance_on_eps(branches):
    """The official code guides k-diffusion's x0 = x − σ·eps; affine weights make both identical."""
    c, i, u = branches
    x, sigma = torch.randn_like(c), 3.7
    x0 = [x - sigma * e for e in (c, i, u)]
    torch.testing.assert_close(ip2p_guidance(*x0, 7.5, 1.5), x - sigma * ip2p_guidance(c, i, u, 7.5, 1.5))


def test_chunk_order_golden():
    """Per cell the rows are [cond(text+image), image-only, uncond]; swapping any two changes the result."""
    rows = torch.tensor([3.0, 2.0, 1.0, 30.0, 20.0, 10.0]).view(6, 1, 1, 1)  # two cells
    cond, image_only, uncond = split_branches(rows)
    assert cond.flatten().tolist() == [3.0, 30.0] and uncond.flatten().tolist() == [1.0, 10.0]
    guided = ip2p_guidance(cond, image_only, uncond, 7.5, 1.5)
    assert guided.flatten().tolist() == [10.0, 100.0]  # 1 + 7.5·1 + 1.5·1, ×10
    swapped = ip2p_guidance(*split_branches(rows[[1, 0, 2, 4, 3, 5]]), 7.5, 1.5)
    assert not torch.equal(swapped, guided)


def test_per_cell_scales_broadcast(branches):
    c, i, u = branches
    s_t = torch.tensor([7.5, 2.0], dtype=torch.float64).view(2, 1, 1, 1)
    s_i = torch.tensor([1.5, 0.8], dtype=torch.float64).view(2, 1, 1, 1)
    out = ip2p_guidance(c, i, u, s_t, s_i)
    torch.testing.assert_close(out[1:], ip2p_guidance(c[1:], i[1:], u[1:], 2.0, 0.8))


# --- the sampler on the tiny instruct model -------------------------------------------------------------

@pytest.fixture(scope="module")
def ip2p_model(tiny_models):
    from service.config import Settings
    from worker.models.registry import ModelRegistry

    return ModelRegistry(Settings(models_dir=tiny_models["tiny-ip2p"].parent)).get("tiny-ip2p")


@pytest.fixture(scope="module")
def reference_pipe(ip2p_model):
    """diffusers' own pipeline on the same weights, with the same Euler-a configuration."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline(**{**ip2p_model.pipe.components,
                                                     "scheduler": ip2p_model.new_scheduler("euler_a")})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def runner(ip2p_model):
    return BatchRunner(ip2p_model, height=SIZE, width=SIZE, steps=STEPS, scheduler="euler_a")


def noise_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def diffusers_edit(pipe, instruction, image, cell: IP2PCell, output_type: str, gate: bool = True):
    cls = type(pipe) if gate else _Ungated
    return cls.__call__(pipe, instruction, image=image, num_inference_steps=STEPS, guidance_scale=cell.text_guidance,
                        image_guidance_scale=cell.image_guidance, generator=torch.Generator().manual_seed(cell.seed),
                        output_type=output_type).images


class _Ungated:
    """diffusers' loop with its guidance gate forced open: the formula for any scales (the official behaviour)."""

    @staticmethod
    def __call__(pipe, *args, **kwargs):
        cls = type(pipe)
        original = cls.do_classifier_free_guidance
        cls.do_classifier_free_guidance = property(lambda self: True)
        try:
            return cls.__call__(pipe, *args, **kwargs)
        finally:
            cls.do_classifier_free_guidance = original


def assert_same_as_diffusers(result, index, pipe, instruction, image, cell, gate=True):
    latents = diffusers_edit(pipe, instruction, image, cell, "latent", gate)
    pixels = diffusers_edit(pipe, instruction, image, cell, "np", gate)
    assert (result.latents[index:index + 1] - latents.float()).abs().max().item() <= TOL
    assert np.abs(result.pixels[index:index + 1] - pixels).max() <= TOL


def test_matches_diffusers_inside_its_gate(runner, reference_pipe):
    image = noise_image(1)
    cells = [IP2PCell(7.5, 1.5, 11), IP2PCell(3.0, 1.0, 12)]
    sweep = runner.run([IP2PJobSpec("sweep", image, "turn it into a watercolor", cells)])[0]
    assert sweep.ok, sweep.error
    assert sweep.latents.shape == (2, 4, SIZE // 8, SIZE // 8) and len(sweep.images) == 2
    for index, cell in enumerate(cells):
        assert_same_as_diffusers(sweep, index, reference_pipe, "turn it into a watercolor", image, cell)
    assert sweep.params["cells"] == [{"seed": 11, "text_guidance": 7.5, "image_guidance": 1.5},
                                     {"seed": 12, "text_guidance": 3.0, "image_guidance": 1.0}]
    assert (sweep.params["height"], sweep.params["width"], sweep.params["steps"]) == (SIZE, SIZE, STEPS)


@pytest.mark.parametrize("cell", [IP2PCell(1.0, 1.5, 5), IP2PCell(7.5, 0.8, 6)], ids=["s_T=1", "s_I=0.8"])
def test_outside_the_gate_we_follow_the_formula_and_diffusers_does_not(runner, reference_pipe, cell):
    image = noise_image(2)
    ours = runner.run([IP2PJobSpec("x", image, "add fireworks", [cell])])[0]
    assert_same_as_diffusers(ours, 0, reference_pipe, "add fireworks", image, cell, gate=False)
    gated = diffusers_edit(reference_pipe, "add fireworks", image, cell, "latent")
    assert (ours.latents - gated.float()).abs().max().item() > 1e-2  # diffusers silently returned pure c


def test_image_latents_are_the_unscaled_posterior_mode(ip2p_model):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_instruct_pix2pix import retrieve_latents

    image = noise_image(3)
    ours = encode_image_latents(ip2p_model, image)
    pixels = ip2p_model.pipe.image_processor.preprocess(image)
    mode = retrieve_latents(ip2p_model.vae.encode(pixels), sample_mode="argmax")
    torch.testing.assert_close(ours, mode, rtol=0, atol=0)
    assert ip2p_model.vae.config.scaling_factor != 1.0


def test_unet_rows_per_cell(runner):
    job = runner.prepare(IP2PJobSpec("rows", noise_image(4), "make it night", [IP2PCell(7.5, 1.5, 1),
                                                                             IP2PCell(5.0, 1.2, 2)]))
    with torch.no_grad():
        sample = job.model_input()
    assert sample.shape == (6, 8, SIZE // 8, SIZE // 8) and job.text_rows().shape[0] == 6
    noisy, image = sample[:, :4], sample[:, 4:]
    assert torch.equal(image[0], image[1]) and torch.equal(image[3], image[0])  # [img, img, 0] per cell
    assert torch.count_nonzero(image[2]) == 0 and torch.count_nonzero(image[5]) == 0
    assert torch.equal(noisy[0], noisy[2]) and not torch.equal(noisy[0], noisy[3])  # a cell's own latent
    text = job.text_rows()
    assert torch.equal(text[1], text[2]) and not torch.equal(text[0], text[1])  # [T, "", ""]
    assert job.latents.std().item() > 5  # initial latents are scaled by sigma_max


def test_initial_sigma_is_sigma_max(ip2p_model):
    scheduler = ip2p_model.new_scheduler("euler_a")
    scheduler.set_timesteps(100)
    assert float(scheduler.init_noise_sigma) == pytest.approx(14.6146, abs=1e-3)


def test_mixed_batch_equals_each_job_alone(runner):
    jobs = [
        IP2PJobSpec("a", noise_image(5), "make it snowy", [IP2PCell(7.5, 1.5, 21)]),
        IP2PJobSpec("b", noise_image(6), "turn the sky red", [IP2PCell(9.0, 1.2, 22), IP2PCell(5.0, 2.0, 23),
                                                              IP2PCell(1.0, 0.8, 24)]),
        IP2PJobSpec("c", noise_image(5), "", [IP2PCell(7.5, 1.5, 25)]),  # empty: the input comes back
        IP2PJobSpec("d", noise_image(7).resize((64, 64)), "wrong size", [IP2PCell(7.5, 1.5, 26)]),
        IP2PJobSpec("e", noise_image(8), "blow up", [IP2PCell(1e38, 1.5, 27)]),
        IP2PJobSpec("f", noise_image(8), "make it snowy", [IP2PCell(6.0, 1.4, 28)]),
    ]
    batched = runner.run(jobs)
    assert [r.job_id for r in batched] == list("abcdef")
    assert [r.ok for r in batched] == [True, True, True, False, False, True]
    assert batched[3].error.field == "image"
    assert isinstance(batched[4].error, NonFiniteLatentsError) and "not finite" in str(batched[4].error)
    for spec, result in zip(jobs, batched):
        if not result.ok or spec.job_id == "c":
            continue
        alone = runner.run([spec])[0]
        # Relative to the latent's scale: IP2P latents here reach |35|, and a different batch shape changes the
        # GEMM blocking (single-threaded MKL: 2e-4 absolute after 5 guided steps = 6e-6 relative, fp32
        # rounding amplified by s_T); a wrong row would be off by O(1).
        scale = max(1.0, alone.latents.abs().max().item())
        assert (result.latents - alone.latents).abs().max().item() <= REL_TOL * scale
        assert np.abs(result.pixels - alone.pixels).max() <= TOL
    # a sweep cell equals the same cell run as a one-cell job
    single = runner.run([IP2PJobSpec("b1", jobs[1].image, jobs[1].instruction, [jobs[1].cells[1]])])[0]
    scale = max(1.0, single.latents.abs().max().item())
    assert (batched[1].latents[1:2] - single.latents).abs().max().item() <= REL_TOL * scale


def test_empty_instruction_returns_the_input_without_diffusion(runner, ip2p_model, monkeypatch):
    calls = []
    monkeypatch.setattr(type(ip2p_model.unet), "forward", lambda *a, **k: calls.append(1))
    image = noise_image(9)
    result = runner.run([IP2PJobSpec("e", image, "   ", [IP2PCell(7.5, 1.5, 1), IP2PCell(5.0, 1.0, 2)])])[0]
    assert result.ok and not calls
    assert [im.tobytes() for im in result.images] == [image.tobytes()] * 2
    assert result.params["diffusion"] is False and [c["seed"] for c in result.params["cells"]] == [1, 2]


def test_wrong_job_kind_fails_that_job_only(runner):
    results = runner.run([P2PJobSpec("p", "a cat", ["a dog"], seed=1),
                          IP2PJobSpec("ok", noise_image(10), "", [IP2PCell(7.5, 1.5, 1)])])
    assert results[0].error.field == "model" and results[1].ok
