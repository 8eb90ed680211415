"""The tensor-indexed P2P controllers (decisions gathered with a device step tensor) equal today's host-side ones.

Every mode, several targets, per-word windows, local blend (with a late start and substruct words), reweight
alone and on a base edit, attention maps; each job alone and all of them batched. Compared on fp32 latents,
float pixels and the stored attention maps (max abs diff ≤ 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.editing.batch import BatchRunner
from worker.editing.controllers import AttentionController
from worker.editing.jobs import LocalBlendSpec, P2PJobSpec
from worker.editing.tensor_controller import TensorController

SIZE, STEPS, TOL = 128, 5, 1e-4

JOBS = [
    P2PJobSpec("replace", "a cat riding a bicycle", ["a dog riding a bicycle"], seed=1, self_replace_steps=0.6,
               attention_map_prompts=[0, 1]),
    P2PJobSpec("refine", "a house", ["a red house", "a small house"], seed=2, edit="refine",
               cross_replace_steps=(0.2, 0.9)),
    P2PJobSpec("reweight", "a red car", ["a red car"], seed=3, edit="reweight", reweight=[{"red": 4.0}]),
    P2PJobSpec("replace+reweight", "a cat on a sofa", ["a lion on a sofa", "a tiger on a sofa"], seed=4,
               reweight=[{"lion": 2.0}, {"tiger": -1.0}], cross_replace_steps={"default_": 0.8, "tiger": 0.4}),
    P2PJobSpec("blend", "a cat on a sofa", ["a lion on a sofa", "a tiger on a sofa"], seed=5, guidance_scale=5.0,
               local_blend=LocalBlendSpec(["cat"], [["lion"], ["tiger"]], threshold=0.5, start_blend=0.4,
                                          substruct_words=["sofa"])),
    P2PJobSpec("none", "a house", ["a castle"], seed=6, edit="none", attention_map_prompts=[1]),
]


@pytest.fixture(scope="module")
def runners(sd_model):
    kw = dict(height=SIZE, width=SIZE, steps=STEPS, scheduler="ddim")
    return BatchRunner(sd_model, **kw), BatchRunner(sd_model, tensor_controllers=True, **kw)


@pytest.fixture(scope="module")
def host_alone(runners):
    return {spec.job_id: runners[0].run([spec])[0] for spec in JOBS}


def assert_same(result, reference):
    assert result.ok, result.error
    assert (result.latents - reference.latents).abs().max().item() <= TOL
    assert np.abs(result.pixels - reference.pixels).max() <= TOL
    assert len(result.attention_maps) == len(reference.attention_maps)
    for ours, theirs in zip(result.attention_maps, reference.attention_maps):
        assert ours.tokens == theirs.tokens
        assert np.abs(ours.maps - theirs.maps).max() <= TOL


def test_the_tensor_runner_builds_tensor_controllers(runners):
    with torch.no_grad():
        host, tensor = runners[0].prepare(JOBS[0]), runners[1].prepare(JOBS[0])
    assert isinstance(host.controller, AttentionController)
    assert isinstance(tensor.controller, TensorController)


@pytest.mark.parametrize("spec", JOBS, ids=[s.job_id for s in JOBS])
def test_each_mode_alone_equals_the_host_controller(runners, host_alone, spec):
    assert_same(runners[1].run([spec])[0], host_alone[spec.job_id])


def test_all_modes_batched_equal_the_host_controller_alone(runners, host_alone):
    for spec, result in zip(JOBS, runners[1].run(JOBS)):
        assert_same(result, host_alone[spec.job_id])


def test_the_blend_mask_is_partial_and_starts_late(runners, host_alone):
    """The blend must really blend: a partial mask, applied only from its start step (so the test means it)."""
    with torch.no_grad():
        job = runners[1].prepare(JOBS[4])
    masks, steps_changed = [], []
    from worker.editing.batch import BatchState

    with torch.no_grad(), BatchState(runners[1].model) as batch:
        batch.admit(job)
        while not job.finished:
            batch.step()
            masks.append(job.controller.blend.last_mask.clone())
    start = job.controller.blend.start_step
    assert start == int(0.4 * STEPS) > 0
    final = masks[-1]
    assert 0 < final.float().mean().item() < 1, "the mask covers nothing or everything: the blend tests nothing"


def test_no_host_reads_inside_a_step(runners, monkeypatch):
    """A captured step cannot read tensor values: ``.item()``, ``.tolist()`` and ``bool()`` on a tensor fail here
    while the tensor controllers run their UNet calls and after-step hooks."""
    from worker.editing.batch import BatchState

    with torch.no_grad():
        jobs = [runners[1].prepare(spec) for spec in JOBS]
    with torch.no_grad(), BatchState(runners[1].model) as batch:
        for job in jobs:
            batch.admit(job)
        for job in jobs:
            job.controller.begin_step(0)
        batch.step()  # first step eager: device tables and stores are allocated here

        def forbidden(*args, **kwargs):
            raise AssertionError("a host read of a tensor value inside the step")

        controller_calls = []
        for job in jobs:
            original = job.controller.on_attention

            def watched(*args, _original=original, **kwargs):
                with monkeypatch.context() as m:
                    m.setattr(torch.Tensor, "item", forbidden)
                    m.setattr(torch.Tensor, "tolist", forbidden)
                    m.setattr(torch.Tensor, "__bool__", forbidden)
                    controller_calls.append(1)
                    return _original(*args, **kwargs)

            job.controller.on_attention = watched
            original_after = job.controller.after_step

            def watched_after(latents, _original=original_after):
                with monkeypatch.context() as m:
                    m.setattr(torch.Tensor, "item", forbidden)
                    m.setattr(torch.Tensor, "tolist", forbidden)
                    m.setattr(torch.Tensor, "__bool__", forbidden)
                    return _original(latents)

            job.controller.after_step = watched_after
        report = batch.step()
    assert not report.failed, report.failed
    assert controller_calls
