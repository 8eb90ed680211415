"""``ContinuousBatch`` membership and retirement, on a fake model and fake jobs (no diffusion: milliseconds).

The real-model behaviour (equal to alone) is tests/test_continuous_core.py; here: which job leaves when and
how, what ``on_step`` sees, the contexts a batch hands out, and the results of jobs that did not finish.
"""

from __future__ import annotations

import pytest

from batch_fakes_support import FakeJob, fake_model
from worker.editing.continuous import ContinuousBatch, Retired, result_of
from worker.editing.jobs import JobCanceled


@pytest.fixture
def model():
    return fake_model()


@pytest.mark.parametrize("size", [(60, 64), (64, 60), (0, 64), (64, 0), (-8, 64)])
def test_a_latent_size_the_vae_cannot_take_is_refused(model, size):
    with pytest.raises(ValueError, match="positive multiples of 8") as raised:
        ContinuousBatch(model, height=size[0], width=size[1])
    assert f"{size[0]}x{size[1]}" in str(raised.value)


def test_one_context_per_steps_and_scheduler_sharing_the_empty_prompt_embedding(model):
    batch = ContinuousBatch(model, height=8, width=16)
    first = batch.context(1, None)  # one step is enough; no scheduler: the model's
    assert (first.steps, first.scheduler, first.height, first.width) == (1, "ddim", 8, 16)
    assert batch.context(1, "ddim") is first and batch.context(2, "ddim") is not first
    null = first.null_text()
    assert batch.context(3, "euler_a").null_text() is null and len(model.encoded) == 1
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        batch.context(0, "ddim")


def run_to_end(batch, on_step=None):
    outcomes = []
    while len(batch):
        outcomes.append(batch.step(on_step))
    return outcomes


def test_jobs_leave_at_their_own_last_step_and_on_step_sees_each_step(model):
    batch = ContinuousBatch(model, height=8, width=8)
    short, long_, empty = FakeJob("short", 1, rows=2), FakeJob("long", 3, rows=4), FakeJob("empty", 0)
    for job in (short, long_, empty):
        batch.admit(job)
    assert batch.jobs == [short, long_, empty] and batch.rows == 6 + 2 and len(batch) == 3
    seen = []
    outcomes = run_to_end(batch, lambda job_id, step, total: seen.append((job_id, step, total)))
    assert [(o.rows, o.advanced) for o in outcomes] == [(8, 2), (4, 1), (4, 1)]
    assert [[(r.job.job_id, r.how, r.error) for r in o.retired] for o in outcomes] == [
        [("empty", "finished", None), ("short", "finished", None)], [], [("long", "finished", None)]]
    assert seen == [("short", 1, 1), ("long", 1, 3), ("long", 2, 3), ("long", 3, 3)]
    assert empty.predictions == [] and len(long_.predictions) == 3
    assert model.unet.calls[0][0] == 6 and batch.jobs == []


@pytest.mark.parametrize("how", ["return True", "raise JobCanceled"])
def test_a_canceled_job_leaves_without_error_and_the_others_go_on(model, how):
    batch = ContinuousBatch(model, height=8, width=8)
    keep, cancel = FakeJob("keep", 3), FakeJob("cancel", 3)
    batch.admit(keep), batch.admit(cancel)

    def on_step(job_id, step, total):
        if job_id == "cancel" and step == 2:
            if how == "return True":
                return 1
            raise JobCanceled()
        return None

    outcomes = run_to_end(batch, on_step)
    retired = [(r.job.job_id, r.how, r.error) for o in outcomes for r in o.retired]
    assert retired == [("cancel", "canceled", None), ("keep", "finished", None)]
    assert cancel.step_index == 2 and keep.step_index == 3
    result = result_of(outcomes[1].retired[0])
    assert result.canceled and result.error is None and result.job_id == "cancel" and result.params == {"job": "cancel"}


def test_a_broken_callback_or_job_fails_only_that_job(model):
    batch = ContinuousBatch(model, height=8, width=8)
    good, sink_broken, refuses = FakeJob("good", 1), FakeJob("sink", 2), FakeJob("refuses", 2)
    error = RuntimeError("controller refused the step")

    def model_input():
        raise error

    refuses.model_input = model_input
    for job in (sink_broken, refuses, good):
        batch.admit(job)
    sink_error = ValueError("progress sink is down")
    seen = []

    def on_step(job_id, step, total):
        seen.append((job_id, step))
        if job_id == "sink":
            raise sink_error

    first = batch.step(on_step)
    assert first.advanced == 2 and [(r.job, r.how, r.error) for r in first.retired] == [
        (refuses, "failed", error), (sink_broken, "failed", sink_error), (good, "finished", None)]
    assert batch.jobs == [] and seen == [("sink", 1), ("good", 1)]  # the jobs after a broken one still report
    failed = result_of(first.retired[1])
    assert failed.error is sink_error and not failed.canceled and failed.job_id == "sink"
    assert failed.params == {"job": "sink"}
    assert result_of(Retired(good, "finished")) is None


def test_a_preview_made_in_a_step_goes_to_the_callbacks_preview_sink(model):
    batch = ContinuousBatch(model, height=8, width=8)
    job = FakeJob("p", 2)
    original = job.advance

    def advance(rows):
        original(rows)
        job.preview = (job.step_index, ["image"])

    job.advance = advance
    batch.admit(job)
    previews = []

    def on_step(job_id, step, total):
        return None

    on_step.preview = lambda job_id, step, total, images: previews.append((job_id, step, total, images))
    run_to_end(batch, on_step)
    assert previews == [("p", 1, 2, ["image"]), ("p", 2, 2, ["image"])]
    run_to_end(batch)  # no callback: nothing to hand a preview to


def test_rows_changed_rebuilds_the_text_rows_of_the_next_step(model):
    """A job switching phase (inversion, then editing) changes its text rows; the batch must not reuse the old."""
    batch = ContinuousBatch(model, height=8, width=8)
    job = FakeJob("phase", 3, rows=1, text=1.0)
    batch.admit(job)
    batch.step()
    job.text, job.num_rows = 5.0, 2
    batch.rows_changed()
    batch.step()
    assert model.unet.calls == [(1, [1.0]), (2, [5.0, 5.0])]
    batch.remove(job)
    assert len(batch) == 0
    batch.close()


def test_a_job_of_another_method_is_refused_naming_the_model(model):
    from worker.editing.jobs import EditValidationError, IP2PJobSpec

    batch = ContinuousBatch(model, height=8, width=8)
    with pytest.raises(EditValidationError, match="model 'fake' \\(text2image\\) cannot run a IP2PJobSpec") as raised:
        batch.prepare(IP2PJobSpec("ip", None, "make it snowy", []), steps=2)
    assert raised.value.field == "model"
