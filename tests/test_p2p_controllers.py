"""P2P controllers on synthetic attention tensors: edits, schedules, store, local blend, validation."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from worker.editing.attention_maps import render_token_grid
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

SQUIRREL = "A painting of a squirrel eating a burger"
LION = "A painting of a lion eating a burger"
LATENT = (16, 16)  # tiny-sd: store/blend grid 4×4 = 16 queries, "low" self layers ≤ 16, "medium" ≤ 64
MAPS_LATENT = (4, 4)  # attention maps are shown at attention_maps.map_grid: the latent itself below 16 cells
HEADS = 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def job(source, targets, **kw) -> P2PJobSpec:
    return P2PJobSpec(job_id="t", source_prompt=source, target_prompts=list(targets), seed=0, **kw)


def random_probs(prompts: int, queries: int = 16, keys: int = 77, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * prompts * HEADS, queries, keys, generator=g).mul(3).softmax(-1)


def cond(probs: torch.Tensor, prompts: int) -> torch.Tensor:
    return probs[probs.shape[0] // 2 :].view(prompts, HEADS, *probs.shape[1:])


def edit_cross(ctrl, step: int, probs: torch.Tensor, place: str = "down") -> torch.Tensor:
    ctrl.begin_step(step)
    return ctrl.on_attention(probs.clone(), True, place, probs.shape[1])


# --- edits ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit", ["replace", "refine"])
def test_identical_prompts_give_source_maps(tok, edit):
    ctrl = build_controller(job(SQUIRREL, [SQUIRREL, SQUIRREL], edit=edit, cross_replace_steps=1.0,
                                self_replace_steps=1.0), tok, 10, LATENT)
    probs = random_probs(3)
    out = edit_cross(ctrl, 4, probs)
    c, c0 = cond(out, 3), cond(probs, 3)
    assert torch.equal(c[1], c0[0]) and torch.equal(c[2], c0[0]) and torch.equal(c[0], c0[0])
    assert torch.equal(out[: out.shape[0] // 2], probs[: probs.shape[0] // 2])  # uncond half untouched
    self_probs = random_probs(3, queries=16, keys=16, seed=1)
    out = ctrl.on_attention(self_probs.clone(), False, "up", 16)
    assert torch.equal(cond(out, 3)[1], cond(self_probs, 3)[0])
    big_self = random_probs(3, queries=64, keys=64, seed=2)  # above the "low" threshold: untouched
    assert torch.equal(ctrl.on_attention(big_self.clone(), False, "up", 64), big_self)


def test_replace_one_to_two_tokens_gets_half_of_the_source_column(tok):
    ctrl = build_controller(job("a burger", ["a lasagne"], cross_replace_steps=1.0), tok, 10, LATENT)
    probs = random_probs(2)
    c, c0 = cond(edit_cross(ctrl, 0, probs), 2), cond(probs, 2)
    assert torch.allclose(c[1][..., 2], 0.5 * c0[0][..., 2]) and torch.allclose(c[1][..., 3], 0.5 * c0[0][..., 2])
    assert torch.equal(c[1][..., 4], c0[0][..., 3])  # target end token ← source end token
    assert torch.equal(c[1][..., :2], c0[0][..., :2])


def test_refine_copies_aligned_columns_and_keeps_new_tokens_own(tok):
    ctrl = build_controller(job("a cat", ["a fluffy cat"], edit="refine", cross_replace_steps=1.0), tok, 10, LATENT)
    assert isinstance(ctrl, RefineController)
    probs = random_probs(2)
    c, c0 = cond(edit_cross(ctrl, 0, probs), 2), cond(probs, 2)
    for n, m in [(0, 0), (1, 1), (3, 2), (4, 3), (5, 5), (76, 76)]:
        assert torch.equal(c[1][..., n], c0[0][..., m])
    assert torch.equal(c[1][..., 2], c0[1][..., 2])  # "fluffy" keeps its own attention


def test_reweight_scales_chosen_tokens_of_the_source_inside_the_window(tok):
    prompt = "a smiling bunny doll"
    spec = job(prompt, [prompt], edit="reweight", reweight=[{"smiling": 5.0, "doll": -1.0, "bunny": 0.0}],
               cross_replace_steps=0.5)
    ctrl = build_controller(spec, tok, 10, LATENT)
    assert isinstance(ctrl, ReweightController) and ctrl.base is None
    probs = random_probs(2)
    c, c0 = cond(edit_cross(ctrl, 2, probs), 2), cond(probs, 2)
    for column, factor in [(2, 5.0), (3, 0.0), (4, -1.0)]:
        assert torch.allclose(c[1][..., column], factor * c0[0][..., column])
    others = [0, 1, 5, 40]
    assert torch.equal(c[1][..., others], c0[0][..., others])
    # α rows int(0.5 · 11) = 5: at step 7 the target uses its own, unweighted attention
    assert torch.equal(edit_cross(ctrl, 7, probs), probs)


def test_reweight_composes_with_replace_and_per_target_lists(tok):
    spec = job("a burger", ["a lasagne", "a pizza"], edit="replace", cross_replace_steps=1.0,
               reweight=[{"lasagne": 3.0}, {"pizza": -2.0}])
    ctrl = build_controller(spec, tok, 10, LATENT)
    assert isinstance(ctrl, ReweightController) and isinstance(ctrl.base, ReplaceController)
    probs = random_probs(3)
    c, c0 = cond(edit_cross(ctrl, 1, probs), 3), cond(probs, 3)
    assert torch.allclose(c[1][..., 2], 1.5 * c0[0][..., 2]) and torch.allclose(c[1][..., 3], 1.5 * c0[0][..., 2])
    assert torch.equal(c[1][..., 4], c0[0][..., 3])
    assert torch.allclose(c[2][..., 2], -2.0 * c0[0][..., 2])
    assert torch.equal(c[2][..., 3], c0[0][..., 3])


def test_reweight_dict_applies_to_every_target(tok):
    spec = job("a red car", ["a red car", "a red car"], edit="reweight", reweight={"red": 2.0})
    ctrl = build_controller(spec, tok, 10, LATENT)
    assert ctrl.equalizer[:, 2].tolist() == [2.0, 2.0]


def test_per_word_cross_schedule(tok):
    ctrl = build_controller(job(SQUIRREL, [LION], cross_replace_steps={"default_": 1.0, "lion": 0.4},
                                self_replace_steps=0.0), tok, 10, LATENT)
    probs = random_probs(2)
    early, late = cond(edit_cross(ctrl, 1, probs), 2), cond(edit_cross(ctrl, 6, probs), 2)
    c0 = cond(probs, 2)
    assert torch.equal(early[1], c0[0])  # identity mapper, every column injected
    assert torch.equal(late[1][..., 5], c0[1][..., 5])  # "lion" after int(0.4 · 11) = 4 steps: its own
    assert torch.equal(late[1][..., 4], c0[0][..., 4])


def test_several_targets_with_different_lengths(tok):
    targets = ["a dog", "a lasagne", "a cat"]
    ctrl = build_controller(job("a cat", targets, cross_replace_steps=1.0), tok, 10, LATENT)
    probs = random_probs(4)
    c, c0 = cond(edit_cross(ctrl, 0, probs), 4), cond(probs, 4)
    assert torch.equal(c[1], c0[0]) and torch.equal(c[3], c0[0])
    assert torch.allclose(c[2][..., 3], 0.5 * c0[0][..., 2])


# --- when probabilities are needed ------------------------------------------------------------------

def test_needs_probs_follows_windows_and_thresholds(tok):
    ctrl = build_controller(job(SQUIRREL, [LION], cross_replace_steps=0.5, self_replace_steps=0.3), tok, 10, LATENT)
    ctrl.begin_step(1)
    assert ctrl.needs_probs(True, 256) and ctrl.needs_probs(True, 4)
    assert ctrl.needs_probs(False, 16) and ctrl.needs_probs(False, 4)
    assert not ctrl.needs_probs(False, 64) and not ctrl.needs_probs(False, 256)
    ctrl.begin_step(3)  # self window [0, 3) over
    assert ctrl.needs_probs(True, 256) and not ctrl.needs_probs(False, 16)
    ctrl.begin_step(6)  # cross rows int(0.5 · 11) = 5 over, no store
    assert not ctrl.needs_probs(True, 256) and not ctrl.needs_probs(True, 16)
    medium = build_controller(job(SQUIRREL, [LION], self_replace_layers="medium"), tok, 10, LATENT)
    medium.begin_step(0)
    assert medium.needs_probs(False, 64) and not medium.needs_probs(False, 256)


def test_no_edit_no_store_never_needs_probs(tok):
    ctrl = build_controller(job(SQUIRREL, [LION], edit="none"), tok, 10, LATENT)
    assert type(ctrl) is AttentionController and ctrl.store is None
    for step in range(10):
        ctrl.begin_step(step)
        assert not any(ctrl.needs_probs(c, q) for c in (True, False) for q in (4, 16, 64, 256))
    with_maps = build_controller(job(SQUIRREL, [LION], edit="none", attention_map_prompts=[0]), tok, 10, LATENT)
    with_maps.begin_step(0)  # maps at map_grid(16×16 latent) = 16×16: 256 queries, the blend's 4×4 not needed
    assert with_maps.needs_probs(True, 256) and not with_maps.needs_probs(True, 16)
    assert not with_maps.needs_probs(False, 256)


def test_step_protocol(tok):
    ctrl = build_controller(job(SQUIRREL, [LION], attention_map_prompts=[1]), tok, 4, MAPS_LATENT)
    with pytest.raises(RuntimeError):
        ctrl.needs_probs(True, 16)
    with pytest.raises(ValueError):
        ctrl.begin_step(4)
    edit_cross(ctrl, 0, random_probs(2))
    edit_cross(ctrl, 1, random_probs(2))
    assert ctrl.map_store.maps_added == 2 * HEADS
    ctrl.begin_step(0)  # a new run starts clean
    assert ctrl.map_store.maps_added == 0 and ctrl.map_store.total is None


# --- store and visualisation ------------------------------------------------------------------------

def test_store_keeps_post_edit_cond_maps_at_the_map_grid_of_down_and_up(tok):
    ctrl = build_controller(job(SQUIRREL, [LION], cross_replace_steps=1.0, attention_map_prompts=[0, 1]),
                            tok, 10, MAPS_LATENT)
    probs = random_probs(2)
    edit_cross(ctrl, 0, probs, "down")
    ctrl.on_attention(probs.clone(), True, "mid", 16)  # mid is not read
    ctrl.on_attention(random_probs(2, queries=64), True, "up", 64)  # other resolutions are not stored
    ctrl.on_attention(random_probs(2, keys=16), False, "up", 16)  # self maps are never stored
    store = ctrl.map_store
    assert store.maps_added == HEADS and store.total.shape == (2, 16, 77)
    c0 = cond(probs, 2)
    assert torch.allclose(store.total[0], c0[0].sum(0)) and torch.allclose(store.total[1], c0[0].sum(0))


def test_attention_maps_average_and_grid(tok):
    ctrl = build_controller(job("a cat", ["a dog"], edit="none", attention_map_prompts=[0, 1]), tok, 10, MAPS_LATENT)
    first, second = random_probs(2, seed=3), random_probs(2, seed=4)
    edit_cross(ctrl, 0, first, "down")
    edit_cross(ctrl, 1, second, "up")
    maps = ctrl.attention_maps(1)
    assert maps.tokens == ["<|startoftext|>", "a", "dog", "<|endoftext|>"] and maps.prompt == "a dog"
    assert maps.maps.shape == (4, 4, 4) and maps.maps.dtype == np.float32
    expected = (cond(first, 2)[1].mean(0) + cond(second, 2)[1].mean(0)) / 2  # (queries, tokens)
    assert np.allclose(maps.maps[2], expected[:, 2].reshape(4, 4).numpy(), atol=1e-6)
    picture = Image.open(io.BytesIO(maps.grid_png))
    assert picture.format == "PNG" and picture.size == (4 * 68, 64 + 22)


def test_render_token_grid_handles_zero_and_negative_maps():
    maps = np.stack([np.zeros((16, 16)), -np.ones((16, 16)), np.arange(256.0).reshape(16, 16)])
    png = render_token_grid(["zero", "negative", "a-very-long-token-caption"], maps)
    picture = Image.open(io.BytesIO(png)).convert("L")
    assert picture.size == (3 * 260, 256 + 22)
    tile = np.asarray(picture)[2 : 2 + 256, 2 * 260 + 2 : 2 * 260 + 2 + 256]
    assert tile.max() == 255 and np.asarray(picture)[2:258, 2:258].max() == 0
    with pytest.raises(ValueError):
        render_token_grid(["one"], maps)


# --- local blend ------------------------------------------------------------------------------------

def _blend(substruct: bool = False, start_step: int = 0) -> LocalBlend:
    columns = torch.zeros(3, 77)
    columns[0, 2] = columns[1, 2] = columns[2, 3] = 1.0
    sub = torch.zeros(77)
    sub[5] = 1.0
    return LocalBlend(columns, LATENT, (4, 4), threshold=0.3, start_step=start_step,
                      substruct_columns=sub if substruct else None)


def _latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 4, *LATENT, generator=torch.Generator().manual_seed(seed))


def _store_with(maps: torch.Tensor) -> AttentionStore:
    store = AttentionStore(3, (4, 4))
    store.total, store.maps_added = maps, 1
    return store


@pytest.mark.parametrize("maps", [torch.zeros(3, 16, 77), -torch.ones(3, 16, 77)])
def test_blend_with_empty_regions_makes_targets_equal_the_source(maps):
    blend, x = _blend(), _latents()
    out = blend(x, _store_with(maps), step=0)
    assert not blend.last_mask.any() and not torch.isnan(out).any()
    assert torch.equal(out[1], x[0]) and torch.equal(out[2], x[0]) and torch.equal(out[0], x[0])


def test_blend_with_full_regions_leaves_targets_unchanged():
    blend, x = _blend(), _latents()
    out = blend(x, _store_with(torch.ones(3, 16, 77)), step=0)
    assert blend.last_mask.all() and torch.equal(out, x)


def test_blend_mask_is_pooled_union_of_source_and_target_regions():
    maps = torch.zeros(3, 16, 77)
    maps[0, 0, 2] = 1.0  # source word at cell (0, 0)
    maps[2, 15, 3] = 1.0  # second target's word at cell (3, 3)
    blend, x = _blend(), _latents()
    out = blend(x, _store_with(maps), step=0)
    expected_first = torch.zeros(*LATENT, dtype=torch.bool)
    expected_first[:8, :8] = True  # 3×3 max-pool grows (0, 0) to 2×2 cells = 8×8 latent pixels
    expected_second = expected_first.clone()
    expected_second[8:, 8:] = True
    assert torch.equal(blend.last_mask[0, 0], expected_first) and torch.equal(blend.last_mask[1, 0], expected_second)
    outside = ~expected_first
    assert torch.equal(out[1][:, outside], x[0][:, outside]) and torch.equal(out[1][:, ~outside], x[1][:, ~outside])


def test_blend_substruct_and_start_step():
    maps = torch.ones(3, 16, 77)
    maps[0, :8, 5] = 0.0  # substruct word attends to the bottom half only
    blend, x = _blend(substruct=True), _latents()
    blend(x, _store_with(maps), step=0)
    assert blend.last_mask[:, :, :8].all() and not blend.last_mask[:, :, 8:].any()
    late = _blend(start_step=3)
    assert late(x, _store_with(torch.zeros(3, 16, 77)), step=2) is x


def test_controller_blend_from_stored_maps(tok):
    lb = LocalBlendSpec(source_words=["cat"], target_words=[["tiger"], ["dog"]])
    ctrl = build_controller(job("a cat", ["a tiger", "a dog"], local_blend=lb), tok, 10, LATENT)
    probs = torch.full((2 * 3 * HEADS, 16, 77), 1e-3)
    probs[:, 0, 2] = 1.0  # every prompt's word attends at cell (0, 0)
    edit_cross(ctrl, 0, probs, "up")
    x = _latents()
    out = ctrl.after_step(x)
    region = ctrl.blend.last_mask[0, 0]
    assert region[:8, :8].all() and not region[8:, :].any()
    assert torch.equal(out[2][:, ~region], x[0][:, ~region])
    with pytest.raises(RuntimeError):  # no maps stored at 4×4 (wrong latent size or no processors)
        fresh = build_controller(job("a cat", ["a tiger", "a dog"], local_blend=lb), tok, 10, LATENT)
        fresh.begin_step(0)
        fresh.after_step(x)


# --- validation -------------------------------------------------------------------------------------

LONG = " ".join(["cat"] * 76)


@pytest.mark.parametrize(
    "source, targets, kw, field",
    [
        ("a cat", ["a big dog"], {}, "target_prompts"),
        ("a cat", ["a dog"], {"edit": "reweight", "reweight": [{"cat": 2.0}]}, "reweight"),
        ("a cat", ["a dog"], {"edit": "reweight", "reweight": [{"dog": 11.0}]}, "reweight"),
        ("a cat", ["a dog"], {"edit": "reweight", "reweight": [{"dog": float("nan")}]}, "reweight"),
        ("a cat", ["a dog"], {"edit": "reweight"}, "reweight"),
        ("a cat", ["a dog"], {"edit": "reweight", "reweight": [{"dog": 2.0}, {"dog": 2.0}]}, "reweight"),
        ("a cat", ["a dog"], {"edit": "none", "reweight": [{"dog": 2.0}]}, "reweight"),
        ("a cat", ["a dog"], {"local_blend": LocalBlendSpec(["tiger"], [["dog"]])}, "local_blend.source_words"),
        ("a cat", ["a dog"], {"local_blend": LocalBlendSpec(["cat"], [["cat"]])}, "local_blend.target_words"),
        ("a cat", ["a dog"], {"local_blend": LocalBlendSpec(["cat"], [["dog"], ["dog"]])}, "local_blend.target_words"),
        ("a cat", ["a dog"], {"local_blend": LocalBlendSpec(["cat"], [["dog"]], substruct_words=["sofa"])},
         "local_blend.substruct_words"),
        ("a cat", ["a dog"], {"cross_replace_steps": {"default_": 0.8, "tiger": 0.4}}, "cross_replace_steps"),
        ("a cat", ["a dog"], {"cross_replace_steps": 1.2}, "cross_replace_steps"),
        ("a cat", ["a dog"], {"cross_replace_steps": (0.8, 0.2)}, "cross_replace_steps"),
        ("a cat", ["a dog"], {"self_replace_steps": -0.1}, "self_replace_steps"),
        ("a cat", ["a dog"], {"self_replace_layers": "high"}, "self_replace_layers"),
        ("a cat", ["a dog"], {"attention_map_prompts": [2]}, "attention_maps"),
        (LONG, ["a dog"], {}, "source_prompt"),
        ("a cat", ["a dog", LONG], {}, "target_prompts"),
    ],
)
def test_validation_errors_name_the_contract_field(tok, source, targets, kw, field):
    with pytest.raises(EditValidationError) as err:
        build_controller(job(source, targets, **kw), tok, 10, LATENT)
    assert err.value.field == field


def test_replace_word_count_message_names_both_counts(tok):
    with pytest.raises(EditValidationError) as err:
        build_controller(job("a cat", ["a big fat dog"]), tok, 10, LATENT)
    assert "2 words" in err.value.message and "has 4" in err.value.message


def test_flat_target_words_apply_to_every_target(tok):
    lb = LocalBlendSpec(source_words=["cat"], target_words=["cat"])
    ctrl = build_controller(job("a cat", ["a big cat", "a small cat"], edit="refine", local_blend=lb), tok, 10, LATENT)
    assert ctrl.blend.word_columns[:, :5].tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 0]]
