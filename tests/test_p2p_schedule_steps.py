"""Injection windows are fractions of the requested steps T, whatever number of UNet calls the scheduler makes.

PNDM makes T + 1 calls for T steps; the reference's α already has T + 1 rows with bounds int(f·(T + 1)), so
cross 0.8 at 50 steps injects 40 calls under PNDM and DDIM alike (counting the extra call again gave 41).
"""

from __future__ import annotations

import pytest
import torch

from worker.editing.base import SamplingContext
from worker.editing.controllers import EditController
from worker.editing.jobs import LocalBlendSpec, P2PJobSpec
from worker.editing.p2p import P2PJobState

SIZE = 64


def state(sd_model, scheduler: str, steps: int, **spec) -> P2PJobState:
    ctx = SamplingContext(sd_model, SIZE, SIZE, steps, scheduler)
    job = P2PJobSpec("j", "a cat riding a bicycle", ["a dog riding a bicycle"], seed=1, **spec)
    with torch.no_grad():
        return P2PJobState.create(job, ctx)


def window_counts(job: P2PJobState) -> tuple[int, int]:
    ctrl = job.controller
    calls = range(job.total_steps)
    return sum(ctrl.edits_cross_at(i) for i in calls), sum(ctrl.edits_self_at(i) for i in calls)


def test_pndm_makes_one_more_unet_call_than_steps(sd_model):
    assert state(sd_model, "pndm", 50).total_steps == 51
    assert state(sd_model, "ddim", 50).total_steps == 50


@pytest.mark.parametrize("scheduler", ["pndm", "ddim"])
def test_cross_08_at_50_steps_injects_40_calls_and_self_04_20(sd_model, scheduler):
    """The reference's V3/V4 figures: cross 0.8 → rows 0–39, self 0.4 → steps 0–19."""
    job = state(sd_model, scheduler, 50, cross_replace_steps=0.8, self_replace_steps=0.4)
    assert window_counts(job) == (40, 20)


def test_windows_where_steps_and_calls_round_differently(sd_model):
    """T = 10 under PNDM (11 calls): int(0.95·11) = 10 cross calls (not int(0.95·12) = 11), self int(0.95·10) = 9
    (not int(0.95·11) = 10), and the blend starts at int(0.19·10) = 1 (not int(0.19·11) = 2)."""
    job = state(sd_model, "pndm", 10, cross_replace_steps=0.95, self_replace_steps=0.95,
                local_blend=LocalBlendSpec(["cat"], [["dog"]], start_blend=0.19))
    assert job.total_steps == 11
    assert window_counts(job) == (10, 9)
    assert job.controller.blend.start_step == 1


def test_a_pndm_run_edits_cross_attention_in_exactly_its_window(sd_model, monkeypatch):
    """Counted where it happens: the UNet calls in which the controller actually rewrote cross maps
    (T = 10 under PNDM, cross 0.95: calls 0–9 of 11; counting PNDM's extra call again gave 0–10)."""
    from worker.editing.batch import BatchRunner

    edited_steps: set[int] = set()
    original = EditController.edit_cross

    def counting(self, cond):
        edited_steps.add(self.step)
        return original(self, cond)

    monkeypatch.setattr(EditController, "edit_cross", counting)
    runner = BatchRunner(sd_model, height=SIZE, width=SIZE, steps=10, scheduler="pndm")
    job = P2PJobSpec("j", "a cat riding a bicycle", ["a dog riding a bicycle"], seed=1, cross_replace_steps=0.95)
    result = runner.run([job])[0]
    assert result.ok, result.error
    assert sorted(edited_steps) == list(range(10))
