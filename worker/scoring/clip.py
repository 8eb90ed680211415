"""CLIP similarity scores, with images prepared exactly as InstructPix2Pix's ``ClipSimilarity`` does.

Image preparation (the reference's ``metrics/clip_similarity.py``): float pixels in [0, 1] (before any
8-bit rounding), resized with bicubic interpolation straight to the model's square input size (a squash,
no centre crop, ``align_corners=False``, no clamping of the overshoot), normalised with CLIP's mean and
std; image and text embeddings are L2-normalised. Text is tokenised to 77 positions, truncated.

The model is any CLIP that transformers' ``CLIPModel``/``CLIPTokenizer`` load with ``from_pretrained``:
``openai/clip-vit-large-patch14`` (ViT-L/14, the reference's model) by hub id or folder in production; the
tiny random CLIP built by ``worker.models.builders`` in tests (its scores are meaningless numbers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from worker.scoring.selection import PairScores

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ENCODE_CHUNK = 32  # images or texts per CLIP forward call


# ---------------------------------------------------------------------------------------------- formulas

def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity (``torch.nn.functional.cosine_similarity``, as the reference uses)."""
    return F.cosine_similarity(a, b, dim=-1)


def pair_scores(img_0: torch.Tensor, img_1: torch.Tensor, txt_0: torch.Tensor,
                txt_1: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four scores for rows of L2-normalised embeddings (input image, edited image, input/output caption).

    Directional similarity uses differences of the *normalised* embeddings (as the reference does).
    """
    return {
        "image_image": cosine(img_0, img_1),
        "input_caption": cosine(img_0, txt_0),
        "output_caption": cosine(img_1, txt_1),
        "directional": cosine(img_1 - img_0, txt_1 - txt_0),
    }


def image_image(img_0: torch.Tensor, img_1: torch.Tensor) -> torch.Tensor:
    return cosine(img_0, img_1)


def directional(img_0: torch.Tensor, img_1: torch.Tensor, txt_0: torch.Tensor, txt_1: torch.Tensor) -> torch.Tensor:
    return cosine(img_1 - img_0, txt_1 - txt_0)


def normalise(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------- the model

def _features(output) -> torch.Tensor:
    """transformers 4 returns the projected features; 5 returns an output whose ``pooler_output`` holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """A loaded CLIP plus the reference's image preparation; encodes in chunks, never one image at a time."""

    def __init__(self, source: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPModel, CLIPTokenizer

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device, dtype = "cpu", torch.float32
        self.source = source
        self.model = CLIPModel.from_pretrained(source, dtype=dtype).eval().requires_grad_(False).to(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(source)
        self.device = torch.device(device)
        self.dtype = dtype
        self.size = int(self.model.config.vision_config.image_size)  # 224 for ViT-L/14
        mean, std = _mean_std(source)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.max_tokens = min(77, int(self.model.config.text_config.max_position_embeddings))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) floats in [0, 1] → the model's input: bicubic squash to size², CLIP mean/std."""
        x = F.interpolate(images.to(self.device).float(), size=(self.size, self.size), mode="bicubic",
                          align_corners=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_prepared(self.prepare(images))

    @torch.no_grad()
    def encode_prepared(self, prepared: torch.Tensor) -> torch.Tensor:
        """Embeddings of images already through ``prepare`` (any mix of input sizes, once prepared)."""
        out = []
        for chunk in prepared.split(ENCODE_CHUNK):
            features = self.model.get_image_features(pixel_values=chunk.to(self.dtype))
            out.append(normalise(_features(features).float()))
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), ENCODE_CHUNK):
            tokens = self.tokenizer(list(texts[start:start + ENCODE_CHUNK]), padding="max_length",
                                    max_length=self.max_tokens, truncation=True, return_tensors="pt")
            features = self.model.get_text_features(input_ids=tokens.input_ids.to(self.device),
                                                    attention_mask=tokens.attention_mask.to(self.device))
            out.append(normalise(_features(features).float()))
        return torch.cat(out) if out else torch.empty(0)


def _mean_std(source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The folder's ``preprocessor_config.json`` mean/std when it has one, else OpenAI CLIP's."""
    config = Path(source) / "preprocessor_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        return tuple(data.get("image_mean", OPENAI_CLIP_MEAN)), tuple(data.get("image_std", OPENAI_CLIP_STD))
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def to_chw(pixels) -> torch.Tensor:
    """(N, H, W, 3) [0, 1] arrays (the core's decoded pixels) or 8-bit PIL images → (N, 3, H, W) floats."""
    if isinstance(pixels, np.ndarray) or isinstance(pixels, torch.Tensor):
        t = torch.as_tensor(np.asarray(pixels, dtype=np.float32))
        return t.permute(0, 3, 1, 2)
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in pixels]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------- batched requests

class ScoreRequest:
    """Pairs to score for one job: image pairs by index into ``images``, optional caption pairs.

    ``pairs`` holds (input index, output index, input caption, output caption); captions may be None
    (then only image–image is computed, e.g. an IP2P edit without captions).
    """

    def __init__(self, images: torch.Tensor, pairs: list[tuple[int, int, str | None, str | None]]):
        self.images = images
        self.pairs = pairs


def score_requests(scorer: ClipScorer, requests: Sequence[ScoreRequest]) -> list[list[dict[str, float]]]:
    """Every request's pair scores, with one chunked image pass and one text pass over all requests."""
    if not requests:
        return []
    offsets, total = [], 0
    for request in requests:
        offsets.append(total)
        total += request.images.shape[0]
    image_features = scorer.encode_prepared(torch.cat([scorer.prepare(r.images) for r in requests]))
    texts = sorted({t for r in requests for p in r.pairs for t in p[2:] if t is not None})
    text_index = {t: i for i, t in enumerate(texts)}
    text_features = scorer.encode_texts(texts) if texts else None
    out: list[list[dict[str, float]]] = []
    for request, offset in zip(requests, offsets):
        scores = []
        for i0, i1, cap_0, cap_1 in request.pairs:
            img_0, img_1 = image_features[offset + i0:offset + i0 + 1], image_features[offset + i1:offset + i1 + 1]
            if cap_0 is not None and cap_1 is not None and text_features is not None:
                txt_0 = text_features[text_index[cap_0]:text_index[cap_0] + 1]
                txt_1 = text_features[text_index[cap_1]:text_index[cap_1] + 1]
                scores.append({k: float(v.item()) for k, v in pair_scores(img_0, img_1, txt_0, txt_1).items()})
            else:
                scores.append({"image_image": float(image_image(img_0, img_1).item())})
        out.append(scores)
    return out


def as_pair_scores(scores: dict[str, float]) -> PairScores:
    return PairScores(image_image=scores["image_image"], input_caption=scores["input_caption"],
                      output_caption=scores["output_caption"], directional=scores["directional"])
