"""``BatchState`` on a fake UNet and fake jobs: how rows, text, timesteps and attention segments are laid out,
padded and handed back, and how each kind of failure is attributed (no diffusion: milliseconds).

The real-model behaviour (batched == alone) is tests/test_batch.py.
"""

from __future__ import annotations

import pytest
import torch

from batch_fakes_support import FakeJob, RecordingLinear, fake_model
from worker.editing.batch import BatchForwardError, BatchState, NonFiniteLatentsError, PerJobRowVectors


class RowVectorUNet(torch.nn.Module):
    """The GEMMs with one row per batch row (timestep / added / class embeddings, resnets' time projection)
    next to one that has batch × tokens rows (attention)."""

    def __init__(self):
        super().__init__()
        self.time_embedding = torch.nn.ModuleDict({"linear_1": RecordingLinear()})
        self.add_embedding = torch.nn.ModuleDict({"linear_1": RecordingLinear()})
        self.class_embedding = torch.nn.ModuleDict({"linear_1": RecordingLinear()})
        self.block = torch.nn.ModuleDict({"time_emb_proj": RecordingLinear(), "to_q": RecordingLinear()})

    def row_layers(self):
        return [self.time_embedding["linear_1"], self.add_embedding["linear_1"], self.class_embedding["linear_1"],
                self.block["time_emb_proj"]]


def test_row_vector_gemms_run_job_by_job_and_are_restored():
    unet = RowVectorUNet()
    hooked = unet.block["time_emb_proj"]
    own = hooked.forward  # an accelerate-style hook: the instance already has its own forward
    hooked.forward = own
    per_job = PerJobRowVectors(unet)
    x = torch.arange(5.0)[:, None]
    for segments in (None, [5], [2, 2]):  # no jobs, one job, rows not matching the segments: one call
        per_job.segments = segments
        for layer in unet.row_layers():
            layer(x)
    per_job.segments = [2, 3]
    outputs = [layer(x) for layer in [*unet.row_layers(), unet.block["to_q"]]]
    assert [layer.rows for layer in unet.row_layers()] == [[5, 5, 5, 2, 3]] * 4
    assert unet.block["to_q"].rows == [5]  # attention-like GEMMs keep the whole batch
    per_job.restore()
    assert hooked.__dict__["forward"] is own
    assert all("forward" not in layer.__dict__ for layer in unet.row_layers()[:3])
    for layer, out in zip([*unet.row_layers(), unet.block["to_q"]], outputs):
        assert torch.allclose(out, layer(x))
    assert [layer.rows[-1] for layer in unet.row_layers()] == [5] * 4  # restored: whole batch again


def step_all(batch):
    reports = []
    while any(not job.finished for job in batch.jobs):
        reports.append(batch.step())
    return reports


def test_padding_rows_fill_the_bucket_and_never_reach_a_job():
    """5 rows in buckets (4, 8): the UNet sees 8; the 3 padding rows take the last timestep, zero text and
    their own row-vector group, and their outputs are dropped."""
    model = fake_model()
    with BatchState(model, row_buckets=(4, 8)) as batch:
        a, b = FakeJob("a", 2, rows=2, text=1.0), FakeJob("b", 1, rows=3, text=2.0)
        b.row_timesteps = lambda: torch.full((3,), 7)
        batch.admit(a), batch.admit(b)
        reports = step_all(batch)
        assert [[j.job_id for j in r.advanced] for r in reports] == [["a", "b"], ["a"]]
    unet = model.unet
    assert [rows for rows, _ in unet.calls] == [8, 4]
    assert unet.calls[0][1] == [1.0, 1.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0] and unet.calls[1][1] == [1.0, 1.0, 0.0, 0.0]
    assert unet.timesteps == [[0, 0, 7, 7, 7, 7, 7, 7], [1, 1, 1, 1]]
    assert unet.time_embedding["linear_1"].rows == [2, 3, 3, 2, 2]
    assert [p.shape[0] for p in a.predictions + b.predictions] == [2, 2, 3]
    assert torch.equal(b.predictions[0], torch.full((3, 4, 1, 1), 2.0))  # input 0 + its own text value
    assert "forward" not in unet.time_embedding["linear_1"].__dict__  # closed: the UNet's own forward again
    assert unet.processors == []  # no P2P job: its attention processors were never touched


def test_rows_beyond_the_largest_bucket_run_unpadded():
    model = fake_model()
    with BatchState(model, row_buckets=(2,)) as batch:
        batch.admit(FakeJob("a", 1, rows=3))
        step_all(batch)
    assert [rows for rows, _ in model.unet.calls] == [3]


def test_the_text_rows_follow_the_batch_membership():
    """Asked of the jobs only when the membership changes (the same jobs reuse them), also when a newcomer
    replaces a job of the same size; every step for a job whose text changes per step."""
    model = fake_model()
    with BatchState(model) as batch:
        a, b, c, d = (FakeJob(job_id, steps, rows=1, text=text)
                      for job_id, steps, text in (("a", 6, 1.0), ("b", 3, 2.0), ("c", 3, 3.0), ("d", 1, 6.0)))
        batch.admit(a), batch.admit(b)
        batch.step(), batch.step()
        batch.remove(b)
        batch.admit(c)
        batch.step()
        c.per_step_text, c.text = True, 4.0
        batch.step()
        c.text = 5.0
        batch.step()
        batch.remove(c)
        batch.step()
        batch.remove(a)
        batch.admit(d)
        batch.step()
    assert [texts for _, texts in model.unet.calls] == [
        [1.0, 2.0], [1.0, 2.0], [1.0, 3.0], [1.0, 4.0], [1.0, 5.0], [1.0], [6.0]]
    assert (a.text_calls, b.text_calls, c.text_calls, d.text_calls) == (5, 1, 3, 1)


def test_attention_segments_are_laid_out_job_after_job(monkeypatch):
    """P2P processors go in only when a job has a controller that needs the hook, once, and come out on close."""
    import worker.editing.processor as processor

    installed = []

    class Router:
        segments = None

    def install(unet):
        installed.append(unet)
        return Router(), {"original": "processors"}

    monkeypatch.setattr(processor, "install_shared_p2p_processors", install)
    model = fake_model()
    a_ctrl, b1, b2, quiet = object(), object(), object(), type("Quiet", (), {"needs_hook": False})()
    with BatchState(model) as batch:
        plain = FakeJob("plain", 2, rows=2)
        batch.admit(plain)
        silent = FakeJob("silent", 2, rows=2)
        silent.controller = quiet
        batch.admit(silent)
        assert installed == []
        a, b = FakeJob("a", 2, rows=2), FakeJob("b", 2, rows=3)
        a.controller = a_ctrl
        b.attention_segments = lambda: [(1, b1), (2, b2)]
        batch.admit(a), batch.admit(b)
        assert installed == [model.unet]
        batch.remove(plain)
        batch.step()
        assert batch._router.segments == [(0, 2, quiet), (2, 4, a_ctrl), (4, 5, b1), (5, 7, b2)]
    assert model.unet.processors == [{"original": "processors"}]
    batch.close()
    assert model.unet.processors == [{"original": "processors"}]


def test_a_failing_unet_call_fails_every_job_of_it_naming_the_cause():
    model = fake_model()
    cause = RuntimeError("CUDA out of memory")
    model.unet.fail = cause
    with BatchState(model) as batch:
        jobs = [FakeJob("a", 2), FakeJob("b", 2), FakeJob("done", 0)]
        for job in jobs:
            batch.admit(job)
        report = batch.step()
    assert [job for job, _ in report.failed] == jobs[:2] and not report.advanced
    errors = {id(err) for _, err in report.failed}
    err = report.failed[0][1]
    assert len(errors) == 1 and isinstance(err, BatchForwardError) and err.__cause__ is cause
    assert str(err) == "batched UNet call failed (2 jobs): RuntimeError: CUDA out of memory"
    assert batch.jobs == [jobs[2]]


def test_a_job_failing_its_own_part_leaves_alone():
    model = fake_model()
    with BatchState(model) as batch:
        good, bad_input, bad_step = FakeJob("good", 2), FakeJob("input", 2), FakeJob("step", 2)
        refused, broken = RuntimeError("refused"), ValueError("guidance")

        def raise_(exc):
            raise exc

        bad_input.model_input = lambda: raise_(refused)
        bad_step.advance = lambda rows: raise_(broken)
        for job in (good, bad_input, bad_step):
            batch.admit(job)
        report = batch.step()
        assert report.advanced == [good] and report.failed == [(bad_input, refused), (bad_step, broken)]
        assert batch.jobs == [good] and [rows for rows, _ in model.unet.calls] == [4]


def test_non_finite_latents_fail_their_job_at_the_step_they_appeared():
    model = fake_model()
    with BatchState(model) as batch:
        good, bad = FakeJob("good", 3), FakeJob("bad", 3)
        advance = bad.advance

        def nan_at_2(rows):
            advance(rows)
            if bad.step_index == 2:
                bad.latents = torch.full((1, 1, 1, 1), float("inf"))

        bad.advance = nan_at_2
        batch.admit(good), batch.admit(bad)
        reports = step_all(batch)
    assert [len(r.failed) for r in reports] == [0, 1, 0]
    job, err = reports[1].failed[0]
    assert job is bad and isinstance(err, NonFiniteLatentsError)
    assert str(err) == "job bad: latents are not finite after step 2/3 (guidance too large, or a numerical overflow)"
    assert [r.advanced for r in reports] == [[good, bad], [good], [good]]


def test_held_back_finite_checks_report_a_broken_job_as_soon_as_they_are_read():
    """The GPU bookkeeping simulated on the CPU: with checks two steps late, a job broken in step 1 still
    advances in step 2 and fails in step 3, naming step 1."""
    model = fake_model()
    with BatchState(model) as batch:
        batch.finite_check_lag = 2
        good, bad = FakeJob("good", 5), FakeJob("bad", 5)
        bad.latents = torch.full((1, 1, 1, 1), float("nan"))
        batch.admit(good), batch.admit(bad)
        reports = step_all(batch)
    assert [[j.job_id for j, _ in r.failed] for r in reports] == [[], [], ["bad"], [], []]
    assert "after step 1/5" in str(reports[2].failed[0][1]) and bad.step_index == 3


def runner_of(model, **kwargs):
    """A ``BatchRunner`` on the fake model whose specs are fake jobs (a spec of another type fails to prepare)."""
    from worker.editing.batch import BatchRunner

    runner = BatchRunner(model, height=8, width=16, steps=3, **kwargs)

    def prepare(spec):
        if not isinstance(spec, FakeJob):
            raise ValueError(f"cannot prepare {spec.job_id}")
        return spec

    runner.prepare = prepare
    return runner


def test_the_runner_gives_each_job_its_own_outcome_in_order():
    from types import SimpleNamespace

    model = fake_model()
    runner = runner_of(model)
    ok, bad, empty, cancel, sink, short = (FakeJob("ok", 3), SimpleNamespace(job_id="bad"), FakeJob("empty", 0),
                                           FakeJob("cancel", 3), FakeJob("sink", 3), FakeJob("short", 2))
    seen = []

    def on_step(job_id, step, total):
        seen.append((job_id, step, total))
        if job_id == "sink":
            raise ValueError("progress sink is down")
        return job_id == "cancel" and step == 2

    results = runner.run([ok, bad, empty, cancel, sink, short], on_step)
    assert [r.job_id for r in results] == ["ok", "bad", "empty", "cancel", "sink", "short"]
    assert [r.ok for r in results] == [True, False, True, False, False, True]
    assert results[0].images == ["image0"] and results[2].images == ["image0"] and results[5].pixels is not None
    assert "cannot prepare bad" in str(results[1].error) and results[1].params == runner.ctx.params()
    assert results[3].canceled and results[3].error is None and results[3].params == {"job": "cancel"}
    assert str(results[4].error) == "progress sink is down" and not results[4].canceled
    assert results[4].params == {"job": "sink"}
    assert cancel.step_index == 2 and sink.step_index == 1 and empty.step_index == 0
    assert [s for s in seen if s[0] in ("ok", "short")] == [("ok", 1, 3), ("short", 1, 2), ("ok", 2, 3),
                                                             ("short", 2, 2), ("ok", 3, 3)]
    assert model.vae.calls == [1, 1, 1]  # empty at once, short after its 2nd step, ok after its 3rd


def test_jobs_finishing_together_share_vae_calls_up_to_decode_batch():
    """By default at most 8 images per VAE call (its memory grows with them), a job's images never split."""
    model = fake_model()
    assert all(r.ok for r in runner_of(model).run([FakeJob("a", 2), FakeJob("b", 2), FakeJob("c", 2)]))
    assert model.vae.calls == [3]
    model.vae.calls.clear()
    assert all(r.ok for r in runner_of(model).run([FakeJob(str(i), 1) for i in range(9)]))
    assert model.vae.calls == [8, 1]
    model.vae.calls.clear()
    assert all(r.ok for r in runner_of(model, decode_batch=1).run([FakeJob("a", 1), FakeJob("b", 1)]))
    assert all(r.ok for r in runner_of(model, decode_batch=0).run([FakeJob("a", 1), FakeJob("b", 1)]))
    assert model.vae.calls == [1, 1, 1, 1]


@pytest.mark.parametrize("size", [(100, 128), (128, 100), (0, 128), (128, 0), (-8, 8)])
def test_the_runner_refuses_sizes_the_vae_cannot_take(size):
    from worker.editing.batch import BatchRunner

    with pytest.raises(ValueError, match=f"positive multiples of 8, got {size[0]}x{size[1]}"):
        BatchRunner(fake_model(), height=size[0], width=size[1], steps=4)


def test_the_runner_needs_one_step_and_defaults_to_the_models_scheduler():
    from worker.editing.batch import BatchRunner

    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        BatchRunner(fake_model(), height=8, width=8, steps=0)
    runner = BatchRunner(fake_model(), height=8, width=16, steps=1)
    assert runner.ctx.params() == {"model": "fake", "height": 8, "width": 16, "steps": 1, "scheduler": "ddim"}
    assert runner.kind == "text2image" and not runner.ctx.tensor_controllers
    assert BatchRunner(fake_model(), height=8, width=8, steps=1, scheduler="pndm").ctx.scheduler == "pndm"
    assert BatchRunner(fake_model(), height=8, width=8, steps=1, tensor_controllers=True).ctx.tensor_controllers


def test_the_runner_pads_to_its_buckets_and_runs_a_compiled_unet_with_tensor_controllers(monkeypatch):
    import worker.editing.batch as batch_module
    from worker.editing.acceleration import StepAcceleration

    model = fake_model()
    runner_of(model, acceleration=StepAcceleration(row_buckets=(8,))).run([FakeJob("a", 1, rows=3)])
    assert [rows for rows, _ in model.unet.calls] == [8]
    compiled, model = fake_model().unet, fake_model()
    monkeypatch.setattr(batch_module, "accelerated_unet", lambda m, acceleration: compiled if acceleration else None)
    patched = []  # a compiled UNet would recompile per batch membership: no per-job GEMMs under it
    compiled.register_forward_pre_hook(
        lambda module, args: patched.append("forward" in model.unet.time_embedding["linear_1"].__dict__))
    runner = runner_of(model, acceleration=StepAcceleration(compile="on"))
    assert runner.ctx.tensor_controllers and runner.unet is compiled
    assert runner.run([FakeJob("a", 1, rows=3)])[0].ok
    assert [rows for rows, _ in compiled.calls] == [3] and model.unet.calls == [] and patched == [False]


def test_the_runner_hands_each_steps_preview_to_the_callbacks_sink():
    model = fake_model()
    job = FakeJob("p", 2)
    advance = job.advance

    def advance_with_preview(rows):
        advance(rows)
        job.preview = (job.step_index, ["preview"])

    job.advance = advance_with_preview
    previews = []

    def on_step(job_id, step, total):
        return None

    on_step.preview = lambda job_id, step, total, images: previews.append((job_id, step, total, images))
    assert runner_of(model).run([job], on_step)[0].ok
    assert previews == [("p", 1, 2, ["preview"]), ("p", 2, 2, ["preview"])]


def test_a_job_of_another_method_is_refused_naming_the_model():
    from worker.editing.batch import BatchRunner
    from worker.editing.jobs import IP2PJobSpec

    result = BatchRunner(fake_model(), height=8, width=8, steps=2).run([IP2PJobSpec("ip", None, "snowy", [])])[0]
    assert result.error.field == "model" and "model 'fake' (text2image) cannot run" in str(result.error)
