"""Local blending that really blends, end to end on tiny-sd (DDIM, fp32 latents).

At the suite's usual threshold the tiny model's blend mask covers the whole latent (the blend then changes
nothing), so this runs at a threshold where the mask is partial, checks that it is, and compares with the
same job without blending: outside the mask the target IS the source, and differs from the unblended target.
"""

from __future__ import annotations

import pytest
import torch

from worker.editing import controllers
from worker.editing.jobs import LocalBlendSpec, P2PJobSpec

SIZE, STEPS = 128, 3  # latent 16×16, blend grid 4×4
THRESHOLD = 0.9  # partial on tiny-sd for this prompt and seed (asserted below)
SOURCE, TARGET, SEED = "a cat on a sofa", "a dog on a sofa", 6


@pytest.fixture(scope="module")
def blended_and_plain(runner):
    masks: list[torch.Tensor] = []
    original = controllers.LocalBlend.__call__

    def recording(self, latents, store, step):
        out = original(self, latents, store, step)
        masks.append(self.last_mask.clone())
        return out

    spec = P2PJobSpec("blend", SOURCE, [TARGET], seed=SEED,
                      local_blend=LocalBlendSpec(["cat"], [["dog"]], threshold=THRESHOLD))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(controllers.LocalBlend, "__call__", recording)
        blended = runner.run([spec])[0]
    plain = runner.run([P2PJobSpec("plain", SOURCE, [TARGET], seed=SEED)])[0]
    assert blended.ok and plain.ok, (blended.error, plain.error)
    return blended, plain, masks


def test_the_mask_is_partial_at_every_step(blended_and_plain):
    _, _, masks = blended_and_plain
    assert len(masks) == STEPS
    for mask in masks:
        assert mask.shape == (1, 1, SIZE // 8, SIZE // 8) and mask.dtype == torch.bool
        assert 0.0 < mask.float().mean().item() < 1.0


def test_outside_the_mask_the_target_is_the_source_and_not_the_unblended_target(blended_and_plain):
    blended, plain, masks = blended_and_plain
    outside = ~masks[-1][0, 0]
    source, target = blended.latents[0], blended.latents[1]
    assert torch.equal(target[:, outside], source[:, outside])
    assert (plain.latents[1][:, outside] - target[:, outside]).abs().max().item() > 1e-2
    assert (target[:, ~outside] - source[:, ~outside]).abs().max().item() > 1e-3  # inside, the edit stays


def test_blending_never_touches_the_source(blended_and_plain):
    blended, plain, _ = blended_and_plain
    assert (blended.latents[0] - plain.latents[0]).abs().max().item() <= 1e-5
