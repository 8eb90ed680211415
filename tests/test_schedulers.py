"""Every listed scheduler runs P2P and IP2P on the tiny models (issue 13); P2P batched equals P2P alone
(<= 1e-4 on fp32 latents), and the job's step count is the scheduler's UNet-call count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from editserve.contract import SCHEDULERS
from worker.editing.batch import BatchRunner
from worker.editing.jobs import IP2PCell, IP2PJobSpec, P2PJobSpec

SIZE, STEPS, TOL = 128, 4, 1e-4
EXPECTED_CALLS = {"pndm": STEPS + 1}  # PLMS warm-up: one extra UNet call; the rest one call per step


@pytest.fixture(scope="module")
def ip2p_model(tiny_models):
    from service.config import Settings
    from worker.models.registry import ModelRegistry

    return ModelRegistry(Settings(models_dir=tiny_models["tiny-ip2p"].parent)).get("tiny-ip2p")


def test_the_contract_lists_every_sampler_people_expect():
    assert set(SCHEDULERS) >= {"ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc"}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_p2p_runs_and_batches_exactly(sd_model, scheduler):
    runner = BatchRunner(sd_model, height=SIZE, width=SIZE, steps=STEPS, scheduler=scheduler)
    swap = P2PJobSpec("swap", "a cat riding a bicycle", ["a dog riding a bicycle"], seed=1,
                      self_replace_steps=0.5)
    other = P2PJobSpec("other", "a house by a lake", ["a castle by a lake"], seed=2, negative_prompt="blurry")
    steps_seen: list[tuple[str, int, int]] = []
    alone = runner.run([swap])[0]
    batched = runner.run([swap, other], on_step=lambda job, step, total: steps_seen.append((job, step, total)))
    assert alone.ok and all(r.ok for r in batched), [r.error for r in batched]
    assert torch.isfinite(alone.latents).all()
    assert (batched[0].latents - alone.latents).abs().max().item() <= TOL
    assert np.abs(batched[0].pixels - alone.pixels).max() <= TOL
    calls = EXPECTED_CALLS.get(scheduler, STEPS)
    assert [s for j, s, _ in steps_seen if j == "swap"] == list(range(1, calls + 1))
    assert (alone.latents[0] - alone.latents[1]).abs().max().item() > 1e-3  # the edit shows


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_ip2p_runs_with_every_scheduler(ip2p_model, scheduler):
    runner = BatchRunner(ip2p_model, height=SIZE, width=SIZE, steps=STEPS, scheduler=scheduler)
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    result = runner.run([IP2PJobSpec("edit", image, "make it snow", [IP2PCell(7.5, 1.5, 3)])])[0]
    assert result.ok, result.error
    assert torch.isfinite(result.latents).all() and result.images[0].size == (SIZE, SIZE)
