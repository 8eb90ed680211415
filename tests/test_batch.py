"""The batch runner: progress, cancellation, joining mid-way, and failures confined to their own job.

"Equal to alone" is asserted on fp32 latents and float pixels (max abs diff <= 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.editing.batch import BatchForwardError, BatchRunner, BatchState, NonFiniteLatentsError
from worker.editing.jobs import EditValidationError, JobCanceled, LocalBlendSpec, P2PJobSpec

SIZE, STEPS, TOL = 128, 6, 1e-4


JOBS = [
    P2PJobSpec("swap", "a cat riding a bicycle", ["a dog riding a bicycle"], seed=1),
    P2PJobSpec("blend", "a cat on a sofa", ["a lion on a sofa", "a tiger on a sofa"], seed=2,
               local_blend=LocalBlendSpec(["cat"], [["lion"], ["tiger"]]), guidance_scale=5.0),
    P2PJobSpec("plain", "a house", ["a castle"], seed=3, edit="none"),
]


@pytest.fixture(scope="module")
def alone(runner):
    """Each job of JOBS run by itself: the reference every batched variant must reproduce."""
    return {spec.job_id: runner.run([spec])[0] for spec in JOBS}


def assert_same(result, reference):
    assert result.ok, result.error
    assert (result.latents - reference.latents).abs().max().item() <= TOL
    assert np.abs(result.pixels - reference.pixels).max() <= TOL


def test_on_step_reports_every_job_every_step(runner, alone):
    seen = []
    results = runner.run(JOBS, on_step=lambda job_id, step, total: seen.append((job_id, step, total)))
    for spec, result in zip(JOBS, results):
        assert_same(result, alone[spec.job_id])
        assert [s for j, s, _ in seen if j == spec.job_id] == list(range(1, STEPS + 1))
    assert {t for _, _, t in seen} == {STEPS}
    assert results[0].params["seed"] == 1 and results[0].params["height"] == SIZE


@pytest.mark.parametrize("how", ["return True", "raise JobCanceled"])
def test_a_job_canceled_mid_way_leaves_the_others_identical(runner, alone, how):
    def on_step(job_id, step, total):
        if job_id == "blend" and step == 3:
            if how == "return True":
                return True
            raise JobCanceled()
        return None

    results = runner.run(JOBS, on_step=on_step)
    assert results[1].canceled and not results[1].ok and results[1].error is None
    assert_same(results[0], alone["swap"])
    assert_same(results[2], alone["plain"])


def test_a_broken_progress_callback_fails_only_its_job(runner, alone):
    def on_step(job_id, step, total):
        if job_id == "plain":
            raise ValueError("progress sink is down")

    results = runner.run(JOBS, on_step=on_step)
    assert isinstance(results[2].error, ValueError)
    assert_same(results[0], alone["swap"])


def test_jobs_join_between_steps_and_share_calls_at_different_timesteps(runner, sd_model, alone):
    """Step-level batching: job B joins after A's 2nd step; one UNet call then serves rows at two timesteps."""
    timesteps_per_call = []
    hook = sd_model.unet.register_forward_pre_hook(
        lambda module, args, kwargs: timesteps_per_call.append(args[1].unique().numel()), with_kwargs=True)
    try:
        with torch.no_grad(), BatchState(sd_model) as batch:
            first, second = runner.prepare(JOBS[0]), runner.prepare(JOBS[1])
            batch.admit(first)
            batch.step(), batch.step()
            batch.admit(second)
            while any(not j.finished for j in batch.jobs):
                report = batch.step()
                assert not report.failed
    finally:
        hook.remove()
    assert timesteps_per_call[2] == 2  # rows at two different steps in one call
    for job in (first, second):
        assert_same(job.result(*job.final_images()), alone[job.job_id])


def test_validation_errors_stay_with_their_job(runner, alone):
    bad = P2PJobSpec("bad", "a cat", ["a big dog here"], seed=9, edit="replace")  # word counts differ
    unknown_word = P2PJobSpec("word", "a cat", ["a dog"], seed=9, local_blend=LocalBlendSpec(["zebra"], [["dog"]]))
    results = runner.run([bad, JOBS[0], unknown_word])
    assert isinstance(results[0].error, EditValidationError) and results[0].error.field == "target_prompts"
    assert isinstance(results[2].error, EditValidationError)
    assert_same(results[1], alone["swap"])


def test_non_finite_latents_fail_only_that_job(runner, alone):
    absurd = P2PJobSpec("absurd", "a cat", ["a dog"], seed=4, guidance_scale=1e38)
    results = runner.run([JOBS[0], absurd, JOBS[2]])
    assert isinstance(results[1].error, NonFiniteLatentsError) and "absurd" in str(results[1].error)
    assert_same(results[0], alone["swap"])
    assert_same(results[2], alone["plain"])


def test_a_failing_after_step_hook_fails_only_that_job(runner, alone, monkeypatch):
    from worker.editing.p2p import P2PJobState

    original = P2PJobState.after_step

    def after_step(self, latents):
        if self.job_id == "blend" and self.step_index == 2:
            return latents * float("nan")  # a NaN injected into one job's latents mid-run
        return original(self, latents)

    monkeypatch.setattr(P2PJobState, "after_step", after_step)
    results = runner.run(JOBS)
    assert isinstance(results[1].error, NonFiniteLatentsError) and "step 3/" in str(results[1].error)
    assert_same(results[0], alone["swap"])
    assert_same(results[2], alone["plain"])


@pytest.mark.parametrize("nan_at", [2, STEPS - 1])
def test_deferred_finite_checks_fail_the_same_job_at_the_step_it_broke(runner, alone, monkeypatch, nan_at):
    """On a GPU the finite flags reach the host a step or more late (no sync per step). Simulated on the CPU
    with checks held back two steps: the broken job still fails alone, naming its step, also when it breaks
    in its last step (every pending check is read before a job is decoded)."""
    from worker.editing.p2p import P2PJobState

    original_init, original_after = BatchState.__init__, P2PJobState.after_step

    def init(self, model, **kwargs):
        original_init(self, model, **kwargs)
        self.finite_check_lag = 2

    def after_step(self, latents):
        if self.job_id == "blend" and self.step_index == nan_at:
            return latents * float("nan")
        return original_after(self, latents)

    monkeypatch.setattr(BatchState, "__init__", init)
    monkeypatch.setattr(P2PJobState, "after_step", after_step)
    results = runner.run(JOBS)
    assert isinstance(results[1].error, NonFiniteLatentsError), results[1]
    assert f"step {nan_at + 1}/{STEPS}" in str(results[1].error)
    assert_same(results[0], alone["swap"])
    assert_same(results[2], alone["plain"])


def test_a_job_failing_before_the_forward_call_fails_alone(runner, alone, monkeypatch):
    from worker.editing.p2p import P2PJobState

    original = P2PJobState.model_input

    def model_input(self):
        if self.job_id == "swap" and self.step_index == 1:
            raise RuntimeError("controller refused the step")
        return original(self)

    monkeypatch.setattr(P2PJobState, "model_input", model_input)
    results = runner.run(JOBS)
    assert "refused" in str(results[0].error)
    assert_same(results[1], alone["blend"])
    assert_same(results[2], alone["plain"])


def test_a_failing_shared_call_fails_every_job_and_restores_the_unet(runner, sd_model, monkeypatch):
    before = {k: type(v) for k, v in sd_model.unet.attn_processors.items()}

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(type(sd_model.unet), "forward", broken)
    results = runner.run(JOBS[:2])
    assert all(isinstance(r.error, BatchForwardError) and "out of memory" in str(r.error) for r in results)
    monkeypatch.undo()
    assert {k: type(v) for k, v in sd_model.unet.attn_processors.items()} == before
    assert not any("forward" in m.__dict__ for m in sd_model.unet.modules())  # per-job GEMM patch removed


def test_runner_rejects_sizes_the_vae_cannot_take(sd_model):
    with pytest.raises(ValueError):
        BatchRunner(sd_model, height=100, width=128, steps=4, scheduler="ddim")
