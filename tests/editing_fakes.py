"""A stand-in for ``LoadedModel`` without networks, for unit tests of the per-job sampler states.

Real diffusers schedulers and image processor; a VAE whose latent is a pooled picture of the pixels; text
"embeddings" that tell texts apart. Building one costs microseconds, so state arithmetic (rows, guidance,
steps, previews) can be checked against hand-computed values without loading a model.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from worker.models.registry import make_scheduler

EMBED_DIM = 8


def text_embedding(text: str) -> torch.Tensor:
    """(77, D) filled with a value that differs between the texts the tests use ("" gives zeros)."""
    return torch.full((77, EMBED_DIM), float(sum(map(ord, text)) % 997))


class FakeVae:
    config = SimpleNamespace(latent_channels=4, scaling_factor=0.5)
    dtype = torch.float32

    def encode(self, pixels: torch.Tensor):
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)  # (n, 3, h, w)
        latent = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: latent))


class FakeModel:
    vae_scale_factor = 8

    def __init__(self, dtype: torch.dtype = torch.float64, device: str = "cpu"):
        from diffusers.image_processor import VaeImageProcessor

        self.device, self.dtype = torch.device(device), dtype
        self.vae = FakeVae()
        self.pipe = SimpleNamespace(image_processor=VaeImageProcessor(vae_scale_factor=8))
        self.spec = SimpleNamespace(name="fake-model")
        self.tokenizer = None

    def new_scheduler(self, name: str):
        return make_scheduler(name, {})

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([text_embedding(p) for p in prompts]).to(self.dtype)
