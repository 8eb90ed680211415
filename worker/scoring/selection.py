"""The InstructPix2Pix dataset filter: which generated samples of one caption pair are kept, in which order.

Plain Python (no torch): the dataset driver applies it to scores read back from finished edits.

The rule (the reference's ``generate_img_dataset.py``): a sample is kept when *all four* CLIP scores reach
their thresholds — image–image, directional, and both image–caption similarities (one threshold for the
two) — and the survivors are ranked by directional similarity, highest first, keeping the best ``keep_best``.
Comparisons are ``>=`` (a score exactly at its threshold passes); a NaN score fails every comparison.
Ties in directional similarity keep the sample order (lower sample index first), so a rerun picks the same.

Thresholds: the reference script's defaults are image–image 0.70, captions 0.2, directional 0.2; the
paper's appendix states image–image 0.75 (see ``PAPER_THRESHOLDS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar


@dataclass(frozen=True)
class Thresholds:
    image_image: float = 0.70
    image_caption: float = 0.20
    directional: float = 0.20


CODE_THRESHOLDS = Thresholds()
PAPER_THRESHOLDS = Thresholds(image_image=0.75)
KEEP_BEST = 4


@dataclass(frozen=True)
class PairScores:
    """The four CLIP scores of one (input image, edited image) pair."""

    image_image: float  # cos(E(img_0), E(img_1)): consistency with the input
    input_caption: float  # cos(E(img_0), E(caption_in))
    output_caption: float  # cos(E(img_1), E(caption_out))
    directional: float  # cos(E(img_1) - E(img_0), E(caption_out) - E(caption_in))

    def as_dict(self) -> dict[str, float]:
        return {"image_image": self.image_image, "input_caption": self.input_caption,
                "output_caption": self.output_caption, "directional": self.directional}


def passes(scores: PairScores, thresholds: Thresholds = CODE_THRESHOLDS) -> bool:
    return (scores.image_image >= thresholds.image_image
            and scores.directional >= thresholds.directional
            and scores.input_caption >= thresholds.image_caption
            and scores.output_caption >= thresholds.image_caption)


T = TypeVar("T")


def keep_and_rank(samples: Sequence[tuple[T, PairScores]], thresholds: Thresholds = CODE_THRESHOLDS,
                  keep_best: int = KEEP_BEST) -> list[T]:
    """The kept samples' items, best directional similarity first, at most ``keep_best``."""
    survivors = [(i, item, s) for i, (item, s) in enumerate(samples) if passes(s, thresholds)]
    survivors.sort(key=lambda t: (-t[2].directional, t[0]))
    return [item for _, item, _ in survivors[:max(0, keep_best)]]
