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
    assert router.num_calls == 20  # SD-1.x has 32; tiny has 10 transformer blocks × 2
    spy = Spy(prompts=2)
    spy.begin_step(0)
    router.segments = [(0, 4, spy)]
    assert (run(unet, x, ctx) - expected).abs().max() < 1e-5
    assert router.num_calls == 40
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


class Picky(Spy):
    """Asks for probabilities only where ``want(is_cross, num_queries)`` says so."""

    def __init__(self, want):
        super().__init__(1)
        self.want = want

    def needs_probs(self, is_cross, num_queries):
        return self.want(is_cross, num_queries)


def test_plan_covers_the_batch_in_row_order_with_gaps_as_plain_runs():
    a, b = Spy(1), Spy(1)
    assert BatchAttentionRouter([(1, 3, a)]).plan(True, 16, 4) == [(0, 1, None), (1, 3, a), (3, 4, None)]
    # adjacent jobs given out of order: sorted, and no empty run between them or at the ends
    assert BatchAttentionRouter([(2, 4, b), (0, 2, a)]).plan(True, 16, 4) == [(0, 2, a), (2, 4, b)]
    cross_only = Picky(lambda is_cross, queries: is_cross and queries == 16)
    router = BatchAttentionRouter([(0, 2, cross_only), (2, 4, None)])
    assert router.plan(True, 16, 4) == [(0, 2, cross_only), (2, 4, None)]
    assert router.plan(False, 16, 4) is None and router.plan(True, 64, 4) is None  # nobody asks: one SDPA call
    assert BatchAttentionRouter().plan(True, 16, 4) is None


@pytest.mark.parametrize("rows", [(2, 2), (3, 5), (-1, 2)], ids=["empty", "past-the-batch", "before-the-batch"])
def test_plan_refuses_rows_that_are_not_a_range_of_the_batch(rows):
    with pytest.raises(ValueError, match=rf"^segment rows \[{rows[0]}, {rows[1]}\) overlap another or fall outside "
                                         r"the batch of 4$"):
        BatchAttentionRouter([(*rows, Spy(1))]).plan(True, 16, 4)


ATTENTION_SHAPES = {
    # the VAE's mid-block attention: 4-D input, group norm, residual, output rescale, a non-square map
    "vae-like": dict(kw=dict(query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True,
                             rescale_output_factor=2.0, bias=True), x=(2, 16, 4, 6), ctx=None, mask=False),
    # 4-D input with a spatial norm conditioned on temb (the MoVQ decoder's attention)
    "spatial-norm": dict(kw=dict(query_dim=32, heads=2, dim_head=8, spatial_norm_dim=3), x=(2, 32, 4, 6), ctx=None,
                         mask=False),
    # cross-attention with a padding mask, a norm on the context and q/k layer norms
    "cross-masked": dict(kw=dict(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8,
                                 cross_attention_norm="layer_norm", qk_norm="layer_norm"),
                         x=(2, 10, 16), ctx=(2, 7, 12), mask=True),
}


@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES))
@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit"])
def test_the_processor_equals_diffusers_on_every_attention_variant(shape, explicit):
    """Any diffusers ``Attention`` (not only the SD UNet's): the same output as ``AttnProcessor2_0`` on both paths."""
    from diffusers.models.attention_processor import Attention

    spec = ATTENTION_SHAPES[shape]
    torch.manual_seed(5)
    attn = Attention(**spec["kw"]).eval()
    for p in attn.parameters():  # norms start as identities: give them weights that matter
        p.data.normal_(0, 0.5)
    x = torch.randn(*spec["x"])
    ctx = None if spec["ctx"] is None else torch.randn(*spec["ctx"])
    temb = torch.randn(2, 3, 2, 3) if "spatial_norm_dim" in spec["kw"] else None
    mask = None
    if spec["mask"]:
        mask = torch.zeros(2, 10, 7)  # one row per query
        mask[0, :, 5:] = -1e4  # the first sample's last two context tokens are padding
        mask[1, :4, 0] = -1e4  # and its first four queries do not see the second sample's first token
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        expected = attn(x, encoder_hidden_states=ctx, attention_mask=mask, temb=temb)
        spy = Spy(1)
        router = BatchAttentionRouter([(0, 2, spy if explicit else None)])
        attn.set_processor(P2PAttnProcessor(router, "mid"))
        out = attn(x, encoder_hidden_states=ctx, attention_mask=mask, temb=temb)
    assert out.shape == expected.shape and torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert router.num_calls == 1 and len(spy.calls) == int(explicit)
    if explicit:
        queries = 24 if len(spec["x"]) == 4 else 10
        assert spy.calls == [(ctx is not None, "mid", queries, (4, queries, 7 if ctx is not None else queries))]


def test_upcast_attention_gives_the_controller_fp32_maps_of_half_precision_inputs():
    """``upcast_attention`` (SD-2.x): scores from fp32 Q and K, so bf16 models edit maps as exact as fp32 ones."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g).bfloat16() for _ in range(3))
    q, k, v = (torch.cat([t, t]) for t in (q, k, v))  # two rows: the job's row alone, or beside a plain row
    exact = (q[:1].float() @ k[:1].float().transpose(-1, -2) * 0.5).softmax(-1).reshape(2, 16, 16)
    errors = {}
    mask = torch.zeros(2, 2, 1, 16, dtype=torch.bfloat16)  # in the model's dtype, cast to the fp32 scores
    for upcast, rows, run_mask in ((True, 1, None), (True, 2, None), (True, 2, mask), (False, 1, None)):
        spy = Spy(1)
        spy.on_attention = lambda probs, *rest, seen=spy: seen.calls.append(probs) or probs
        processor = P2PAttnProcessor(BatchAttentionRouter([(0, 1, spy)]), "up")
        if upcast:
            out = processor.attend(q[:rows], k[:rows], v[:rows], run_mask, 0.5, False, True)
        else:
            out = processor.attend(q[:1], k[:1], v[:1], None, 0.5, False)  # the default: no upcast
        assert out.dtype == torch.bfloat16 and spy.calls[0].dtype == torch.float32
        errors[upcast] = max(errors.get(upcast, 0.0), (spy.calls[0] - exact).abs().max().item())
    assert errors[True] < 1e-6 < 1e-4 < errors[False]


def test_an_attention_layers_upcast_flag_reaches_the_maps():
    """``Attention(upcast_attention=True)`` in bf16: the controller's maps are softmax of the fp32 product of the
    layer's own (bf16) Q and K."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(7)
    errors = {}
    for upcast in (True, False):
        attn = Attention(query_dim=16, heads=2, dim_head=8, upcast_attention=upcast).to(torch.bfloat16).eval()
        seen = {}
        attn.to_q.register_forward_hook(lambda mod, args, out: seen.__setitem__("q", out))
        attn.to_k.register_forward_hook(lambda mod, args, out: seen.__setitem__("k", out))
        spy = Spy(1)
        spy.on_attention = lambda probs, *rest: seen.__setitem__("probs", probs) or probs
        attn.set_processor(P2PAttnProcessor(BatchAttentionRouter([(0, 1, spy)]), "down"))
        with torch.no_grad():
            attn(torch.randn(1, 16, 16).bfloat16())
        q, k = (seen[n].float().view(1, 16, 2, 8).transpose(1, 2).reshape(2, 16, 8) for n in ("q", "k"))
        exact = (q @ k.transpose(1, 2) * attn.scale).softmax(-1)
        errors[upcast] = (seen["probs"] - exact).abs().max().item()
    assert errors[True] < 1e-6 < 1e-4 < errors[False]


def test_sdpa_rows_use_the_layers_scale_not_the_default():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    out = P2PAttnProcessor(BatchAttentionRouter(), "up").attend(q, k, v, None, 1.0, False)
    reference = ((q @ k.transpose(-1, -2)).softmax(-1)) @ v  # scale 1 (scale_qk=False), not 1/√8
    assert (out - reference).abs().max() < 1e-5


def test_shared_processors_are_made_once_per_unet_and_reinstalled(unet):
    """One set per UNet (a compiled UNet guards on its processors); each install hands back what it replaced."""
    from worker.editing.processor import install_shared_p2p_processors

    router, previous = install_shared_p2p_processors(unet)
    try:
        first = dict(unet.attn_processors)
        assert all(isinstance(p, P2PAttnProcessor) and p.router is router for p in first.values())
        assert all(isinstance(p, AttnProcessor2_0) for p in previous.values()) and previous.keys() == first.keys()
        router.segments = [(0, 1, Spy(1))]
        unet.set_attn_processor(dict(previous))  # diffusers empties the dict it is given
        again, replaced = install_shared_p2p_processors(unet)
        assert again is router and router.segments == []  # the caller routes its own jobs
        assert all(unet.attn_processors[name] is p for name, p in first.items())
        assert all(isinstance(p, AttnProcessor2_0) for p in replaced.values())
    finally:
        unet.set_attn_processor(previous)


def test_controllers_are_asked_with_the_layers_query_count():
    """A controller picks layers by their number of queries (a resolution): the router must be asked with it."""
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(2, 2, 16, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8)
    picky = Picky(lambda is_cross, queries: queries == 16)
    processor = P2PAttnProcessor(BatchAttentionRouter([(0, 2, picky)]), "down")
    processor.attend(q, k, v, None, 8**-0.5, True)
    processor.attend(q[:, :, :4], k, v, None, 8**-0.5, True)  # another resolution: plain SDPA
    assert [(queries, shape) for _, _, queries, shape in picky.calls] == [(16, (4, 16, 7))]


def test_attention_outside_the_down_mid_and_up_blocks_keeps_its_processor():
    class FakeUNet:
        def __init__(self):
            self.attn_processors = {"down_blocks.0.attn1.processor": "a", "extra.attn.processor": "b"}

        def set_attn_processor(self, processors):
            self.attn_processors = dict(processors)

    unet = FakeUNet()
    previous = install_p2p_processors(unet, BatchAttentionRouter())
    assert previous == {"down_blocks.0.attn1.processor": "a", "extra.attn.processor": "b"}
    assert isinstance(unet.attn_processors["down_blocks.0.attn1.processor"], P2PAttnProcessor)
    assert unet.attn_processors["extra.attn.processor"] == "b"
