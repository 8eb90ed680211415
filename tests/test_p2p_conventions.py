"""Schedules and local-blend arithmetic at values that tell conventions apart.

Every step count and fraction here is chosen so that int(f·T) and int(f·(T+1)) differ, a strict and a
non-strict threshold differ, and a normalised and a raw attention map differ: a test that passes under
both conventions proves nothing about which one the code follows.
"""

from __future__ import annotations

import pytest
import torch

from worker.editing.controllers import AttentionStore, LocalBlend, blend_grid, build_controller
from worker.editing.jobs import EditValidationError, LocalBlendSpec, P2PJobSpec
from worker.editing.schedules import cross_alpha, self_range, step_range
from worker.models.tokenizer import build_clip_tokenizer

LATENT = (16, 16)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def job(source, targets, **kw) -> P2PJobSpec:
    return P2PJobSpec(job_id="t", source_prompt=source, target_prompts=list(targets), seed=0, **kw)


# --- self-attention window: int(f·T) -----------------------------------------------------------------

@pytest.mark.parametrize("value,steps,expected", [
    (0.4, 4, (0, 1)),  # int(1.6) = 1; the α convention int(0.4·5) would give 2
    ((0.4, 0.8), 4, (1, 3)),  # (int(1.6), int(3.2)); with T+1: (2, 4)
    (0.5, 7, (0, 3)),  # int(3.5) = 3; with T+1: 4
    ((0.3, 0.6), 9, (2, 5)),  # (int(2.7), int(5.4)); with T+1: (3, 6)
    (1.0, 6, (0, 6)),
    (0.0, 6, (0, 0)),
])
def test_self_window_uses_int_f_times_steps(value, steps, expected):
    assert self_range(value, steps) == expected


def test_self_window_drives_the_controller(tok):
    ctrl = build_controller(job("a cat", ["a dog"], self_replace_steps=(0.4, 0.8)), tok, 4, LATENT)
    assert [ctrl.edits_self_at(step) for step in range(4)] == [False, True, True, False]


# --- cross-attention α: num_steps + 1 rows, int(f·(T+1)) ---------------------------------------------

def rows_on(alpha: torch.Tensor, target: int, column: int) -> list[int]:
    return [r for r in range(alpha.shape[0]) if alpha[r, target, column] == 1.0]


@pytest.mark.parametrize("value,steps,expected_rows", [
    (0.4, 4, [0, 1]),  # int(0.4·5) = 2; int(0.4·4) would give 1
    (0.8, 4, [0, 1, 2, 3]),  # int(4.0) = 4; int(3.2) would give 3
    ((0.2, 0.6), 4, [1, 2]),  # [int(1.0), int(3.0)); with T: [0, 2)
    ((0.5, 1.0), 6, [3, 4, 5, 6]),  # [int(3.5), 7); with T: [3, 6)
    (1.0, 3, [0, 1, 2, 3]),  # every row, the extra PNDM row included
    (0.0, 5, []),
])
def test_cross_alpha_table_values(tok, value, steps, expected_rows):
    alpha = cross_alpha(value, ["a dog"], tok, steps)
    assert alpha.shape == (steps + 1, 1, 77)
    for column in (0, 2, 76):  # start token, the word, padding: the default covers every column
        assert rows_on(alpha, 0, column) == expected_rows
    assert set(alpha.unique().tolist()) <= {0.0, 1.0}


def test_cross_alpha_per_word_ranges_override_only_their_columns(tok):
    alpha = cross_alpha({"default_": 0.8, "dog": (0.2, 0.6)}, ["a dog", "a big dog", "a cat"], tok, 4)
    assert alpha.shape == (5, 3, 77)
    assert rows_on(alpha, 0, 2) == [1, 2]  # "dog" in target 0 (token 2)
    assert rows_on(alpha, 1, 3) == [1, 2]  # "dog" in target 1 (token 3)
    assert rows_on(alpha, 1, 2) == [0, 1, 2, 3]  # "big" keeps the default
    assert rows_on(alpha, 2, 2) == [0, 1, 2, 3]  # no "dog" in target 2: its columns keep the default
    assert rows_on(alpha, 0, 1) == [0, 1, 2, 3]


def test_cross_alpha_without_default_injects_every_row(tok):
    alpha = cross_alpha({"dog": 0.4}, ["a dog"], tok, 4)
    assert rows_on(alpha, 0, 1) == [0, 1, 2, 3, 4]
    assert rows_on(alpha, 0, 2) == [0, 1]


def test_cross_alpha_refuses_a_word_in_no_target(tok):
    with pytest.raises(EditValidationError) as err:
        cross_alpha({"default_": 0.5, "horse": 0.2}, ["a dog"], tok, 4)
    assert err.value.field == "cross_replace_steps"
    assert err.value.message == "word 'horse' does not occur in any target prompt"


def test_cross_schedule_drives_the_controller(tok):
    ctrl = build_controller(job("a cat", ["a dog"], cross_replace_steps=0.4), tok, 4, LATENT)
    assert [ctrl.edits_cross_at(step) for step in range(4)] == [True, True, False, False]


@pytest.mark.parametrize("value,expected", [(0.25, (0.0, 0.25)), ([0.1, 0.9], (0.1, 0.9)), ((0.0, 0.0), (0.0, 0.0)),
                                            (1, (0.0, 1.0)), ([0.5, 0.5], (0.5, 0.5))])
def test_step_range_accepts(value, expected):
    assert step_range(value, "f") == expected


@pytest.mark.parametrize("value,message", [
    (1.01, "fraction 1.01 is outside [0, 1]"), (-0.01, "fraction -0.01 is outside [0, 1]"),
    (float("nan"), "expected a fraction in [0, 1], got nan"), (float("inf"), "expected a fraction in [0, 1], got inf"),
    (True, "expected a fraction in [0, 1], got True"), ("0.5", "expected a fraction in [0, 1], got '0.5'"),
    (None, "expected a fraction in [0, 1], got None"), ([0.6, 0.5], "start 0.6 is after end 0.5"),
    ([0.1, 0.2, 0.3], "expected a fraction or a [start, end] pair, got [0.1, 0.2, 0.3]"),
    ([0.1], "expected a fraction or a [start, end] pair, got [0.1]"), ([0.1, 1.5], "fraction 1.5 is outside [0, 1]"),
    ([-0.1, 0.5], "fraction -0.1 is outside [0, 1]"),
])
def test_step_range_refuses(value, message):
    with pytest.raises(EditValidationError) as err:
        step_range(value, "self_replace_steps")
    assert err.value.field == "self_replace_steps" and err.value.message == message


# --- local blend: normalisation, threshold, start step ------------------------------------------------

def one_word_blend(threshold: float, start_step: int = 0, latent=LATENT) -> LocalBlend:
    columns = torch.zeros(2, 77)
    columns[:, 2] = 1.0  # the blend word is token 2 in both prompts
    return LocalBlend(columns, latent, blend_grid(latent), threshold=threshold, start_step=start_step)


def graded_store(cell_values: dict[int, float], grid=(4, 4)) -> AttentionStore:
    """The source's word map takes the given values at grid cells; the target's word never attends."""
    store = AttentionStore(2, grid)
    total = torch.zeros(2, grid[0] * grid[1], 77)
    for cell, value in cell_values.items():
        total[0, cell, 2] = value
    store.total, store.maps_added = total, 1
    return store


def region_of(blend: LocalBlend, maps: torch.Tensor) -> torch.Tensor:
    """The unpooled binary region at grid resolution (one latent pixel per grid cell: LATENT is 4× the grid)."""
    return blend.region(maps, blend.word_columns, pool=False)[0, 0, ::4, ::4]


def test_region_is_normalised_by_its_peak_before_the_threshold():
    """Raw values are tiny (peak 2⁻⁶): only dividing by the peak lets the strong cells pass 0.3."""
    blend = one_word_blend(threshold=0.3)
    peak = 2.0**-6
    store = graded_store({0: peak, 5: peak / 2, 10: peak / 4, 15: peak / 8})
    region = region_of(blend, store.total)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 0] = expected[1, 1] = True  # 1 and 1/2 of the peak; 1/4 and 1/8 stay below 0.3
    assert torch.equal(region, expected)


def test_region_threshold_is_strict_and_scale_free():
    blend = one_word_blend(threshold=0.5)
    for scale in (1e-3, 1.0, 250.0):
        store = graded_store({0: 1.0 * scale, 1: 0.5 * scale, 2: 0.75 * scale, 3: 0.25 * scale})
        region = region_of(blend, store.total)
        assert region[0].tolist() == [True, False, True, False], scale
        assert not region[1:].any()


def test_region_of_a_negative_or_zero_map_is_empty():
    blend = one_word_blend(threshold=0.3)
    assert not region_of(blend, graded_store({}).total).any()
    assert not region_of(blend, graded_store({0: -1.0, 3: -0.5}).total).any()


def test_pooled_mask_grows_each_cell_by_one_neighbour():
    blend = one_word_blend(threshold=0.3)
    mask = blend.masks(graded_store({5: 1.0}).total)[0, 0, ::4, ::4]  # cell (1, 1)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0:3, 0:3] = True
    assert torch.equal(mask, expected)


def test_blend_starts_exactly_at_its_start_step():
    blend = one_word_blend(threshold=0.3, start_step=3)
    store = graded_store({0: 1.0})
    x = torch.randn(2, 4, *LATENT, generator=torch.Generator().manual_seed(0))
    assert blend(x, store, step=2) is x and blend.last_mask is None
    out = blend(x, store, step=3)
    mask = blend.last_mask[0, 0]
    assert mask.any() and not mask.all()
    assert torch.equal(out[1][:, ~mask], x[0][:, ~mask]) and torch.equal(out[1][:, mask], x[1][:, mask])


@pytest.mark.parametrize("start_blend,steps,start_step", [
    (0.5, 7, 3),  # int(3.5); int(0.5·8) would be 4
    (0.4, 4, 1),  # int(1.6); int(0.4·5) would be 2
    (0.0, 5, 0),
    (1.0, 5, 5),  # never blends
])
def test_start_blend_is_int_f_times_steps(tok, start_blend, steps, start_step):
    lb = LocalBlendSpec(["cat"], [["dog"]], start_blend=start_blend)
    ctrl = build_controller(job("a cat", ["a dog"], local_blend=lb), tok, steps, LATENT)
    assert ctrl.blend.start_step == start_step


@pytest.mark.parametrize("latent,grid", [((16, 16), (4, 4)), ((8, 16), (2, 4)), ((16, 8), (4, 2)), ((2, 3), (1, 1))])
def test_blend_grid_is_latent_over_four_per_axis(latent, grid):
    assert blend_grid(latent) == grid


def test_non_square_mask_keeps_rows_and_columns_apart():
    """A word attending in the top-right grid cell of an 8×16 latent marks the top-right corner, not a transpose."""
    latent = (8, 16)
    blend = one_word_blend(threshold=0.3, latent=latent)
    store = graded_store({3: 1.0}, grid=(2, 4))  # row 0, column 3 of the 2×4 grid
    mask = blend.region(store.total, blend.word_columns, pool=False)[0, 0]
    assert mask.shape == latent
    expected = torch.zeros(*latent, dtype=torch.bool)
    expected[0:4, 12:16] = True
    assert torch.equal(mask, expected)


def test_cross_alpha_per_word_range_reaches_targets_after_one_without_the_word(tok):
    alpha = cross_alpha({"default_": 1.0, "dog": (0.0, 0.4)}, ["a cat", "a dog"], tok, 4)
    assert alpha[:, 1, 2].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]  # "dog" in the second target: its own range
    assert alpha[:, 0, 2].tolist() == [1.0] * 5  # "cat" keeps the default
