"""P2P controllers against a plain restatement of the reference's math, and the contract of their validation.

Small random attention tensors go through each controller and are compared with the Prompt-to-Prompt
reference written out directly (replace: the source through the mapper; refine: gathered source columns
mixed by alphas; reweight: the equalizer multiplied in; local blend: pooled, resized, peak-normalised,
thresholded, x_t = x_base + mask·(x_t − x_base)). Validation errors are the HTTP 400 body, so each must name
its field and say what is wrong.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from worker.editing.attention_maps import map_grid
from worker.editing.controllers import (
    AttentionController,
    AttentionStore,
    LocalBlend,
    RefineController,
    ReplaceController,
    ReweightController,
    build_controller,
)
from worker.editing.jobs import EditValidationError, LocalBlendSpec, P2PJobSpec
from worker.models.tokenizer import build_clip_tokenizer

HEADS, KEYS = 2, 77
LATENT = (16, 16)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def job(source="a cat", targets=("a dog",), **kw) -> P2PJobSpec:
    return P2PJobSpec(job_id="t", source_prompt=source, target_prompts=list(targets), seed=0, **kw)


def probs_for(prompts: int, queries: int = 16, keys: int = KEYS, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * prompts * HEADS, queries, keys, generator=g).mul(3).softmax(-1).to(dtype)


def cond_of(probs: torch.Tensor, prompts: int) -> torch.Tensor:
    return probs[probs.shape[0] // 2:].view(prompts, HEADS, *probs.shape[1:])


def run_cross(ctrl, step, probs, place="down"):
    ctrl.begin_step(step)
    return ctrl.on_attention(probs.clone(), True, place, probs.shape[1])


def alpha_table(steps: int, targets: int, value) -> torch.Tensor:
    alpha = torch.zeros(steps + 1, targets, KEYS)
    alpha[:] = torch.as_tensor(value, dtype=torch.float32)
    return alpha


# --- the edits, against the reference's formulas -----------------------------------------------------

def test_replace_with_several_targets_is_the_source_through_each_mapper_mixed_by_alpha():
    """Reference: attn_base @ mapper per target, then α·that + (1 − α)·own, α per token (here 0.25/1/0)."""
    g = torch.Generator().manual_seed(1)
    mapper = torch.rand(2, KEYS, KEYS, generator=g)
    alpha = alpha_table(4, 2, 1.0)
    alpha[2, 0, :10], alpha[2, 1, 5:] = 0.25, 0.0
    ctrl = ReplaceController(["s", "t1", "t2"], 4, mapper=mapper, cross_alpha=alpha)
    probs = probs_for(3)
    before = cond_of(probs, 3)
    for step in (0, 2):
        after = cond_of(run_cross(ctrl, step, probs), 3)
        a = alpha[step][:, None, None, :]
        edited = torch.einsum("hqw,nwk->nhqk", before[0], mapper)
        expected = edited * a + (1 - a) * before[1:]
        assert torch.allclose(after[1:], expected, atol=1e-6), step
        assert torch.equal(after[0], before[0])


def test_refine_gathers_source_columns_and_mixes_by_the_refinement_alphas():
    """Reference: attn_base[:, :, mapper].permute(2, 0, 1, 3) · alphas + own · (1 − alphas)."""
    mapper = torch.arange(KEYS).repeat(2, 1)
    mapper[0, 3], mapper[1, 4], mapper[1, 6] = 1, 2, -1  # −1: a new token, its own attention
    alphas = torch.ones(2, KEYS)
    alphas[1, 6] = 0.0
    alphas[0, 8] = 0.5
    ctrl = RefineController(["s", "t1", "t2"], 3, mapper=mapper, alphas=alphas, cross_alpha=alpha_table(3, 2, 1.0))
    probs = probs_for(3, seed=2)
    before = cond_of(probs, 3)
    after = cond_of(run_cross(ctrl, 1, probs), 3)
    gathered = torch.stack([before[0][..., m.clamp_min(0)] for m in mapper])
    a = alphas[:, None, None, :]
    assert torch.allclose(after[1:], gathered * a + before[1:] * (1 - a), atol=1e-6)
    assert torch.equal(after[1][..., 3], before[0][..., 1]) and torch.equal(after[2][..., 6], before[2][..., 6])


@pytest.mark.parametrize("base_edit", [None, "replace", "refine"])
def test_reweight_multiplies_the_equalizer_into_the_base_edit(base_edit):
    """Reference: (base edit or the source) · equalizer[:, None, None, :], per target."""
    g = torch.Generator().manual_seed(3)
    equalizer = torch.ones(2, KEYS)
    equalizer[0, 2], equalizer[1, 3] = 4.0, -2.0
    schedule = dict(cross_alpha=alpha_table(3, 2, 1.0))
    prompts = ["s", "t1", "t2"]
    mapper = torch.rand(2, KEYS, KEYS, generator=g)
    alphas = torch.ones(2, KEYS)
    alphas[:, 3] = 0.0  # a new token in both targets: its own attention
    base = {None: None, "replace": ReplaceController(prompts, 3, mapper=mapper, **schedule),
            "refine": RefineController(prompts, 3, mapper=torch.arange(KEYS).repeat(2, 1), alphas=alphas,
                                       **schedule)}[base_edit]
    ctrl = ReweightController(prompts, 3, equalizer=equalizer, base=base, **schedule)
    probs = probs_for(3, seed=4)
    before = cond_of(probs, 3)
    after = cond_of(run_cross(ctrl, 0, probs), 3)
    a = alphas[:, None, None, :]
    edited = {None: before[0].expand(2, *before[0].shape),
              "replace": torch.einsum("hqw,nwk->nhqk", before[0], mapper),
              "refine": before[0] * a + before[1:] * (1 - a)}[base_edit]
    assert torch.allclose(after[1:], edited * equalizer[:, None, None, :], atol=1e-6)


def test_steps_outside_alpha_leave_the_targets_alone():
    """α has steps + 1 rows; a controller run for more UNet calls than rows edits nothing past them."""
    ctrl = ReplaceController(["s", "t"], 6, mapper=torch.eye(KEYS)[None], cross_alpha=alpha_table(2, 1, 1.0))
    probs = probs_for(2)
    assert [ctrl.edits_cross_at(s) for s in range(6)] == [True, True, True, False, False, False]
    assert torch.equal(run_cross(ctrl, 3, probs), probs)
    assert not torch.equal(run_cross(ctrl, 2, probs), probs)


def test_the_uncond_half_and_the_source_are_never_edited(tok):
    ctrl = build_controller(job(targets=["a dog", "a cow"], cross_replace_steps=1.0, self_replace_steps=1.0),
                            tok, 4, LATENT)
    probs = probs_for(3, seed=5)
    out = run_cross(ctrl, 1, probs)
    half = probs.shape[0] // 2
    assert torch.equal(out[:half], probs[:half]) and torch.equal(cond_of(out, 3)[0], cond_of(probs, 3)[0])
    self_probs = probs_for(3, keys=16, seed=6)
    out = ctrl.on_attention(self_probs.clone(), False, "down", 16)
    assert torch.equal(out[:half], self_probs[:half])
    assert torch.equal(cond_of(out, 3)[2], cond_of(self_probs, 3)[0])


def test_attention_rows_must_split_into_prompts_and_heads(tok):
    ctrl = build_controller(job(), tok, 4, LATENT)
    ctrl.begin_step(0)
    with pytest.raises(ValueError, match="2 × 2 prompts"):
        ctrl.on_attention(torch.rand(6, 16, KEYS), True, "down", 16)


def test_edits_keep_autograd_working_on_probabilities_that_need_grad(tok):
    """Inversion-style callers backpropagate through the attention: the edit must not write into autograd's inputs."""
    ctrl = build_controller(job(cross_replace_steps=1.0, self_replace_steps=1.0), tok, 4, LATENT)
    logits = torch.randn(2 * 2 * HEADS, 16, KEYS, requires_grad=True)
    probs = logits.softmax(-1)
    out = run_cross(ctrl, 0, probs)
    out.sum().backward()
    assert logits.grad is not None
    self_logits = torch.randn(2 * 2 * HEADS, 16, 16, requires_grad=True)
    self_out = ctrl.on_attention(self_logits.softmax(-1), False, "up", 16)
    (self_out * torch.arange(16.0)).sum().backward()
    assert self_logits.grad is not None


# --- store ------------------------------------------------------------------------------------------

def test_store_sums_half_precision_maps_in_float32_and_averages_per_head():
    store = AttentionStore(2, (4, 4))
    cond = probs_for(2, dtype=torch.float16)[2 * HEADS:].view(2, HEADS, 16, KEYS)
    store.add(cond, "down")
    store.add(cond, "up")
    assert store.total.dtype == torch.float32 and store.maps_added == 2 * HEADS
    assert torch.allclose(store.average(), cond.float().mean(1), atol=1e-3)
    store.add(cond, "mid")  # the reference never reads mid
    store.add(cond[:, :, :4], "down")  # another resolution
    assert store.maps_added == 2 * HEADS
    store.reset()
    with pytest.raises(RuntimeError, match="4×4"):
        store.average()


def test_a_fresh_run_forgets_the_maps_of_both_stores(tok):
    """Blend store (4×4) and map store (16×16 at this latent) are separate; begin_step(0) clears both."""
    lb = LocalBlendSpec(["cat"], [["dog"]])
    ctrl = build_controller(job(local_blend=lb, attention_map_prompts=[0]), tok, 4, LATENT)
    assert ctrl.map_store is not ctrl.store and ctrl.map_store.grid == map_grid(LATENT) == (16, 16)
    assert ctrl.store.grid == (4, 4) and ctrl.store.num_prompts == ctrl.map_store.num_prompts == 2
    run_cross(ctrl, 0, probs_for(2))
    ctrl.on_attention(probs_for(2, queries=256), True, "up", 256)
    assert ctrl.store.maps_added == HEADS and ctrl.map_store.maps_added == HEADS
    ctrl.begin_step(0)
    assert ctrl.store.total is None and ctrl.map_store.total is None
    ctrl.reset()
    with pytest.raises(RuntimeError, match=r"\bcall begin_step\(step\) before each UNet evaluation\b"):
        ctrl.needs_probs(True, 16)


def test_one_store_serves_blend_and_maps_when_their_grids_agree(tok):
    """At a 64×64 latent the blend's latent/4 is the map grid: one store, each layer added once."""
    lb = LocalBlendSpec(["cat"], [["dog"]])
    ctrl = build_controller(job(local_blend=lb, attention_map_prompts=[1]), tok, 4, (64, 64))
    assert ctrl.map_store is ctrl.store and ctrl.store.grid == (16, 16)
    run_cross(ctrl, 0, probs_for(2, queries=256))
    assert ctrl.store.maps_added == HEADS
    assert ctrl.attention_maps(1).maps.shape == (4, 16, 16)


def test_attention_maps_refuse_a_prompt_index_outside_the_job(tok):
    ctrl = build_controller(job(edit="none", attention_map_prompts=[0, 1]), tok, 4, (4, 4))
    run_cross(ctrl, 0, probs_for(2))
    assert ctrl.attention_maps(0).prompt == "a cat" and ctrl.attention_maps(1, render=False).grid_png == b""
    for index in (-1, 2):
        with pytest.raises(IndexError, match="0..1"):
            ctrl.attention_maps(index)
    with pytest.raises(RuntimeError, match=r"\battention maps were not requested for this job\b"):
        build_controller(job(edit="none"), tok, 4, (4, 4)).attention_maps(0)


def test_a_job_without_an_edit_edits_no_layer_at_any_step(tok):
    ctrl = build_controller(job(edit="none", self_replace_steps=1.0, cross_replace_steps=1.0), tok, 4, LATENT)
    assert not any(ctrl.edits_cross_at(s) or ctrl.edits_self_at(s) for s in range(4))
    assert not any(ctrl.edits_self_layer(q) for q in (1, 16, 64))
    probs = probs_for(2, keys=16)
    ctrl.begin_step(0)
    assert torch.equal(ctrl.on_attention(probs.clone(), False, "up", 16), probs)


# --- local blend ------------------------------------------------------------------------------------

def reference_mask(maps, columns, grid, latent, threshold, pool=True):
    """The reference's LocalBlend mask for given word columns (prompts, tokens)."""
    word = (maps * columns[:, None, :]).sum(-1).view(maps.shape[0], 1, *grid)
    if pool:
        word = F.max_pool2d(word, (3, 3), (1, 1), padding=(1, 1))
    word = F.interpolate(word, size=latent)
    word = word / word.amax(dim=(2, 3), keepdim=True)
    return word > threshold


def test_local_blend_equals_the_reference_mask_and_update():
    g = torch.Generator().manual_seed(7)
    grid, latent = (3, 5), (12, 20)
    maps = torch.rand(3, 15, KEYS, generator=g) ** 4
    columns = torch.zeros(3, KEYS)
    columns[0, 2], columns[1, 3], columns[1, 4], columns[2, 5] = 1.0, 1.0, 1.0, 1.0
    substruct = torch.zeros(KEYS)
    substruct[6] = 1.0
    blend = LocalBlend(columns, latent, grid, threshold=0.45, start_step=1, substruct_columns=substruct)
    store = AttentionStore(3, grid)
    store.total, store.maps_added = maps, 1
    x = torch.randn(3, 4, *latent, generator=g)
    assert blend(x, store, step=0) is x
    with pytest.raises(RuntimeError, match=r"maps at 3×5: is latent_size the sampler's latent size, and were the processors installed\?$"):
        blend(x, AttentionStore(3, grid), step=1)
    out = blend(x, store, step=1)
    regions = reference_mask(maps, columns, grid, latent, 0.45)
    excluded = reference_mask(maps[:1], substruct[None], grid, latent, 0.45, pool=False)
    mask = (regions[1:] | regions[:1]) & ~excluded
    assert 0 < mask.float().mean() < 1
    assert torch.equal(blend.last_mask, mask)
    expected = x[:1] + mask * (x[1:] - x[:1])
    assert torch.equal(out[0], x[0]) and torch.allclose(out[1:], expected, atol=1e-6)


def test_after_step_checks_the_latent_batch_and_passes_through_without_a_blend(tok):
    plain = build_controller(job(), tok, 4, LATENT)
    x = torch.randn(2, 4, *LATENT)
    plain.begin_step(0)
    assert plain.after_step(x) is x
    blended = build_controller(job(local_blend=LocalBlendSpec(["cat"], [["dog"]], start_blend=0.5)), tok, 4, LATENT)
    run_cross(blended, 1, probs_for(2))
    with pytest.raises(ValueError, match="2 prompts"):
        blended.after_step(torch.randn(3, 4, *LATENT))
    assert blended.after_step(x) is x  # step 1 < int(0.5 · 4): not blending yet
    with pytest.raises(ValueError, match=r"\ba local blend needs an attention store\b"):
        AttentionController(["a", "b"], 4, blend=blended.blend)


def test_build_controller_passes_the_blend_settings_through(tok):
    lb = LocalBlendSpec(["cat"], [["dog"]], threshold=0.65, start_blend=0.5, substruct_words=["sofa"])
    ctrl = build_controller(job("a cat on a sofa", ["a dog on a sofa"], local_blend=lb), tok, 10, (20, 12),
                            schedule_steps=6)
    blend = ctrl.blend
    assert blend.threshold == 0.65 and blend.start_step == 3  # int(0.5 · schedule_steps)
    assert blend.latent_size == (20, 12) and blend.grid == (5, 3) and ctrl.store.grid == (5, 3)
    assert blend.substruct_columns.nonzero().flatten().tolist() == [5]
    assert blend.word_columns.nonzero().tolist() == [[0, 2], [1, 2]]


def test_schedule_steps_set_the_windows_and_num_steps_the_calls(tok):
    """PNDM: 5 steps make 6 UNet calls; α keeps its int(f·(T + 1)) rows, the self window int(f·T)."""
    ctrl = build_controller(job(cross_replace_steps=0.5, self_replace_steps=0.5), tok, 6, LATENT, schedule_steps=5)
    assert ctrl.num_steps == 6 and ctrl.cross_alpha.shape[0] == 6
    assert [ctrl.edits_cross_at(s) for s in range(6)] == [True, True, True, False, False, False]
    assert [ctrl.edits_self_at(s) for s in range(6)] == [True, True, False, False, False, False]
    one = build_controller(job(), tok, 1, LATENT)
    one.begin_step(0)
    with pytest.raises(ValueError, match=r"^num_steps must be at least 1$"):
        build_controller(job(), tok, 0, LATENT)
    with pytest.raises(ValueError, match=r"^schedule_steps must be at least 1$"):
        build_controller(job(), tok, 4, LATENT, schedule_steps=0)
    build_controller(job(), tok, 4, LATENT, schedule_steps=1)


@pytest.mark.parametrize("layers,latent,expected", [("low", (20, 12), 15), ("medium", (20, 12), 60),
                                                     ("low", (9, 13), 6)])
def test_self_layers_are_counted_per_axis(tok, layers, latent, expected):
    ctrl = build_controller(job(self_replace_layers=layers, self_replace_steps=1.0), tok, 4, latent)
    ctrl.begin_step(0)
    assert ctrl.needs_probs(False, expected) and not ctrl.needs_probs(False, expected + 1)


# --- validation: the field and the reason -----------------------------------------------------------

@pytest.mark.parametrize("kw, field, says", [
    ({"targets": []}, "target_prompts", r"^give at least one target prompt$"),
    ({"edit": "swap"}, "edit", r"^unknown edit 'swap'$"),
    ({"attention_map_prompts": [2]}, "attention_maps", r"^prompt index 2 outside 0\.\.1$"),
    ({"attention_map_prompts": [-1]}, "attention_maps", r"^prompt index -1 outside 0\.\.1$"),
    ({"self_replace_layers": "high"}, "self_replace_layers", r"^expected 'low' or 'medium', got 'high'$"),
    ({"edit": "none", "reweight": [{"dog": 2.0}]}, "reweight",
     r"^edit 'none' injects nothing to reweight; use edit 'reweight'$"),
    ({"edit": "reweight"}, "reweight", r"^edit 'reweight' needs at least one word and factor$"),
    ({"edit": "reweight", "reweight": [{}]}, "reweight", r"^edit 'reweight' needs at least one word"),
    ({"edit": "reweight", "reweight": ["dog"]}, "reweight", r"^expected word → factor mappings, got 'dog'$"),
    ({"edit": "reweight", "reweight": [{"dog": float("inf")}]}, "reweight", r"^factor for 'dog' must be a finite"),
    ({"edit": "reweight", "reweight": [{"dog": True}]}, "reweight", r"'dog' must be a finite number, got True$"),
    ({"edit": "reweight", "reweight": [{"dog": "2"}]}, "reweight", r"'dog' must be a finite number, got '2'$"),
    ({"edit": "reweight", "reweight": [{"dog": 10.5}]}, "reweight",
     r"^factor 10\.5 for 'dog' is outside \[-10\.0, 10\.0\]$"),
    ({"edit": "reweight", "reweight": [{"dog": -10.5}]}, "reweight", r"outside \[-10\.0, 10\.0\]$"),
    ({"edit": "reweight", "reweight": [{"dog": 2.0}] * 2}, "reweight",
     r"^needs one entry per target prompt \(1\), got 2$"),
    ({"local_blend": LocalBlendSpec([], [["dog"]])}, "local_blend.source_words", r"^give at least one source word$"),
    ({"local_blend": LocalBlendSpec(["cat"], [["dog"], ["dog"]])}, "local_blend.target_words",
     r"^needs one list per target prompt \(1\), got 2$"),
    ({"local_blend": LocalBlendSpec(["cat"], [["dog"]], threshold=1.0)}, "local_blend.threshold",
     r"^threshold 1\.0 must be in \(0, 1\)$"),
    ({"local_blend": LocalBlendSpec(["cat"], [["dog"]], threshold=0.0)}, "local_blend.threshold", r"\(0, 1\)$"),
    ({"local_blend": LocalBlendSpec(["cat"], [["dog"]], start_blend=1.5)}, "local_blend.start_blend", r"1\.5"),
])
def test_validation_names_the_field_and_the_reason(tok, kw, field, says):
    kw = dict(kw)
    targets = kw.pop("targets", ["a dog"])
    with pytest.raises(EditValidationError) as err:
        build_controller(job("a cat", targets, **kw), tok, 10, LATENT)
    assert err.value.field == field and re.search(says, err.value.message), err.value.message


def test_prompt_length_errors_name_the_prompt_field(tok):
    long = " ".join(["cat"] * 76)
    for source, targets, field in [(long, ["a dog"], "source_prompt"), ("a cat", ["a dog", long], "target_prompts")]:
        with pytest.raises(EditValidationError) as err:
            build_controller(job(source, targets, edit="refine"), tok, 10, LATENT)
        assert err.value.field == field and "78 tokens" in err.value.message


def test_reweight_accepts_the_range_ends_and_skips_targets_without_a_mapping(tok):
    spec = job("a red car", ["a red car", "a blue car", "a red car"], edit="reweight",
               reweight=[None, {"blue": -10.0}, {"red": 10, "car": 0}])
    ctrl = build_controller(spec, tok, 10, LATENT)
    assert ctrl.equalizer.shape == (3, KEYS)
    assert ctrl.equalizer[:, 1:5].tolist() == [[1.0, 1.0, 1.0, 1.0], [1.0, -10.0, 1.0, 1.0],
                                              [1.0, 10.0, 0.0, 1.0]]
    assert ctrl.equalizer[:, 5:].eq(1).all()


@pytest.mark.parametrize("threshold", [0.01, 0.99])
def test_blend_thresholds_inside_the_open_interval_are_accepted(tok, threshold):
    lb = LocalBlendSpec(["cat"], [["dog"]], threshold=threshold)
    assert build_controller(job(local_blend=lb), tok, 4, LATENT).blend.threshold == threshold


@pytest.mark.parametrize("edit,cls", [("replace", ReplaceController), ("refine", RefineController)])
def test_reweight_on_an_edit_keeps_that_edit_as_its_base(tok, edit, cls):
    spec = job("a cat", ["a big cat"] if edit == "refine" else ["a dog"], edit=edit,
               reweight=[{"cat" if edit == "refine" else "dog": 3.0}], cross_replace_steps=0.5)
    ctrl = build_controller(spec, tok, 6, LATENT)
    assert isinstance(ctrl, ReweightController) and type(ctrl.base) is cls
    assert ctrl.num_steps == 6 and ctrl.prompts == spec.prompts and ctrl.cross_alpha.shape == (7, 1, KEYS)
    assert ctrl.base.num_steps == 6 and ctrl.base.prompts == spec.prompts


@pytest.mark.parametrize("edit", ["replace", "refine", "reweight"])
def test_half_precision_maps_are_edited_like_float32_ones(tok, edit):
    """GPU jobs run in fp16: the float32 mappers, alphas and equalizers must follow the maps' dtype."""
    targets = {"replace": ["a dog", "a cow"], "refine": ["a big cat", "a cat"], "reweight": ["a cat", "a cat"]}[edit]
    spec = job("a cat", targets, edit=edit, cross_replace_steps=(0.0, 0.4),
               reweight=[{"cat": 2.0}, {"cat": 0.5}] if edit == "reweight" else None)
    ctrl = build_controller(spec, tok, 4, LATENT)
    probs = probs_for(3, seed=8)
    for step in (0, 2):
        full = run_cross(ctrl, step, probs)
        half = run_cross(ctrl, step, probs.half())
        assert half.dtype == torch.float16 and torch.allclose(half.float(), full, atol=2e-3), step


def test_a_job_reading_blend_and_shown_maps_needs_probabilities_at_both_grids_only(tok):
    spec = job(edit="none", attention_map_prompts=[0], local_blend=LocalBlendSpec(["cat"], [["dog"]]))
    ctrl = build_controller(spec, tok, 4, LATENT)
    ctrl.begin_step(0)
    assert [q for q in (16, 64, 256) if ctrl.needs_probs(True, q)] == [16, 256]
    assert not ctrl.needs_probs(False, 16)


@pytest.mark.parametrize("edit", ["replace", "refine", "reweight"])
def test_constant_tensors_follow_the_device_of_the_maps(tok, edit):
    """Mappers, alphas, equalizers and blend columns are moved to where the attention runs (meta: no GPU needed)."""
    targets = {"replace": ["a dog"], "refine": ["a big cat"], "reweight": ["a cat"]}[edit]
    spec = job("a cat", targets, edit=edit, cross_replace_steps=(0.0, 0.4), self_replace_steps=0.5,
               reweight=[{"cat": 2.0}] if edit == "reweight" else None,
               local_blend=LocalBlendSpec(["cat"], [["cat" if edit != "replace" else "dog"]],
                                          substruct_words=["a"]))
    ctrl = build_controller(spec, tok, 4, LATENT)
    meta = torch.device("meta")
    for step in (0, 2):
        ctrl.begin_step(step)
        for is_cross, keys in ((True, KEYS), (False, 16)):
            out = ctrl.on_attention(torch.empty(8, 16, keys, device=meta), is_cross, "down", 16)
            assert out.device == meta and out.shape == (8, 16, keys)
        latents = ctrl.after_step(torch.empty(2, 4, *LATENT, device=meta))
        assert latents.device == meta and ctrl.blend.last_mask.device == meta


def test_attention_maps_carry_the_prompt_index_they_were_asked_for(tok):
    """The index keys the stored maps and picks the overlay's prompt: it must be the one asked for."""
    ctrl = build_controller(job(edit="none", attention_map_prompts=[0, 1]), tok, 4, (4, 4))
    run_cross(ctrl, 0, probs_for(2))
    assert [ctrl.attention_maps(i, render=False).prompt_index for i in (0, 1)] == [0, 1]


def test_a_non_square_store_wants_height_times_width_queries():
    """A 3×5 grid has 15 queries; taking w² (or h²) would store nothing for a non-square job."""
    store = AttentionStore(2, (3, 5))
    assert store.wants(15) and not store.wants(25) and not store.wants(9)


@pytest.mark.parametrize("shape", [(5, 2, 77), (5, 77), (5, 1, 1, 77)])
def test_an_edit_controller_refuses_an_alpha_of_the_wrong_shape(shape):
    """α must be (steps + 1, targets, tokens): a wrong target count would broadcast silently."""
    with pytest.raises(ValueError, match=r"^cross_alpha must be \(steps, 1 targets, tokens\)$"):
        ReplaceController(["a cat", "a dog"], 4, mapper=torch.eye(77)[None], cross_alpha=torch.ones(shape))
