"""CLIP scores (IP2P's data filter and metrics): formulas on fixed embeddings, the reference's image
preparation, batched equals single, and the keep rule and ranking at the thresholds' edges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from worker.scoring.clip import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipScorer,
    ScoreRequest,
    pair_scores,
    score_requests,
    to_chw,
)
from worker.scoring.selection import CODE_THRESHOLDS, PAPER_THRESHOLDS, PairScores, Thresholds, keep_and_rank, passes


def row(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float64)


def test_four_scores_against_hand_computed_values():
    img_0, img_1 = row(1, 0, 0), row(0.6, 0.8, 0)
    txt_0, txt_1 = row(0, 0, 1), row(0, 1, 0)
    s = {k: v.item() for k, v in pair_scores(img_0, img_1, txt_0, txt_1).items()}
    assert s["image_image"] == pytest.approx(0.6, abs=1e-12)
    assert s["input_caption"] == pytest.approx(0.0, abs=1e-12)
    assert s["output_caption"] == pytest.approx(0.8, abs=1e-12)
    # (img_1 - img_0) = (-0.4, 0.8, 0), (txt_1 - txt_0) = (0, 1, -1): 0.8 / (sqrt(0.8) * sqrt(2)) = 1/sqrt(2.5)
    assert s["directional"] == pytest.approx(1 / math.sqrt(2.5), abs=1e-12)


def test_directional_uses_differences_of_normalised_embeddings():
    """Same directions, different lengths would change the result if the scorer skipped normalisation: the
    formula takes normalised rows, and the scorer normalises before calling it."""
    img_0, img_1 = row(1, 0), row(0, 1)
    txt_0, txt_1 = row(1, 0), row(0, 1)
    assert pair_scores(img_0, img_1, txt_0, txt_1)["directional"].item() == pytest.approx(1.0)
    assert pair_scores(img_0, img_1, txt_1, txt_0)["directional"].item() == pytest.approx(-1.0)


@pytest.fixture(scope="module")
def scorer(tiny_models):
    return ClipScorer(str(tiny_models["tiny-clip"]))


def test_tiny_clip_loads_like_the_production_model(scorer):
    assert scorer.size == 224
    assert len(scorer.tokenizer) == 49408
    assert scorer.max_tokens == 77
    long_caption = " ".join(["cat"] * 200)  # truncated to 77 tokens, as clip.tokenize(truncate=True)
    features = scorer.encode_texts([long_caption, "a dog"])
    assert features.shape[0] == 2
    assert torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_images_are_squashed_bicubic_to_224_and_normalised(scorer):
    """No centre crop: a band at the top of a tall image survives; values are (x - mean) / std."""
    image = torch.zeros(1, 3, 128, 64)
    image[:, :, :16] = 1.0
    prepared = scorer.prepare(image)
    assert prepared.shape == (1, 3, 224, 224)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1), torch.tensor(OPENAI_CLIP_STD).view(3, 1)
    top = prepared[0, :, 0, :]
    assert torch.allclose(top, ((1 - mean) / std).expand(3, 224), atol=1e-5)
    bottom = prepared[0, :, -1, :]
    assert torch.allclose(bottom, ((0 - mean) / std).expand(3, 224), atol=1e-5)
    expected = F.interpolate(image, size=(224, 224), mode="bicubic", align_corners=False)
    expected = (expected - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(prepared, expected, atol=1e-6)


def test_pixels_and_8bit_images_convert_to_chw():
    from PIL import Image

    pixels = np.random.default_rng(0).random((2, 8, 16, 3), dtype=np.float32)
    assert to_chw(pixels).shape == (2, 3, 8, 16)
    image = Image.fromarray((pixels[0] * 255).astype(np.uint8))
    assert torch.allclose(to_chw([image])[0], to_chw(pixels)[0], atol=1 / 255 + 1e-6)


def test_batched_scores_equal_one_pair_at_a_time(scorer):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 64, 64, generator=gen), torch.rand(2, 3, 64, 96, generator=gen)
    requests = [ScoreRequest(a, [(0, 1, "a cat", "a dog"), (0, 2, "a cat", "a tiger")]),
                ScoreRequest(b, [(0, 1, None, None)])]
    batched = score_requests(scorer, requests)
    img = scorer.encode_images(a)
    txt = scorer.encode_texts(["a cat", "a dog", "a tiger"])
    for k, (i1, t1) in enumerate([(1, 1), (2, 2)]):
        alone = pair_scores(img[0:1], img[i1:i1 + 1], txt[0:1], txt[t1:t1 + 1])
        for name, value in alone.items():
            assert batched[0][k][name] == pytest.approx(value.item(), abs=1e-5)
    only = scorer.encode_images(b)
    assert set(batched[1][0]) == {"image_image"}
    assert batched[1][0]["image_image"] == pytest.approx(F.cosine_similarity(only[0:1], only[1:2]).item(), abs=1e-5)


# ---------------------------------------------------------------------------------------------- keep rule

EDGE = Thresholds(image_image=0.7, image_caption=0.2, directional=0.2)


def at_edge(**changes: float) -> PairScores:
    base = dict(image_image=0.7, input_caption=0.2, output_caption=0.2, directional=0.2)
    base.update(changes)
    return PairScores(**base)


def below(x: float) -> float:
    return math.nextafter(x, -math.inf)


def test_keep_rule_passes_exactly_at_every_threshold():
    assert passes(at_edge(), EDGE)


@pytest.mark.parametrize("name", ["image_image", "input_caption", "output_caption", "directional"])
def test_keep_rule_fails_just_below_any_one_threshold(name):
    value = {"image_image": 0.7, "input_caption": 0.2, "output_caption": 0.2, "directional": 0.2}[name]
    assert not passes(at_edge(**{name: below(value)}), EDGE)
    assert not passes(at_edge(**{name: float("nan")}), EDGE)


def test_defaults_are_the_reference_script_and_paper_differs_on_image_similarity():
    assert CODE_THRESHOLDS == Thresholds(0.70, 0.20, 0.20)
    assert PAPER_THRESHOLDS == Thresholds(0.75, 0.20, 0.20)
    assert passes(at_edge(image_image=0.72), CODE_THRESHOLDS)
    assert not passes(at_edge(image_image=0.72), PAPER_THRESHOLDS)


def test_ranking_by_directional_descending_top_m_ties_in_sample_order():
    samples = [
        ("a", at_edge(directional=0.30)),
        ("b", at_edge(directional=0.50)),
        ("rejected", at_edge(directional=0.90, image_image=below(0.7))),
        ("c", at_edge(directional=0.30)),
        ("d", at_edge(directional=0.40)),
        ("e", at_edge(directional=0.20)),
    ]
    assert keep_and_rank(samples, EDGE, keep_best=4) == ["b", "d", "a", "c"]
    assert keep_and_rank(samples, EDGE, keep_best=10) == ["b", "d", "a", "c", "e"]
    assert keep_and_rank(samples, EDGE, keep_best=1) == ["b"]
    assert keep_and_rank(samples, EDGE, keep_best=0) == []
    assert keep_and_rank([], EDGE) == []
