"""The step-level running batch (``ContinuousBatch``): jobs join mid-flight, differ in steps and schedulers,
leave on cancel — and each comes out as if it ran alone. Asserted on fp32 latents (max abs diff <= 1e-4)."""

from __future__ import annotations

import pytest

from worker.editing.batch import BatchRunner
from worker.editing.continuous import ContinuousBatch, finish_states, result_of
from worker.editing.jobs import LocalBlendSpec, P2PJobSpec

SIZE, TOL = 64, 1e-4

# (spec, steps, scheduler): different step counts, schedulers, guidance and edit modes
JOBS = [
    (P2PJobSpec("a", "a cat riding a bicycle", ["a dog riding a bicycle"], seed=1), 6, "ddim"),
    (P2PJobSpec("b", "a cat on a sofa", ["a lion on a sofa", "a tiger on a sofa"], seed=2,
                local_blend=LocalBlendSpec(["cat"], [["lion"], ["tiger"]]), guidance_scale=5.0), 4, "euler_a"),
    (P2PJobSpec("c", "a house", ["a castle"], seed=3, edit="refine", guidance_scale=9.0), 5, "pndm"),
]


@pytest.fixture(scope="module")
def alone(sd_model):
    """Each job run by itself with the request-level runner: the reference."""
    out = {}
    for spec, steps, scheduler in JOBS:
        out[spec.job_id] = BatchRunner(sd_model, height=SIZE, width=SIZE, steps=steps,
                                       scheduler=scheduler).run([spec])[0]
    return out


def run_continuous(model, arrivals: dict[int, list[int]], cancel: tuple[str, int] | None = None):
    """Admit JOBS[i] before step k for each ``k: [i...]`` of ``arrivals``; returns results and step trace."""
    batch = ContinuousBatch(model, height=SIZE, width=SIZE)
    results, ended_at, rows_per_step = {}, {}, []

    def on_step(job_id, step, total):
        return cancel is not None and (job_id, step) == cancel

    try:
        k = 0
        while k <= max(arrivals) or len(batch):
            for i in arrivals.get(k, []):
                spec, steps, scheduler = JOBS[i]
                batch.admit(batch.prepare(spec, steps=steps, scheduler=scheduler))
            outcome = batch.step(on_step)
            rows_per_step.append(outcome.rows)
            finished = [r.job for r in outcome.retired if r.how == "finished"]
            for job, result in zip(finished, finish_states(model, finished)):
                results[job.job_id] = result
                ended_at[job.job_id] = (job.step_index, job.total_steps)
            for retired in outcome.retired:
                if retired.how != "finished":
                    results[retired.job.job_id] = result_of(retired)
            k += 1
    finally:
        batch.close()
    return results, ended_at, rows_per_step


def assert_same(result, reference, tol: float = TOL):
    assert result.ok, result.error
    assert (result.latents - reference.latents).abs().max().item() <= tol


def scaled_tol(reference) -> float:
    """1e-4 relative to the latents' magnitude: Euler-a's final latents of a random tiny UNet reach |x| ~ 30,
    where one fp32 ulp is already 4e-6; a batch of another shape reorders the conv/attention sums."""
    return TOL * max(1.0, reference.latents.abs().max().item())


def test_a_job_admitted_into_a_running_batch_equals_alone(sd_model, alone):
    results, _, rows = run_continuous(sd_model, {0: [0], 2: [1], 3: [2]})
    for spec, _, _ in JOBS:
        assert_same(results[spec.job_id], alone[spec.job_id])
    # a: 4 rows; b (two targets) joins with 6 rows, c with 4: the batch grew and shrank between steps
    assert rows[:4] == [4, 4, 10, 14]
    assert rows[-1] < 14


def test_different_steps_and_schedulers_share_a_batch_and_each_ends_at_its_own_step(sd_model, alone):
    results, ended_at, rows = run_continuous(sd_model, {0: [0, 1, 2]})
    assert ended_at == {"a": (6, 6), "b": (4, 4), "c": (6, 6)}  # PNDM makes one more UNet call than its steps
    assert rows == [14] * 4 + [8] * 2
    for spec, _, _ in JOBS:
        assert_same(results[spec.job_id], alone[spec.job_id], scaled_tol(alone[spec.job_id]))


def test_cancelling_one_mid_flight_leaves_the_others_unchanged(sd_model, alone):
    results, ended_at, _ = run_continuous(sd_model, {0: [0, 1], 1: [2]}, cancel=("b", 2))
    assert results["b"].canceled and results["b"].error is None and "b" not in ended_at
    assert_same(results["a"], alone["a"])
    assert_same(results["c"], alone["c"])


def test_a_job_of_another_latent_size_is_not_mixed_in(sd_model):
    batch = ContinuousBatch(sd_model, height=SIZE, width=SIZE)
    try:
        job = batch.prepare(JOBS[0][0], steps=3, scheduler="ddim")
        assert tuple(job.latents.shape[-2:]) == (SIZE // 8, SIZE // 8)
        with pytest.raises(ValueError, match="steps"):
            batch.prepare(JOBS[0][0], steps=0)
    finally:
        batch.close()
