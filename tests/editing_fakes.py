"""A stand-in for ``LoadedModel`` without networks, for unit tests of the per-job sampler states.

Real diffusers schedulers and image processor; a VAE whose latent is a pooled picture of the pixels; text
"embeddings" that tell texts apart. Building one costs microseconds, so state arithmetic (rows, guidance,
steps, previews) can be checked against hand-computed values without loading a model.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

# at import, not at first use: diffusers loads these lazily (seconds), and mutmut's fork server imports the tests
# once for every mutant's child
from diffusers import (  # noqa: F401
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.image_processor import VaeImageProcessor

from worker.models.registry import make_scheduler

EMBED_DIM = 8


def text_embedding(text: str) -> torch.Tensor:
    """(77, D) filled with a value that differs between the texts the tests use ("" gives zeros)."""
    return torch.full((77, EMBED_DIM), float(sum(map(ord, text)) % 997))


class FakeVae:
    """encode: pooled pixels plus their mean as a 4th channel; decode: latent channels 0-2 as pixels, 8× nearest
    upsampled. ``decoded`` records the batch size of every decode call. Refuses input of another dtype, as a
    convolution does."""

    config = SimpleNamespace(latent_channels=4, scaling_factor=0.5)
    dtype = torch.float32

    def __init__(self):
        self.decoded: list[int] = []

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        if latents.dtype != self.dtype:
            raise RuntimeError(f"input {latents.dtype} and weights {self.dtype} differ")
        self.decoded.append(latents.shape[0])
        return (latents[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2),)  # DecoderOutput[0] too

    def encode(self, pixels: torch.Tensor):
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)  # (n, 3, h, w)
        latent = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: latent))


class FakeModel:
    vae_scale_factor = 8

    def __init__(self, dtype: torch.dtype = torch.float64, device: str = "cpu", tokenizer=None):
        self.device, self.dtype = torch.device(device), dtype
        self.vae = FakeVae()
        self.pipe = SimpleNamespace(image_processor=VaeImageProcessor(vae_scale_factor=8))
        self.spec = SimpleNamespace(name="fake-model")
        self.tokenizer = tokenizer  # P2P controllers align words with it
        self.encoded: list[str] = []  # every text encoded, in order

    def new_scheduler(self, name: str):
        return make_scheduler(name, {})

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        self.encoded.extend(prompts)
        return torch.stack([text_embedding(p) for p in prompts]).to(device=self.device, dtype=self.dtype)
