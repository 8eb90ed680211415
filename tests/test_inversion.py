"""Real-photo inversion (DDIM, null-text, negative-prompt) on the well-conditioned tiny model, fp32.

Why ``tiny-sd-smooth``: on the plain random tiny-sd a DDIM round trip misses the photo by more than its
own variance and rounding differences grow ~10x per step, so no inversion property can be asserted there.
The smooth build (``worker.models.builders._smooth_prediction``) is measured here first (round trip error
against the photo latent's variance). Errors are MSE on fp32 latents, never on 8-bit images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from worker.editing.batch import BatchRunner
from worker.editing.inversion import (
    InversionRunner,
    InversionSpec,
    early_stop_threshold,
    invert,
)
from worker.editing.jobs import EditValidationError, LocalBlendSpec, P2PJobSpec

SIZE, STEPS, TOL = 64, 6, 1e-4
CAPTION = "a photo of an astronaut"
ROUND_TRIP_TOLERANCE = 1e-2  # DDIM at guidance 1: reconstruction MSE <= this fraction of the photo latent's variance


@pytest.fixture(scope="module")
def smooth_model(tiny_models):
    """One torch thread (2 shared cores; "batched equals alone" also needs the same thread count)."""
    from service.config import Settings
    from worker.models.registry import ModelRegistry

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ModelRegistry(Settings(models_dir=tiny_models["tiny-sd"].parent)).get("tiny-sd-smooth")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photo():
    """A public-domain photo shipped with scikit-image (NASA), as a user would upload it."""
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="module")
def inverter(smooth_model):
    return InversionRunner(smooth_model, height=SIZE, width=SIZE, steps=STEPS)


@pytest.fixture(scope="module")
def inverted(inverter, photo):
    """Each method alone on the photo (ddim at guidance 1 and 7.5)."""
    specs = {
        "ddim-1": InversionSpec("ddim-1", CAPTION, image=photo, method="ddim", guidance_scale=1.0),
        "ddim": InversionSpec("ddim", CAPTION, image=photo, method="ddim"),
        "negative-prompt": InversionSpec("negative-prompt", CAPTION, image=photo, method="negative-prompt"),
        "null-text": InversionSpec("null-text", CAPTION, image=photo, method="null-text"),
    }
    out = {name: inverter.run([spec])[0] for name, spec in specs.items()}
    for result in out.values():
        assert result.ok, result.error
    return out


def photo_variance(result) -> float:
    return float(result.trajectory[0].var().item())


def test_ddim_round_trip_at_guidance_1_on_the_smooth_model(inverted):
    """The conditioning measure: a guidance-1 round trip lands within 1% of the latent's variance."""
    result = inverted["ddim-1"]
    assert result.trajectory.shape == (STEPS + 1, 1, 4, SIZE // 8, SIZE // 8)
    assert result.reconstruction_error <= ROUND_TRIP_TOLERANCE * photo_variance(result)
    assert result.inversion.uncond_embeddings.shape[0] == STEPS


def test_the_plain_tiny_model_is_not_well_conditioned(sd_model, photo):
    """Why the smooth build exists: the same round trip on tiny-sd misses by far more than the tolerance."""
    result = invert(sd_model, InversionSpec("plain", CAPTION, image=photo, method="ddim", guidance_scale=1.0),
                    height=SIZE, width=SIZE, steps=STEPS)
    assert result.reconstruction_error > 10 * ROUND_TRIP_TOLERANCE * photo_variance(result)


def test_null_text_repairs_what_guidance_7_5_breaks(inverted):
    """At guidance 7.5 plain DDIM drifts from the photo; null-text brings the error back near the guidance-1
    round trip (the floor the walk itself sets). Errors are printed for the record (bench/ has them too)."""
    floor = inverted["ddim-1"].reconstruction_error
    ddim, null_text = inverted["ddim"].reconstruction_error, inverted["null-text"].reconstruction_error
    print(f"reconstruction MSE: guidance-1 round trip {floor:.3g}; at 7.5: ddim {ddim:.3g}, null-text {null_text:.3g}")
    assert ddim > 2 * floor
    assert null_text < 0.6 * ddim
    assert null_text < 1.5 * floor


def test_negative_prompt_reconstruction_equals_the_guidance_1_one(inverted):
    """eps_u = eps_c when the caption is the unconditional text, so guidance 7.5 samples as guidance 1."""
    negative, guided_1 = inverted["negative-prompt"], inverted["ddim-1"]
    assert torch.equal(negative.trajectory, guided_1.trajectory)  # same walk
    assert (negative.reconstruction_latents - guided_1.reconstruction_latents).abs().max().item() <= 1e-5
    emb = negative.inversion.uncond_embeddings
    assert torch.equal(emb[0], emb[-1]) and negative.losses == []


def test_null_text_runs_the_reference_inner_loop(inverted):
    """Per step: at most num_inner_steps iterations; a step stops early only once its loss is under
    ε + i·2e-5; the embedding actually moved from ""; each step's loss never rises over its inner iterations."""
    result = inverted["null-text"]
    assert len(result.losses) == STEPS
    for i, losses in enumerate(result.losses):
        assert 1 <= len(losses) <= 10
        threshold = early_stop_threshold(1e-5, i)
        assert all(loss >= threshold for loss in losses[:-1])
        if len(losses) < 10:
            assert losses[-1] < threshold
        # the loss never rises over a step's inner iterations (on this well-conditioned model; fp32 rounding of
        # the loss itself is ~1e-10 here, the Adam decreases 1e-7 and up)
        assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(losses, losses[1:])), (i, losses)
    emb = result.inversion.uncond_embeddings
    assert not torch.equal(emb[0], emb[-1])


def test_early_stop_fires_at_its_threshold(inverter, photo, inverted):
    """ε just above the first loss: step 0 stops after one iteration; every step whose first loss is under
    ε + i·2e-5 stops there, and the others run on; the rows spent follow the iterations run."""
    first = inverted["null-text"].losses[0][0]
    epsilon = first * 1.01
    result = inverter.run([InversionSpec("stop", CAPTION, image=photo, early_stop_epsilon=epsilon)])[0]
    assert result.ok, result.error
    assert result.losses[0] == [pytest.approx(first, rel=1e-6)]
    for i, losses in enumerate(result.losses):
        under = [k for k, loss in enumerate(losses) if loss < early_stop_threshold(epsilon, i)]
        assert under == ([len(losses) - 1] if len(losses) < 10 or under else [])
    iterations = sum(len(losses) for losses in result.losses)
    # walk + per step (cond + advance) + 2 per fwd/bwd iteration + reconstruction (2 rows per step)
    assert result.unet_rows == STEPS + 2 * STEPS + 2 * iterations + 2 * STEPS
    assert iterations < sum(len(losses) for losses in inverted["null-text"].losses)


def test_batched_inversion_of_four_jobs_equals_each_alone(inverter, photo, inverted):
    other = Image.fromarray(np.asarray(photo)[::-1].copy())
    specs = [
        InversionSpec("null-text", CAPTION, image=photo, method="null-text"),
        InversionSpec("flipped", "an upside down astronaut", image=other, method="null-text"),
        InversionSpec("negative-prompt", CAPTION, image=photo, method="negative-prompt"),
        InversionSpec("ddim", CAPTION, image=photo, method="ddim"),
    ]
    batched = inverter.run(specs)
    flipped_alone = inverter.run([specs[1]])[0]
    for spec, result in zip(specs, batched):
        alone = flipped_alone if spec.job_id == "flipped" else inverted[spec.job_id]
        assert result.ok, result.error
        assert (result.trajectory - alone.trajectory).abs().max().item() <= TOL  # the shared DDIM walk
        assert len(result.losses) == len(alone.losses) == (STEPS if spec.method == "null-text" else 0)
        # embeddings (values ~1) after up to 60 Adam steps: Adam divides by each coordinate's gradient size,
        # so ulp-level gradient differences show up a little larger here than on the latents
        assert (result.inversion.uncond_embeddings - alone.inversion.uncond_embeddings).abs().max().item() <= 1e-3
        assert (result.reconstruction_latents - alone.reconstruction_latents).abs().max().item() <= TOL


def test_progress_counts_steps_and_inner_iterations_and_cancel_stops_one_job(inverter, photo, inverted):
    seen = []

    def on_progress(p):
        seen.append(p)
        return p.job_id == "cancel-me" and p.phase == "null-text" and p.step == 2

    specs = [InversionSpec("cancel-me", CAPTION, image=photo), InversionSpec("null-text", CAPTION, image=photo)]
    canceled, kept = inverter.run(specs, on_progress=on_progress)
    assert canceled.canceled and not canceled.ok and kept.ok
    assert (kept.inversion.x_t - inverted["null-text"].inversion.x_t).abs().max().item() <= TOL
    assert len(kept.losses) == STEPS
    mine = [p for p in seen if p.job_id == "null-text"]
    assert [p.step for p in mine if p.phase == "ddim"] == list(range(1, STEPS + 1))
    assert [p.step for p in mine if p.phase == "null-text"] == list(range(1, STEPS + 1))
    assert mine[-1].done <= mine[-1].total == STEPS * 11
    assert [p.inner for p in mine if p.phase == "null-text"] == [len(x) for x in kept.losses]


@pytest.mark.parametrize("field, kwargs", [
    ("method", {"method": "textual"}),
    ("guidance_scale", {"guidance_scale": float("nan")}),
    ("num_inner_steps", {"num_inner_steps": 0}),
    ("early_stop_epsilon", {"early_stop_epsilon": -1.0}),
])
def test_bad_knobs_fail_their_own_job_naming_the_field(inverter, photo, field, kwargs):
    result = inverter.run([InversionSpec("bad", CAPTION, image=photo, **kwargs)])[0]
    assert isinstance(result.error, EditValidationError) and result.error.field == field


# ---------------------------------------------------------------------------------------------------
# Editing from an inversion


def p2p_runner(model):
    return BatchRunner(model, height=SIZE, width=SIZE, steps=STEPS, scheduler="ddim")


def test_edit_source_branch_reconstructs_the_photo_as_the_inversion_does(smooth_model, inverted):
    """The edit's source branch (P2P attention processors, 4 rows) samples what ``reconstruct`` (2 rows,
    diffusers' processor) does, up to rounding that sampling from x_T amplifies (~√(ā_0/ā_T))."""
    inversion = inverted["ddim"].inversion
    spec = P2PJobSpec("edit", CAPTION, ["a photo of an astronaut cat"], seed=0, edit="none", inversion=inversion)
    result = p2p_runner(smooth_model).run([spec])[0]
    assert result.ok, result.error
    assert result.params["guidance_scale"] == inversion.guidance_scale
    source = result.latents[:1]
    assert (source - inverted["ddim"].reconstruction_latents).abs().max().item() <= 1e-3
    assert (result.latents[1:] - source).abs().max().item() > TOL  # the target is an edit


EDITS = [
    dict(target_prompts=["a photo of an cosmonaut"], edit="replace"),
    dict(target_prompts=["a photo of an astronaut riding a horse"], edit="refine", attention_map_prompts=[0, 1]),
    dict(target_prompts=["a photo of an astronaut"], edit="reweight", reweight=[{"astronaut": 3.0}]),
    dict(target_prompts=["a photo of an cosmonaut", "a photo of an pilot"], edit="replace",
         local_blend=LocalBlendSpec(["astronaut"], [["cosmonaut"], ["pilot"]])),
]


def test_edits_from_inversions_batch_with_plain_edits_and_equal_each_alone(smooth_model, inverted):
    """Every P2P mode from an inversion; two inversions and one generated edit share one batch (x_T and
    per-step unconditional rows are per-job inputs)."""
    runner = p2p_runner(smooth_model)
    specs = [P2PJobSpec(f"inv-{i}", CAPTION, seed=0,
                        inversion=inverted["negative-prompt" if i % 2 else "ddim"].inversion,
                        **edit) for i, edit in enumerate(EDITS)]
    specs.append(P2PJobSpec("generated", "a cat", ["a dog"], seed=5))
    batched = runner.run(specs)
    for spec, result in zip(specs, batched):
        alone = runner.run([spec])[0]
        assert result.ok, result.error
        assert (result.latents - alone.latents).abs().max().item() <= TOL
        assert np.abs(result.pixels - alone.pixels).max() <= TOL
    assert len(batched[1].attention_maps) == 2


def test_an_inversion_for_other_steps_or_size_is_refused(smooth_model, inverted):
    spec = P2PJobSpec("wrong", CAPTION, ["a dog"], seed=0, inversion=inverted["ddim"].inversion)
    other = BatchRunner(smooth_model, height=SIZE, width=SIZE, steps=STEPS + 1, scheduler="ddim").run([spec])[0]
    assert isinstance(other.error, EditValidationError) and other.error.field == "steps"
