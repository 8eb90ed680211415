"""The per-job state base on a fake model (tests/editing_fakes.py): the sampling context's caches and params, the
scheduler step (each sample's ancestral noise from its own generator, DDIM deterministic), previews at the
promised steps from the scheduler's x₀ estimate, handing them to the reporter, and decoding finished jobs in
shared VAE calls with errors kept per job."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from editing_fakes import FakeModel, text_embedding
from PIL import Image

from worker.editing import previews
from worker.editing.base import (
    JobState,
    NonFiniteLatentsError,
    SamplingContext,
    decode,
    finish_states,
    hand_preview,
    seeded_generator,
)
from worker.editing.jobs import IP2PJobSpec, JobResult

SIZE = 32  # latents (4, 4)


class Job(JobState):
    """The smallest method: one UNet row per sample, and that row is the sample's noise estimate."""

    def __init__(self, ctx, seeds=(1, 2), latents=None, **spec):
        super().__init__(IP2PJobSpec(spec.pop("job_id", "j"), None, "x", [], **spec), ctx,
                         [seeded_generator(s) for s in seeds])
        g = torch.Generator().manual_seed(99)
        self.latents = latents if latents is not None else torch.randn(
            len(seeds), 4, SIZE // 8, SIZE // 8, generator=g, dtype=ctx.dtype) * self.scheduler.init_noise_sigma

    @property
    def num_rows(self) -> int:
        return len(self.generators)

    def text_rows(self):
        return torch.zeros(self.num_rows, 77, 8)

    def model_input(self):
        return self.latents

    def guide(self, noise_pred):
        return noise_pred

    def result(self, pixels, images):
        return JobResult(job_id=self.job_id, images=images, pixels=pixels, params=self.params())


def context(scheduler="ddim", steps=4, **model) -> SamplingContext:
    return SamplingContext(FakeModel(**model), SIZE, SIZE, steps, scheduler)


def noise(job: Job, seed: int = 7) -> torch.Tensor:
    return torch.randn(job.latents.shape, generator=torch.Generator().manual_seed(seed), dtype=job.latents.dtype)


def test_context_caches_the_unconditional_texts_and_reports_its_key():
    ctx = context(dtype=torch.float32, device="meta")
    assert ctx.device.type == "meta" and ctx.dtype == torch.float32  # read once from the model
    ctx = context()
    assert torch.equal(ctx.null_text()[0], text_embedding("")) and ctx.null_text() is ctx.null_text()
    assert ctx.unconditional_text() is ctx.null_text() and ctx.unconditional_text("") is ctx.null_text()
    blurry = ctx.unconditional_text("blurry")
    assert torch.equal(blurry[0], text_embedding("blurry").double()) and ctx.unconditional_text("blurry") is blurry
    assert ctx.model.encoded == ["", "blurry"]  # each text encoded once
    assert ctx.params() == {"model": "fake-model", "height": SIZE, "width": SIZE, "steps": 4, "scheduler": "ddim"}


def test_each_job_gets_its_own_scheduler_with_the_steps_set_on_the_model_device():
    ctx = context("euler_a", steps=6)
    first, second = ctx.new_scheduler(), ctx.new_scheduler()
    assert first is not second and type(first).__name__ == "EulerAncestralDiscreteScheduler"
    assert len(first.timesteps) == 6
    assert context(steps=3, device="meta").new_scheduler().timesteps.device.type == "meta"
    job = Job(context(steps=3))
    assert (job.step_index, job.total_steps, job.finished) == (0, 3, False)
    assert job.job_id == "j" and job.params() == job.ctx.params()
    assert job.row_timesteps().tolist() == [int(job.timesteps[0])] * 2


def test_seeded_generators_give_the_same_noise_as_a_cpu_generator():
    a = torch.randn(3, generator=seeded_generator(np.int64(5)))
    assert torch.equal(a, torch.randn(3, generator=torch.Generator("cpu").manual_seed(5)))


def test_an_ancestral_step_draws_each_samples_noise_from_its_own_generator():
    """Sample i of a job steps exactly as a job of that sample alone with seed i would (Euler-a)."""
    job = Job(context("euler_a"), seeds=(1, 2))
    latents, eps, t = job.latents.clone(), noise(job), job.timestep()
    job.advance(eps)
    assert job.step_index == 1 and torch.equal(job.timestep(), job.timesteps[1])
    for i, seed in enumerate((1, 2)):
        alone = job.ctx.new_scheduler()
        expected = alone.step(eps[i:i + 1], t, latents[i:i + 1], generator=seeded_generator(seed)).prev_sample
        torch.testing.assert_close(job.latents[i:i + 1], expected, rtol=0, atol=1e-12)
    with pytest.raises(AssertionError):  # the two samples' noise differs (their own generators)
        torch.testing.assert_close(job.latents[0] - latents[0], job.latents[1] - latents[1])


def test_ddim_steps_are_deterministic_and_pndm_takes_no_generator():
    ctx = context("ddim")
    jobs = [Job(ctx, seeds=(s,), latents=torch.ones(1, 4, 4, 4, dtype=torch.float64)) for s in (1, 2)]
    for job in jobs:
        job.advance(torch.full((1, 4, 4, 4), 0.5, dtype=torch.float64))
    reference = ctx.new_scheduler().step(torch.full((1, 4, 4, 4), 0.5, dtype=torch.float64), jobs[0].timesteps[0],
                                         torch.ones(1, 4, 4, 4, dtype=torch.float64), eta=0.0).prev_sample
    assert torch.equal(jobs[0].latents, jobs[1].latents) and torch.equal(jobs[0].latents, reference)
    pndm = Job(context("pndm", steps=2), seeds=(1,))
    pndm.advance(noise(pndm))
    assert pndm.step_index == 1 and torch.isfinite(pndm.latents).all()


def test_previews_every_k_steps_never_the_last_from_the_x0_estimate():
    small = 0.02 * torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    job = Job(context("ddim", steps=5), preview_every=2, latents=small)  # x₀ ≠ x_t yet neither saturates
    made = []
    for step in range(1, 6):
        eps = 0.1 * noise(job, step)
        reference = job.ctx.new_scheduler()
        reference.set_timesteps(5)
        x0 = reference.step(eps, job.timestep(), job.latents, eta=0.0, return_dict=False)[1]
        job.advance(eps)
        if job.preview is not None:
            step_made, images = job.take_preview()
            made.append(step_made)
            assert job.preview is None and job.take_preview() is None
            assert len(images) == 2 and images[0].size == (previews.PREVIEW_SIDE,) * 2
            assert np.array_equal(np.asarray(images[1]), np.asarray(previews.preview_images(x0)[1]))
            assert not np.array_equal(np.asarray(images[1]), np.asarray(previews.preview_images(job.latents)[1]))
    assert made == [2, 4] and job.finished


def test_a_sampler_without_an_x0_estimate_previews_its_latents_and_no_option_no_preview():
    job = Job(context("dpmpp_2m", steps=3), preview_every=1)
    job.advance(noise(job))
    step, images = job.take_preview()
    assert step == 1
    assert np.array_equal(np.asarray(images[0]), np.asarray(previews.preview_images(job.latents)[0]))
    quiet = Job(context("ddim", steps=3))
    for _ in range(3):
        quiet.advance(noise(quiet))
    assert quiet.preview is None


def test_a_configured_preview_decoder_is_used(monkeypatch):
    loaded = []

    class Decoder:
        dtype = torch.float32

        def to(self, device):
            return self

        def decode(self, latents, return_dict=True):
            return (torch.zeros(latents.shape[0], 3, 8, 8),)  # mid grey

    monkeypatch.setattr(previews, "_tiny_decoder", lambda source: loaded.append(source) or Decoder())
    job = Job(context("ddim", steps=3), preview_every=1, preview_decoder="taesd")
    job.advance(noise(job))
    _, images = job.take_preview()
    assert loaded == ["taesd"] and np.asarray(images[0]).tolist()[0][0] == [128, 128, 128]


class Reporter:
    """The worker's StepReporter shape: a progress callback with a ``preview`` method."""

    def __init__(self):
        self.previews = []

    def __call__(self, job_id, step, total):
        return False

    def preview(self, job_id, step, total, images):
        self.previews.append((job_id, step, total, images))


def test_a_pending_preview_goes_to_the_reporter_once_or_is_dropped():
    job, reporter = Job(context(steps=4)), Reporter()
    hand_preview(job, reporter)  # nothing made yet
    job.preview = (2, ["a", "b"])
    hand_preview(job, reporter)
    hand_preview(job, reporter)
    assert reporter.previews == [("j", 2, 4, ["a", "b"])] and job.preview is None
    job.preview = (3, ["c"])
    hand_preview(job, lambda job_id, step, total: False)  # a plain callback: dropped
    assert job.preview is None


class Unchanged(Job):
    """A job with nothing to decode (as IP2P's empty instruction): its own final images."""

    def __init__(self, ctx):
        super().__init__(ctx, job_id="u")
        self.latents = None

    def final_images(self):
        return np.zeros((1, SIZE, SIZE, 3), np.float32), ["input"]


class Broken(Job):
    def result(self, pixels, images):
        raise ValueError("no result")


def test_decode_divides_by_the_scaling_factor_as_diffusers():
    model = FakeModel()
    latents = torch.full((1, 4, 4, 4), 0.1, dtype=torch.float64)
    pixels, images = decode(model, latents)
    assert pixels.shape == (1, SIZE, SIZE, 3) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, (0.1 / 0.5) / 2 + 0.5, rtol=1e-6)  # [−1, 1] → [0, 1] after 1/scaling
    assert isinstance(images[0], Image.Image) and images[0].size == (SIZE, SIZE)
    with pytest.raises(NonFiniteLatentsError, match="not finite"):
        decode(model, torch.full((1, 4, 4, 4), float("inf"), dtype=torch.float64))


def test_a_jobs_final_images_decode_its_latents():
    job = Job(context(), seeds=(1,))
    pixels, images = job.final_images()
    np.testing.assert_array_equal(pixels, decode(FakeModel(), job.latents)[0])
    assert len(images) == 1 and job.ctx.model.vae.decoded == [1]


def test_finished_jobs_decode_in_shared_calls_and_fail_alone():
    ctx = context()
    sizes = (2, 3, 4, 1, 7)  # at most 5 images a call: [2, 3] [4, 1] [7]
    jobs = [Job(ctx, seeds=range(n), job_id=f"j{n}") for n in sizes]
    bad = Job(ctx, seeds=(1,), job_id="bad", latents=torch.full((1, 4, 4, 4), float("nan"), dtype=torch.float64))
    broken = Broken(ctx, seeds=(1,), job_id="broken")
    results = finish_states(ctx.model, [*jobs, Unchanged(ctx), broken], decode_batch=5)
    assert ctx.model.vae.decoded == [5, 5, 7, 1]
    assert [r.job_id for r in results] == ["j2", "j3", "j4", "j1", "j7", "u", "broken"]
    assert all(r.ok for r in results[:6]) and [len(r.images) for r in results[:6]] == [*sizes, 1]
    expected = decode(FakeModel(), jobs[1].latents)[0]
    np.testing.assert_array_equal(results[1].pixels, expected)
    assert results[5].images == ["input"]
    assert isinstance(results[6].error, ValueError) and results[6].params == broken.params()
    ctx.model.vae.decoded.clear()
    failed = finish_states(ctx.model, [bad, jobs[0]])
    assert isinstance(failed[0].error, NonFiniteLatentsError) and "VAE overflow" in str(failed[0].error)
    assert failed[0].job_id == "bad" and failed[0].params["steps"] == 4 and failed[1].ok
    ctx.model.vae.decoded.clear()
    finish_states(ctx.model, [Job(ctx, seeds=(i,)) for i in range(9)])  # 8 images a call by default
    assert ctx.model.vae.decoded == [8, 1]
