"""One P2P job's state: CFG rows and guidance, one x_T for every prompt with twin ancestral noise, edits from an
inversion (its x_T, guidance and per-step embeddings, refused when made for another batch key), several seeds as
groups that each equal the lone request, and the attention-map grids of a result on one scale.

State arithmetic runs on a fake model (tests/editing_fakes.py) with tiny-sd's tokenizer; the grids need real
attention, so those run tiny-sd for two steps."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from editing_fakes import FakeModel, text_embedding

from worker.editing.attention_maps import job_peak, render_token_grid
from worker.editing.base import SamplingContext
from worker.editing.inversion import Inversion
from worker.editing.jobs import EditValidationError, P2PJobSpec
from worker.editing.p2p import P2PGroupsJobState, P2PJobState, shared_initial_latent, twin_generators

H, W = 32, 64  # fake-model states: latents (4, 8), non-square
SIZE, STEPS = 64, 2  # tiny-sd runs (the conftest ``runner``)


@pytest.fixture(scope="module")
def fake(sd_model):
    return lambda **kw: FakeModel(tokenizer=sd_model.tokenizer, **kw)


def spec(**kw) -> P2PJobSpec:
    return P2PJobSpec(kw.pop("job_id", "j"), "a cat riding a bike", ["a dog riding a bike"], kw.pop("seed", 5), **kw)


def context(fake, scheduler="euler_a", steps=3, **model) -> SamplingContext:
    return SamplingContext(fake(**model), H, W, steps, scheduler)


def test_shared_x_t_is_one_draw_on_the_context_device_and_dtype(fake):
    ctx = context(fake, device="meta")
    x_t = shared_initial_latent(ctx, torch.Generator().manual_seed(1))
    assert x_t.shape == (1, 4, H // 8, W // 8) and x_t.device.type == "meta" and x_t.dtype == torch.float64
    twins = twin_generators(torch.Generator().manual_seed(3), 3)
    draws = [torch.randn(4, generator=g) for g in twins]
    assert len(twins) == 3 and all(torch.equal(d, draws[0]) for d in draws)  # same state, independent objects
    assert twins[0].device.type == "cpu"


def test_rows_guidance_and_twin_noise(fake):
    ctx = context(fake)
    job = P2PJobState.create(spec(negative_prompt="blurry", guidance_scale=5.0), ctx)
    assert type(job) is P2PJobState and job.num_rows == 4 and job.row_groups == [4]
    generator = torch.Generator().manual_seed(5)
    x_t = torch.randn((1, 4, H // 8, W // 8), generator=generator, dtype=torch.float64)
    sigma = job.scheduler.init_noise_sigma
    assert sigma > 2 and job.latents.dtype == torch.float64
    torch.testing.assert_close(job.latents, x_t.repeat(2, 1, 1, 1) * sigma, rtol=0, atol=0)
    texts = ["blurry", "blurry", "a cat riding a bike", "a dog riding a bike"]
    torch.testing.assert_close(job.text_rows(), torch.stack([text_embedding(t) for t in texts]).double())
    sample = job.model_input()
    assert job.controller.step == 0 and sample.shape == (4, 4, H // 8, W // 8)
    torch.testing.assert_close(sample, torch.cat([job.latents] * 2) / math.sqrt(sigma ** 2 + 1))
    rows = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64).view(4, 1, 1, 1).expand(4, 4, H // 8, W // 8)
    assert [float(g.unique()) for g in job.guide(rows)] == [1 + 5 * 2, 2 + 5 * 3]  # u + s·(c − u), per prompt
    same = torch.full((4, 4, H // 8, W // 8), 0.3, dtype=torch.float64)
    reference = ctx.new_scheduler().step(same[:1], job.timestep(), job.latents[:1], generator=generator).prev_sample
    job.advance(same)
    assert torch.equal(job.latents[0], job.latents[1])  # the same noise for every prompt
    torch.testing.assert_close(job.latents[:1], reference, rtol=0, atol=1e-12)  # drawn right after x_T
    job.model_input()
    assert job.step_index == 1 and job.controller.step == 1


def test_tensor_controllers_wrap_the_jobs_controller_with_its_windows(fake):
    """Windows are fractions of the requested steps T (PNDM makes T + 1 calls): cross 0.95 of 10 → 10 calls."""
    from worker.editing.tensor_controller import TensorController

    ctx = SamplingContext(fake(), H, W, 10, "pndm", tensor_controllers=True)
    job = P2PJobState(spec(cross_replace_steps=0.95), ctx)
    assert isinstance(job.controller, TensorController) and job.total_steps == 11
    assert job.controller.num_steps == 11 and job.controller.prompts == spec().prompts
    assert sum(job.controller.base.edits_cross_at(i) for i in range(11)) == 10


def test_params_report_what_was_used(fake):
    job = P2PJobState(spec(edit="refine", cross_replace_steps=0.6, self_replace_steps=0.2), context(fake))
    assert job.params() == {"model": "fake-model", "height": H, "width": W, "steps": 3, "scheduler": "euler_a",
                            "seed": 5, "guidance_scale": 7.5, "edit": "refine",
                            "prompts": ["a cat riding a bike", "a dog riding a bike"], "cross_replace_steps": 0.6,
                            "self_replace_steps": 0.2}


def inversion(steps=3, **kw) -> Inversion:
    g = torch.Generator().manual_seed(9)
    fields = dict(x_t=torch.randn(1, 4, H // 8, W // 8, generator=g),
                  uncond_embeddings=torch.arange(steps, dtype=torch.float32).view(steps, 1, 1).expand(steps, 77, 8),
                  guidance_scale=3.0, method="null-text", caption="a cat riding a bike", model="fake-model",
                  height=H, width=W, steps=steps, scheduler="euler_a")
    return Inversion(**{**fields, **kw})


def test_an_edit_from_an_inversion_starts_from_its_x_t_with_its_embeddings_and_guidance(fake):
    inv = inversion()
    job = P2PJobState.create(spec(inversion=inv), context(fake))
    assert job.per_step_text and job.guidance_scale == 3.0 and job.params()["guidance_scale"] == 3.0
    assert job.latents.dtype == torch.float64
    torch.testing.assert_close(job.latents, inv.x_t.double().repeat(2, 1, 1, 1) * job.scheduler.init_noise_sigma)
    for step in range(2):
        text = job.text_rows()
        assert text.shape == (4, 77, 8) and text.dtype == torch.float64
        assert text[:2].unique().tolist() == [float(step)]  # step i's unconditional embedding, every prompt
        torch.testing.assert_close(text[3], text_embedding("a dog riding a bike").double())
        job.advance(torch.zeros(4, 4, H // 8, W // 8, dtype=torch.float64))


def test_an_inversion_is_moved_to_the_context_device(fake):
    job = P2PJobState(spec(inversion=inversion(scheduler="ddim")), context(fake, "ddim", device="meta"))
    assert job.latents.device.type == "meta" and job.text_rows().device.type == "meta"


@pytest.mark.parametrize("field,value", [("model", "other"), ("height", 64), ("width", 32), ("steps", 4),
                                         ("scheduler", "ddim")])
def test_an_inversion_for_another_batch_key_is_refused_naming_the_field(fake, field, value):
    with pytest.raises(EditValidationError) as caught:
        P2PJobState.create(spec(inversion=inversion(**{field: value})), context(fake))
    assert caught.value.field == field and repr(value) in caught.value.message


def test_an_inversion_with_the_wrong_number_of_embeddings_or_several_seeds_is_refused(fake):
    inv = inversion()
    with pytest.raises(EditValidationError) as caught:
        P2PJobState.create(spec(inversion=dataclasses.replace(inv, uncond_embeddings=inv.uncond_embeddings[:2])),
                           context(fake))
    assert caught.value.field == "inversion" and "2 embeddings for 3 steps" in caught.value.message
    with pytest.raises(EditValidationError) as caught:
        P2PJobState.create(spec(inversion=inv, seeds=[1, 2]), context(fake))
    assert caught.value.field == "seeds" and "one output" in caught.value.message


def test_seeds_make_groups_each_equal_to_the_lone_request(fake):
    ctx = context(fake)
    job = P2PJobState.create(spec(seeds=[3, 4], preview_every=1), ctx)
    alone = [P2PJobState(spec(seed=s, preview_every=1), ctx) for s in (3, 4)]
    assert type(job) is P2PGroupsJobState and job.num_rows == 8 and job.row_groups == [4, 4]
    assert job.controller is job.groups[0].controller and not job.per_step_text
    assert [rows for rows, _ in job.attention_segments()] == [4, 4]
    assert [c for _, c in job.attention_segments()] == [g.controller for g in job.groups]
    torch.testing.assert_close(job.latents, torch.cat([a.latents for a in alone]), rtol=0, atol=0)
    torch.testing.assert_close(job.text_rows(), torch.cat([a.text_rows() for a in alone]), rtol=0, atol=0)
    torch.testing.assert_close(job.model_input(), torch.cat([a.model_input() for a in alone]), rtol=0, atol=0)
    assert job.row_timesteps().tolist() == [int(job.timesteps[0])] * 8
    with pytest.raises(RuntimeError, match="group by group"):
        job.guide(torch.zeros(8))
    rows = torch.randn(8, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    job.advance(rows)
    for a, part in zip(alone, rows.split(4)):
        a.advance(part)
    torch.testing.assert_close(job.latents, torch.cat([a.latents for a in alone]), rtol=0, atol=0)
    assert job.step_index == 1 and torch.equal(job.timesteps, alone[0].timesteps)
    step, images = job.take_preview()
    assert step == 1 and len(images) == 4  # every output of every group
    assert job.params() == {**alone[0].params(), "seed": 3, "seeds": [3, 4]}


def grids_on_one_scale(result, overlay: bool) -> None:
    peak = job_peak([m.maps for m in result.attention_maps])
    for m in result.attention_maps:
        image = result.images[m.prompt_index] if overlay else None
        assert m.grid_png == render_token_grid(m.tokens, m.maps, peak=peak, title=m.prompt, image=image)


def test_results_grids_share_one_scale_over_their_prompts_images(runner):
    lone, groups, plain, overlaid = runner.run([
        spec(job_id="lone", attention_map_prompts=[1, 0], attention_overlay=True),
        spec(job_id="groups", seeds=[3, 4], attention_map_prompts=[1]),
        spec(job_id="plain", attention_map_prompts=[0]),
        spec(job_id="overlaid", seeds=[3, 4], attention_map_prompts=[0, 1], attention_overlay=True)])
    assert lone.ok and groups.ok and plain.ok and overlaid.ok, (lone.error, groups.error)
    grids_on_one_scale(plain, overlay=False)
    grids_on_one_scale(overlaid, overlay=True)  # over the first group's images
    assert lone.labels == ["a cat riding a bike", "a dog riding a bike"] and len(lone.images) == 2
    assert [m.prompt_index for m in lone.attention_maps] == [1, 0]
    grids_on_one_scale(lone, overlay=True)
    assert lone.latents.shape == (2, 4, SIZE // 8, SIZE // 8) and lone.pixels.shape == (2, SIZE, SIZE, 3)
    assert lone.params["seed"] == 5 and lone.job_id == "lone"
    assert groups.labels == lone.labels * 2 and len(groups.images) == 4 and groups.job_id == "groups"
    assert groups.latents.shape == (4, 4, SIZE // 8, SIZE // 8) and groups.pixels.shape == (4, SIZE, SIZE, 3)
    assert [m.prompt_index for m in groups.attention_maps] == [1]  # the first group's maps only
    grids_on_one_scale(groups, overlay=False)
    assert groups.params["seeds"] == [3, 4]
    np.testing.assert_allclose(groups.pixels[2:], runner.run([spec(seed=4)])[0].pixels, atol=1e-2)  # batch shapes
