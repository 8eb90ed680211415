"""Row buckets, settings and compilation of the UNet step: none of them changes a job's result.

Padding is checked on fp32 latents and float pixels (max abs diff ≤ 1e-4) with the UNet really seeing the
padded row counts; compilation (inductor on the CPU: gcc) on the tiny model, few steps, against eager.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.config import Settings
from worker.editing.acceleration import AUTO_BUCKETS, StepAcceleration, accelerated_unet, warm_up
from worker.editing.batch import BatchRunner
from worker.editing.buckets import bucket_for, padding_for, parse_buckets
from worker.editing.jobs import LocalBlendSpec, P2PJobSpec

SIZE, STEPS, TOL = 128, 4, 1e-4

JOBS = [
    P2PJobSpec("swap", "a cat riding a bicycle", ["a dog riding a bicycle"], seed=1),
    P2PJobSpec("blend", "a cat on a sofa", ["a lion on a sofa", "a tiger on a sofa"], seed=2,
               local_blend=LocalBlendSpec(["cat"], [["lion"], ["tiger"]], threshold=0.5), guidance_scale=5.0),
    P2PJobSpec("plain", "a house", ["a castle"], seed=3, edit="none"),
]


def assert_same(result, reference, tol=TOL):
    assert result.ok, result.error
    assert (result.latents - reference.latents).abs().max().item() <= tol
    assert np.abs(result.pixels - reference.pixels).max() <= tol


def test_buckets_parse_and_pick_the_smallest_that_holds_the_rows():
    assert parse_buckets("16, 1,2,4,8,4") == (1, 2, 4, 8, 16)
    assert parse_buckets("") == parse_buckets(None) == ()
    for bad in ("0,2", "a,b", "-4"):
        with pytest.raises(ValueError):
            parse_buckets(bad)
    buckets = (2, 4, 8, 16, 32)
    assert [bucket_for(r, buckets) for r in (1, 2, 3, 9, 32, 33)] == [2, 2, 4, 16, 32, 33]
    assert padding_for(10, buckets) == 6 and padding_for(7, ()) == 0


def test_worker_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("EDITSERVE_WORKER__ROW_BUCKETS", "1,2,4,8,16,32")
    monkeypatch.setenv("EDITSERVE_WORKER__COMPILE", "on")
    monkeypatch.setenv("EDITSERVE_WORKER__CUDA_GRAPHS", "false")
    worker = Settings().worker
    made = StepAcceleration.from_settings(worker, "cpu")
    assert made.row_buckets == (1, 2, 4, 8, 16, 32) and made.compiles_on("cpu") and made.tensor_controllers_on("cpu")
    assert made.mode_on("cuda") == worker.compile_mode  # CUDA graphs off: the configured mode


def test_auto_defaults_compile_on_cuda_only_and_pad_only_when_compiling():
    worker = Settings().worker
    assert worker.compile == "auto" and worker.row_buckets == "auto"
    on_cpu, on_gpu = StepAcceleration.from_settings(worker, "cpu"), StepAcceleration.from_settings(worker, "cuda")
    assert not on_cpu.compiles_on("cpu") and on_cpu.row_buckets == () and not on_cpu.tensor_controllers_on("cpu")
    assert on_gpu.compiles_on("cuda") and on_gpu.row_buckets == AUTO_BUCKETS
    assert on_gpu.mode_on("cuda") == "reduce-overhead"  # CUDA graphs by default with compile


@pytest.fixture(scope="module")
def eager_alone(sd_model):
    runner = BatchRunner(sd_model, height=SIZE, width=SIZE, steps=STEPS, scheduler="ddim")
    return {spec.job_id: runner.run([spec])[0] for spec in JOBS}


@pytest.mark.parametrize("buckets", [(8, 16, 32), (5, 7, 64)])
def test_padding_to_a_bucket_never_changes_a_job_result(sd_model, eager_alone, buckets):
    seen_rows = []
    hook = sd_model.unet.register_forward_pre_hook(lambda module, args: seen_rows.append(args[0].shape[0]))
    try:
        runner = BatchRunner(sd_model, height=SIZE, width=SIZE, steps=STEPS, scheduler="ddim",
                             acceleration=StepAcceleration(row_buckets=buckets))
        batched = runner.run(JOBS)
        alone = [runner.run([spec])[0] for spec in JOBS[:2]]
    finally:
        hook.remove()
    assert set(seen_rows) <= set(buckets) and len(seen_rows) == STEPS * 3
    assert bucket_for(4 + 6 + 4, buckets) in seen_rows  # the three jobs' 14 rows, padded
    for spec, result in zip(JOBS, batched):
        assert_same(result, eager_alone[spec.job_id])
    for spec, result in zip(JOBS, alone):
        assert_same(result, eager_alone[spec.job_id])


def test_padding_under_tensor_controllers_never_changes_a_job_result(sd_model, eager_alone):
    runner = BatchRunner(sd_model, height=SIZE, width=SIZE, steps=STEPS, scheduler="ddim", tensor_controllers=True,
                         acceleration=StepAcceleration(row_buckets=(16, 32)))
    for spec, result in zip(JOBS, runner.run(JOBS)):
        assert_same(result, eager_alone[spec.job_id])


def test_warm_up_runs_every_bucket_with_and_without_the_p2p_hook(sd_model):
    """The eager tiny UNet stands in for a compiled one: each bucket's shapes reach it, twice per pass."""
    seen, processors = [], []

    def record(module, args, kwargs):
        sample, timesteps = args
        text = kwargs["encoder_hidden_states"]
        seen.append((tuple(sample.shape), timesteps.tolist(), tuple(text.shape)))
        processors.append({type(p).__name__ for p in module.attn_processors.values()})

    before = dict(sd_model.unet.attn_processors)
    hook = sd_model.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        warmed = warm_up(sd_model, StepAcceleration(row_buckets=(4,)), height=64, width=128, buckets=(1, 2))
        default = warm_up(sd_model, StepAcceleration(), height=64, width=64, calls=1)
    finally:
        hook.remove()
    config = sd_model.unet.config
    text = (config.cross_attention_dim,)
    assert [s[0] for s in seen[:8]] == [(1, config.in_channels, 8, 16)] * 4 + [(2, config.in_channels, 8, 16)] * 4
    assert [s[1] for s in seen[:8]] == [[999]] * 4 + [[999, 999]] * 4
    assert [s[2] for s in seen[:8]] == [(1, 77, *text)] * 4 + [(2, 77, *text)] * 4
    assert [p == {"P2PAttnProcessor"} for p in processors[:4]] == [False, False, True, True]
    assert {k: type(v) for k, v in sd_model.unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}
    assert set(warmed.seconds) == {1, 2} and warmed.total_seconds == sum(warmed.seconds.values()) > 0
    assert warmed.model == "tiny-sd"
    assert set(default.seconds) == {1} and len(seen) == 10  # no buckets: one row, one call per pass


@pytest.mark.timeout(1200)  # two traces of the UNet: about a minute each on a loaded 2-core box
def test_a_compiled_step_equals_the_eager_one_and_later_batches_do_not_recompile(sd_model):
    """torch.compile of the tiny model (64 px, 3 steps), a plain and a word-swap job, batched and padded.

    The backend is ``aot_eager``: the same dynamo graphs, graph breaks and guards as inductor, without its C++
    code generation, which takes minutes more on a 2-core box (``bench/step_bench.py`` runs inductor on a GPU).
    Once a batch of these shapes ran, a batch of other jobs compiles nothing (no recompilation per job)."""
    from torch._dynamo.utils import counters

    size, steps = 64, 3
    jobs = [P2PJobSpec("swap", "a cat riding a bicycle", ["a dog riding a bicycle"], seed=1),
            P2PJobSpec("plain", "a house", ["a castle"], seed=3, edit="none")]
    eager = BatchRunner(sd_model, height=size, width=size, steps=steps, scheduler="ddim", tensor_controllers=True)
    expected = [eager.run([spec])[0] for spec in jobs]
    acceleration = StepAcceleration(compile="on", compile_mode="default", row_buckets=(8,), backend="aot_eager")
    compiled = BatchRunner(sd_model, height=size, width=size, steps=steps, scheduler="ddim",
                           acceleration=acceleration)
    assert compiled.unet is accelerated_unet(sd_model, acceleration) is not None
    assert compiled.ctx.tensor_controllers
    warmed = warm_up(sd_model, acceleration, height=size, width=size, calls=1)
    assert set(warmed.seconds) == {8} and warmed.total_seconds > 0
    warmed_graphs = counters["stats"]["unique_graphs"]
    assert warmed_graphs > 0
    for result, reference in zip(compiled.run(jobs), expected):
        assert_same(result, reference)
    graphs = counters["stats"]["unique_graphs"]
    others = [P2PJobSpec("swap2", "a house by the lake", ["a castle by the lake"], seed=7, cross_replace_steps=0.5),
              P2PJobSpec("plain2", "a cup of coffee", ["a cup of tea"], seed=8, edit="none")]
    assert all(r.ok for r in compiled.run(others))
    assert counters["stats"]["unique_graphs"] == graphs, (warmed_graphs, graphs, counters["stats"]["unique_graphs"])
