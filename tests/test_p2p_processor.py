"""The attention processor on the tiny SD-shaped UNet: equivalence, routing, hook counts, batch independence."""

from collections import Counter

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import worker.editing.processor as processor_module
from worker.editing.controllers import AttentionController, build_controller
from worker.editing.jobs import LocalBlendSpec, P2PJobSpec
from worker.editing.processor import BatchAttentionRouter, P2PAttnProcessor, install_p2p_processors

LATENT = (16, 16)
STEPS = 4


@pytest.fixture(scope="module")
def unet(tiny_models):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(str(tiny_models["tiny-sd"] / "unet")).eval()
    model.set_attn_processor(AttnProcessor2_0())
    return model


@pytest.fixture(scope="module")
def tok(tiny_models):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tiny_models["tiny-sd"] / "tokenizer"))


@pytest.fixture
def hooked(unet):
    router = BatchAttentionRouter()
    previous = install_p2p_processors(unet, router)
    yield unet, router
    unet.set_attn_processor(previous)


def inputs(rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, *LATENT, generator=g), torch.randn(rows, 77, 32, generator=g)


def run(unet, latents, context, t: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return unet(latents, t, context).sample


def job(source, targets, **kw) -> P2PJobSpec:
    return P2PJobSpec(job_id="t", source_prompt=source, target_prompts=list(targets), seed=0, **kw)


class Spy(AttentionController):
    """Asks for probabilities everywhere and records each call without editing."""

    def __init__(self, prompts: int):
        super().__init__(["p"] * prompts, STEPS)
        self.calls = []

    def needs_probs(self, is_cross, num_queries):
        return True

    def on_attention(self, probs, is_cross, place, num_queries):
        self.calls.append((is_cross, place, num_queries, tuple(probs.shape)))
        return probs


def test_install_covers_every_attention_module_and_restores(unet):
    router = BatchAttentionRouter()
    previous = install_p2p_processors(unet, router)
    try:
        current = unet.attn_processors
        assert len(current) == 20 and all(isinstance(p, P2PAttnProcessor) for p in current.values())
        assert Counter(p.place for p in current.values()) == {"down": 6, "mid": 2, "up": 12}
    finally:
        unet.set_attn_processor(previous)
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_non_editing_controllers_match_default_attention_through_sdpa(unet, tok, monkeypatch):
    x, ctx = inputs(10)
    expected = run(unet, x, ctx)  # diffusers' AttnProcessor2_0 everywhere
    router = BatchAttentionRouter()
    previous = install_p2p_processors(unet, router)
    try:
        a = build_controller(job("a cat", ["a dog"], edit="none"), tok, STEPS, LATENT)
        b = build_controller(job("a cat", ["a dog", "a cow"], edit="none"), tok, STEPS, LATENT)
        router.segments = [(0, 4, a), (4, 10, b)]
        explicit_calls = []
        monkeypatch.setattr(P2PAttnProcessor, "_explicit", lambda *args, **kw: explicit_calls.append(1))
        sdpa_rows = []
        real_sdpa = processor_module._sdpa

        def counting_sdpa(*args):
            sdpa_rows.append(args[0].shape[0])
            return real_sdpa(*args)

        monkeypatch.setattr(processor_module, "_sdpa", counting_sdpa)
        for step in range(STEPS):
            a.begin_step(step)
            b.begin_step(step)
            assert (run(unet, x, ctx) - expected).abs().max() < 1e-5
        assert not explicit_calls and sdpa_rows == [10] * 20 * STEPS  # one SDPA over the whole batch per layer
    finally:
        unet.set_attn_processor(previous)


def test_explicit_path_matches_sdpa_and_hooks_every_layer_once(unet, hooked):
    x, ctx = inputs(4, seed=1)
    _, router = hooked
    router.segments = [(0, 4, None)]
    expected = run(unet, x, ctx)
    spy = Spy(prompts=2)
    spy.begin_step(0)
    router.segments = [(0, 4, spy)]
    calls_before = router.num_calls
    assert (run(unet, x, ctx) - expected).abs().max() < 1e-5
    assert router.num_calls - calls_before == 20  # SD-1.x has 32; tiny has 10 transformer blocks × 2
    assert Counter((c, p) for c, p, _, _ in spy.calls) == {
        (False, "down"): 3, (True, "down"): 3, (False, "mid"): 1, (True, "mid"): 1, (False, "up"): 6, (True, "up"): 6,
    }
    cross = [(p, q) for c, p, q, _ in spy.calls if c]
    assert cross == [("down", 256), ("down", 64), ("down", 16), ("mid", 4),
                     ("up", 16), ("up", 16), ("up", 64), ("up", 64), ("up", 256), ("up", 256)]
    heads = 8
    assert all(shape[0] == 4 * heads and shape[2] == (77 if c else q) for c, _, q, shape in spy.calls)


def _editing_job(tok):
    return build_controller(
        job("a cat sitting", ["a dog sitting"], cross_replace_steps=1.0, self_replace_steps=1.0,
            attention_map_prompts=[0, 1]), tok, STEPS, LATENT)


def test_two_segment_batch_equals_each_segment_alone(unet, hooked, tok):
    _, router = hooked
    x, ctx = inputs(10, seed=2)
    editing = _editing_job(tok)
    plain = build_controller(job("a cat", ["a dog", "a cow"], edit="none"), tok, STEPS, LATENT)
    for step in range(2):
        for ctrl in (editing, plain):
            ctrl.begin_step(step)
        router.segments = [(0, 4, editing), (4, 10, plain)]
        together = run(unet, x, ctx)
        router.segments = [(0, 4, editing)]
        editing.begin_step(step)  # store counts per step: restart the step for the solo run
        alone_a = run(unet, x[:4], ctx[:4])
        router.segments = [(0, 6, plain)]
        alone_b = run(unet, x[4:], ctx[4:])
        assert (together[:4] - alone_a).abs().max() < 1e-5
        assert (together[4:] - alone_b).abs().max() < 1e-5
    # order in the batch does not matter either
    editing.begin_step(0)
    plain.begin_step(0)
    router.segments = [(0, 6, plain), (6, 10, editing)]
    swapped = run(unet, torch.cat([x[4:], x[:4]]), torch.cat([ctx[4:], ctx[:4]]))
    editing.begin_step(0)
    router.segments = [(0, 4, editing)]
    assert (swapped[6:] - run(unet, x[:4], ctx[:4])).abs().max() < 1e-5


def test_edit_changes_the_target_and_stores_maps_at_the_map_grid(unet, hooked, tok):
    _, router = hooked
    x, ctx = inputs(4, seed=3)
    x[2:] = x[:2]  # source and target share x_T, as the sampler does
    baseline = run(unet, x, ctx)
    ctrl = _editing_job(tok)
    ctrl.begin_step(0)
    router.segments = [(0, 4, ctrl)]
    edited = run(unet, x, ctx)
    assert (edited[2] - baseline[2]).abs().max() < 1e-5  # the source's cond row is never edited
    assert (edited[3] - baseline[3]).abs().max() > 1e-4  # the target's cond row is
    # a 16×16 latent shows its maps at 16×16 (attention_maps.map_grid), not the 4×4 latent/4 blur
    assert ctrl.store is None and ctrl.map_store.grid == (16, 16)
    assert ctrl.map_store.maps_added == 3 * 8  # 16×16 cross layers: 1 down + 2 up, 8 heads each
    maps = ctrl.attention_maps(1)
    assert maps.maps.shape == (len(maps.tokens), 16, 16) and maps.tokens[2] == "dog"


def test_local_blend_runs_on_unet_maps(unet, hooked, tok):
    _, router = hooked
    ctrl = build_controller(
        job("a cat sitting", ["a dog sitting"], local_blend=LocalBlendSpec(["cat"], [["dog"]], threshold=0.9)),
        tok, STEPS, LATENT)
    x, ctx = inputs(4, seed=4)
    ctrl.begin_step(0)
    router.segments = [(0, 4, ctrl)]
    run(unet, x, ctx)
    latents = torch.randn(2, 4, *LATENT)
    out = ctrl.after_step(latents)
    mask = ctrl.blend.last_mask[0, 0]
    assert mask.any() and not mask.all() and not torch.isnan(out).any()  # partial: both comparisons below bite
    assert not torch.equal(latents[1][:, ~mask], latents[0][:, ~mask])
    assert torch.equal(out[1][:, ~mask], latents[0][:, ~mask]) and torch.equal(out[1][:, mask], latents[1][:, mask])


def test_router_refuses_overlapping_segments(unet, hooked):
    _, router = hooked
    spy_a, spy_b = Spy(1), Spy(1)
    spy_a.begin_step(0)
    spy_b.begin_step(0)
    router.segments = [(0, 2, spy_a), (1, 3, spy_b)]
    x, ctx = inputs(3)
    with pytest.raises(ValueError):
        run(unet, x, ctx)


@pytest.mark.parametrize("segments", [[(0, 4)], [(0, 2), (2, 4)], [(1, 3)]], ids=["one-job", "two-jobs", "partial"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "additive-mask"])
def test_explicit_attention_equals_sdpa_when_nothing_is_edited(segments, with_mask):
    """The explicit path (3-D GEMMs, scale folded in, an additive mask as the GEMM's bias) computes the same
    attention as fused SDPA, for one job spanning the batch, several jobs, and rows outside any job."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, 2, n, 8, generator=g) for n in (16, 7, 7))
    mask = None
    if with_mask:
        mask = torch.zeros(4, 2, 1, 7)
        mask[:, :, :, 5:] = -1e4  # padding keys, as diffusers' prepare_attention_mask writes them
    router = BatchAttentionRouter([(a, b, Spy(1 if b - a == 2 else 2)) for a, b in segments])
    out = P2PAttnProcessor(router, "down").attend(q, k, v, mask, 8**-0.5, True)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out - reference).abs().max() < 1e-5
    assert sum(len(c.calls) for _, _, c in router.segments) == len(segments)
