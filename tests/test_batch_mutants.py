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
    assert torch.equal(b.predictions[0], torch.full((3, 1, 1, 1), 2.0))  # input 0 + its own text value
    assert "forward" not in unet.time_embedding["linear_1"].__dict__  # closed: the UNet's own forward again


def test_rows_beyond_the_largest_bucket_run_unpadded():
    model = fake_model()
    with BatchState(model, row_buckets=(2,)) as batch:
        batch.admit(FakeJob("a", 1, rows=3))
        step_all(batch)
    assert [rows for rows, _ in model.unet.calls] == [3]


def test_the_text_rows_follow_the_batch_membership():
    """Cached while the same jobs stay; rebuilt when one leaves and another of the same size joins, and every
    step for a job whose text changes per step."""
    model = fake_model()
    with BatchState(model) as batch:
        a, b, c = FakeJob("a", 3, rows=1, text=1.0), FakeJob("b", 3, rows=1, text=2.0), FakeJob("c", 3, rows=1, text=3.0)
        batch.admit(a), batch.admit(b)
        batch.step()
        batch.remove(b)
        batch.admit(c)
        batch.step()
        c.per_step_text, c.text = True, 4.0
        batch.step()
        c.text = 5.0
        batch.step()
    assert [texts for _, texts in model.unet.calls] == [[1.0, 2.0], [1.0, 3.0], [1.0, 4.0], [5.0]]


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
    assert str(err).startswith("job bad: latents are not finite after step 2/3")
    assert [r.advanced for r in reports] == [[good, bad], [good], [good]]
