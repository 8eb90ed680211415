"""Tensor-indexed controllers equal the host ones call for call, on small synthetic attention tensors.

Why: tests/test_p2p_tensor_controller.py compares whole tiny-sd runs, which takes minutes; here every mode's
per-layer edits, stored maps and blended latents are compared directly over two runs of a few steps,
with windows chosen so that each step differs from the next (start/end of α, self window, blend start).
"""

from __future__ import annotations

import pytest
import torch

from worker.editing.controllers import AttentionStore, ReplaceController, build_controller
from worker.editing.jobs import LocalBlendSpec, P2PJobSpec
from worker.editing.tensor_controller import TensorStore, tensor_controller
from worker.models.tokenizer import build_clip_tokenizer

HEADS, KEYS, STEPS = 2, 77, 5
LATENT = (16, 16)  # blend grid 4×4 = 16 queries, map grid 16×16 = 256, "low" self layers ≤ 16
# (is_cross, place, queries): the layers one UNet call visits here
LAYERS = [(True, "down", 16), (False, "down", 16), (True, "mid", 16), (False, "up", 64), (True, "up", 256),
          (True, "up", 16), (False, "up", 16), (True, "down", 64)]

SPECS = {
    "replace": P2PJobSpec("r", "a cat on a sofa", ["a dog on a sofa", "a cow on a sofa"], seed=0,
                          cross_replace_steps=(0.2, 0.6), self_replace_steps=(0.2, 0.6),
                          attention_map_prompts=[0, 2]),
    "refine": P2PJobSpec("f", "a house", ["a red house"], seed=0, edit="refine", cross_replace_steps=0.5,
                         self_replace_steps=0.0),
    "reweight": P2PJobSpec("w", "a red car", ["a red car"], seed=0, edit="reweight", reweight=[{"red": 3.0}],
                           cross_replace_steps={"default_": 0.8, "red": (0.2, 0.5)}, self_replace_steps=0.4),
    "blend": P2PJobSpec("b", "a cat on a sofa", ["a lion on a sofa", "a tiger on a sofa"], seed=0,
                        local_blend=LocalBlendSpec(["cat"], [["lion"], ["tiger"]], threshold=0.4, start_blend=0.4,
                                                   substruct_words=["sofa"]), attention_map_prompts=[1]),
    "none": P2PJobSpec("n", "a house", ["a castle"], seed=0, edit="none", attention_map_prompts=[1]),
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def layer_probs(prompts: int, is_cross: bool, queries: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keys = KEYS if is_cross else queries
    return torch.randn(2 * prompts * HEADS, queries, keys, generator=g).mul(3).softmax(-1)


def run(ctrl, prompts: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One sampling run as the processor drives it: explicit maps only where ``needs_probs`` says so."""
    outs, latents = [], []
    g = torch.Generator().manual_seed(seed)
    for step in range(STEPS):
        ctrl.begin_step(step)
        for n, (is_cross, place, queries) in enumerate(LAYERS):
            probs = layer_probs(prompts, is_cross, queries, seed + 100 * step + n)
            if ctrl.needs_probs(is_cross, queries):
                probs = ctrl.on_attention(probs, is_cross, place, queries)
            outs.append(probs)
        x = torch.randn(prompts, 4, *LATENT, generator=g)
        latents.append(ctrl.after_step(x))
    return outs, latents


@pytest.mark.parametrize("mode", list(SPECS))
def test_every_layer_and_step_equals_the_host_controller_over_two_runs(tok, mode):
    spec = SPECS[mode]
    host = build_controller(spec, tok, STEPS, LATENT)
    tensor = tensor_controller(build_controller(spec, tok, STEPS, LATENT))
    assert tensor.prompts == spec.prompts and tensor.num_steps == STEPS and tensor.tokenizer is tok
    prompts = len(spec.prompts)
    for seed in (0, 7):  # the second run reuses both controllers: begin_step(0) must start clean
        host_outs, host_latents = run(host, prompts, seed)
        outs, latents = run(tensor, prompts, seed)
        for n, (ours, theirs) in enumerate(zip(outs, host_outs)):
            assert torch.allclose(ours, theirs, atol=1e-6), (mode, seed, n)
        for step, (ours, theirs) in enumerate(zip(latents, host_latents)):
            assert torch.equal(ours, theirs), (mode, seed, step)
        if host.blend is not None:
            assert torch.equal(tensor.blend.last_mask, host.blend.last_mask)
        for index in spec.attention_map_prompts if seed else ():  # rendering is slow: once, after the rerun
            ours, theirs = tensor.attention_maps(index), host.attention_maps(index)
            assert ours.prompt_index == index and ours.tokens == theirs.tokens
            assert torch.allclose(torch.from_numpy(ours.maps), torch.from_numpy(theirs.maps), atol=1e-6)
            assert ours.grid_png and ours.grid_png == theirs.grid_png
            assert tensor.attention_maps(index, render=False).grid_png == b""


def test_the_blend_really_blends_partially_and_only_from_its_start(tok):
    """So the equality above means something: the mask is partial and step 1 (< int(0.4 · 5)) is untouched."""
    tensor = tensor_controller(build_controller(SPECS["blend"], tok, STEPS, LATENT))
    _, latents = run(tensor, 3, 0)
    g = torch.Generator().manual_seed(0)
    raw = [torch.randn(3, 4, *LATENT, generator=g) for _ in range(STEPS)]
    assert torch.equal(latents[1], raw[1])
    assert not torch.equal(latents[2], raw[2])
    mask = tensor.blend.last_mask
    assert 0 < mask.float().mean() < 1


@pytest.mark.parametrize("kw, hook", [
    ({"edit": "none"}, False),
    ({"edit": "none", "attention_map_prompts": [0]}, True),
    ({"edit": "none", "local_blend": LocalBlendSpec(["house"], [["castle"]])}, True),
    ({"cross_replace_steps": 0.0, "self_replace_steps": 0.4}, True),
    ({"cross_replace_steps": 0.5, "self_replace_steps": 0.0}, True),
    ({"cross_replace_steps": 0.0, "self_replace_steps": 0.0}, False),
])
def test_only_jobs_that_read_or_edit_maps_need_the_hook(tok, kw, hook):
    spec = P2PJobSpec("h", "a house", ["a castle"], seed=0, **kw)
    assert tensor_controller(build_controller(spec, tok, STEPS, LATENT)).needs_hook is hook


def test_jobs_that_only_read_maps_need_probabilities_at_their_grids_only(tok):
    blend = P2PJobSpec("b", "a house", ["a castle"], seed=0, edit="none",
                       local_blend=LocalBlendSpec(["house"], [["castle"]]))
    maps = P2PJobSpec("m", "a house", ["a castle"], seed=0, edit="none", attention_map_prompts=[0])
    both = P2PJobSpec("bm", "a house", ["a castle"], seed=0, edit="none", attention_map_prompts=[0],
                      local_blend=LocalBlendSpec(["house"], [["castle"]]))
    for spec, wanted in ((blend, [16]), (maps, [256]), (both, [16, 256])):
        tensor = tensor_controller(build_controller(spec, tok, STEPS, LATENT))
        tensor.begin_step(0)
        assert [q for q in (16, 64, 256) if tensor.needs_probs(True, q)] == wanted
        assert not tensor.needs_probs(False, 16)


def test_needs_probs_is_static_and_bounded_by_the_self_layer_size(tok):
    spec = P2PJobSpec("s", "a house", ["a castle"], seed=0, cross_replace_steps=0.0, self_replace_steps=(0.4, 0.6),
                      self_replace_layers="medium")
    tensor = tensor_controller(build_controller(spec, tok, STEPS, LATENT))
    for step in (0, 2, 4):
        tensor.begin_step(step)
        assert tensor.needs_probs(False, 64) and tensor.needs_probs(False, 16) and not tensor.needs_probs(False, 65)
        assert not tensor.needs_probs(True, 16)
    closed = P2PJobSpec("c", "a house", ["a castle"], seed=0, cross_replace_steps=0.5, self_replace_steps=0.0)
    tensor = tensor_controller(build_controller(closed, tok, STEPS, LATENT))
    tensor.begin_step(0)
    assert tensor.needs_probs(True, 4) and not tensor.needs_probs(False, 16)


def test_calls_past_the_alpha_rows_inject_nothing():
    """A controller run for more UNet calls than α has rows edits nothing after them, as the host one."""
    alpha = torch.ones(3, 1, KEYS)
    host = ReplaceController(["s", "t"], 6, mapper=torch.eye(KEYS).flip(0)[None], cross_alpha=alpha)
    tensor = tensor_controller(ReplaceController(["s", "t"], 6, mapper=torch.eye(KEYS).flip(0)[None],
                                                 cross_alpha=alpha))
    short = tensor_controller(ReplaceController(["s", "t"], 2, mapper=torch.eye(KEYS)[None], cross_alpha=alpha))
    assert short.cross_table.shape == (2, 1, KEYS)
    for step in range(6):
        probs = layer_probs(2, True, 16, step)
        host.begin_step(step)
        tensor.begin_step(step)
        theirs = host.on_attention(probs.clone(), True, "down", 16) if host.needs_probs(True, 16) else probs
        ours = tensor.on_attention(probs.clone(), True, "down", 16)
        assert torch.equal(ours, theirs), step
        assert torch.equal(ours, probs) == (step >= 3), step


def test_the_step_tensor_is_one_device_scalar_filled_in_place():
    """A captured step keeps reading the tensor it saw first: begin_step must refill it, not replace it."""
    tensor = tensor_controller(ReplaceController(["s", "t"], 4, mapper=torch.eye(KEYS)[None],
                                                 cross_alpha=torch.ones(5, 1, KEYS)))
    first = tensor.step_tensor(torch.device("cpu"))
    assert first.tolist() == [0] and first.dtype == torch.long
    tensor.begin_step(2)
    assert tensor.step_tensor(torch.device("cpu")) is first and first.tolist() == [2]
    tensor.begin_step(0)
    assert first.tolist() == [0] and tensor.step == 0
    with pytest.raises(ValueError, match=r"step 4 outside \[0, 4\)"):
        tensor.begin_step(4)
    with pytest.raises(ValueError):
        tensor.begin_step(-1)


def test_tensor_store_averages_like_the_host_store_and_sums_in_float32():
    host, ours = AttentionStore(2, (2, 2)), TensorStore(2, (2, 2))
    with pytest.raises(RuntimeError, match="2×2"):
        ours.average()
    one_head = torch.rand(2, 1, 4, KEYS, dtype=torch.float16)
    for store in (host, ours):
        store.add(one_head, "down")
    assert ours.total.dtype == torch.float32 and torch.equal(ours.average(), host.average())
    cond = torch.rand(2, 3, 4, KEYS)
    for store in (host, ours):
        store.add(cond, "up")
        store.add(cond, "mid")
        store.add(cond[:, :, :1], "down")
    assert ours.count.item() == host.maps_added == 4
    assert torch.allclose(ours.average(), host.average())
    with pytest.raises(RuntimeError, match="3×5"):
        TensorStore(1, (3, 5)).average()


def test_a_long_run_of_bfloat16_maps_is_counted_and_summed_in_float32():
    """bfloat16 holds integers exactly only up to 256 and sums 3 heads coarsely: both must stay float32."""
    host, ours = AttentionStore(1, (2, 2)), TensorStore(1, (2, 2))
    cond = torch.rand(1, 3, 4, KEYS, generator=torch.Generator().manual_seed(0)).bfloat16()
    for _ in range(100):
        host.add(cond, "up")
        ours.add(cond, "up")
    assert ours.count.item() == host.maps_added == 300
    assert torch.allclose(ours.total, host.total) and torch.allclose(ours.average(), host.average())


def test_after_step_checks_the_latents_and_refuses_a_blend_without_maps(tok):
    latent = (16, 12)  # blend grid 4×3
    tensor = tensor_controller(build_controller(SPECS["blend"], tok, STEPS, latent))
    tensor.begin_step(2)
    with pytest.raises(RuntimeError, match=r"maps at 4×3: is latent_size the sampler's latent size, and were the "
                                           r"processors installed\?$"):
        tensor.after_step(torch.randn(3, 4, *latent))
    with pytest.raises(ValueError, match="3 prompts"):
        tensor.after_step(torch.randn(2, 4, *latent))
    plain = tensor_controller(build_controller(SPECS["refine"], tok, STEPS, LATENT))
    x = torch.randn(2, 4, *LATENT)
    plain.begin_step(0)
    assert plain.after_step(x) is x
    with pytest.raises(RuntimeError, match=r"\battention maps were not requested for this job\b"):
        plain.attention_maps(0)


def test_rows_must_split_into_prompts_and_heads_and_autograd_survives(tok):
    tensor = tensor_controller(build_controller(SPECS["replace"], tok, STEPS, LATENT))
    tensor.begin_step(1)
    with pytest.raises(ValueError, match="2 × 3 prompts"):
        tensor.on_attention(torch.rand(8, 16, KEYS), True, "down", 16)
    for is_cross, keys in ((True, KEYS), (False, 16)):
        logits = torch.randn(12, 16, keys, requires_grad=True)
        out = tensor.on_attention(logits.softmax(-1), is_cross, "down", 16)
        (out * torch.arange(float(keys))).sum().backward()
        assert logits.grad is not None


def test_tables_and_the_step_follow_the_device_of_the_maps(tok):
    """The per-step tables live where the attention runs (checked on the meta device: no accelerator needed)."""
    spec = P2PJobSpec("d", "a cat on a sofa", ["a lion on a sofa"], seed=0, self_replace_steps=0.5,
                      local_blend=LocalBlendSpec(["cat"], [["lion"]]), attention_map_prompts=[1])
    tensor = tensor_controller(build_controller(spec, tok, STEPS, LATENT))
    meta = torch.device("meta")
    step = tensor.step_tensor(meta)
    tensor.begin_step(1)
    for is_cross, queries, keys in ((True, 16, KEYS), (False, 16, 16), (True, 256, KEYS)):
        out = tensor.on_attention(torch.empty(8, queries, keys, device=meta), is_cross, "down", queries)
        assert out.device == meta and out.shape == (8, queries, keys)
    latents = tensor.after_step(torch.empty(2, 4, *LATENT, device=meta))
    assert latents.device == meta and tensor.step_tensor(meta) is step  # the one a captured step reads
