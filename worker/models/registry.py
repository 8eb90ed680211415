"""Load servable models once and keep them: the worker's view of ``service.config.ModelSpec``.

Loading is plain diffusers ``from_pretrained`` on a hub id or a local folder, so the tiny random
models and real weights (``CompVis/stable-diffusion-v1-4``, ``timbrooks/instruct-pix2pix``) go
through the same code.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from service.config import ModelSpec, Settings, get_settings

_SCHEDULERS = {"ddim": "DDIMScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "pndm": "PNDMScheduler",
               "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
               "dpmpp_2m_karras": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}


def make_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler instance: every job in a batch owns one, so per-job state never leaks."""
    import diffusers

    if name not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {sorted(_SCHEDULERS)}")
    cls = getattr(diffusers, _SCHEDULERS[name])
    overrides: dict[str, Any] = {}
    if name == "ddim":  # the P2P null-text notebook's DDIM (deterministic, invertible)
        overrides = {"clip_sample": False, "set_alpha_to_one": False}
    if name == "euler_a":  # the IP2P repo's sampler; keep linspace spacing (init sigma = sigma_max)
        overrides = {"timestep_spacing": "linspace"}
    if name == "pndm":  # SD-1.4's own PNDM, the P2P stable notebook's: PLMS only, T + 1 UNet calls for T steps
        overrides = {"skip_prk_steps": True}
    if name.startswith("dpmpp_2m"):  # DPM-Solver++(2M): second order, one UNet call per step
        overrides = {"algorithm_type": "dpmsolver++", "solver_order": 2,
                     "use_karras_sigmas": name.endswith("_karras")}
    return cls.from_config(base_config, **overrides)


@dataclass
class LoadedModel:
    """A loaded pipeline plus what samplers need: components, dtype, device and latent geometry."""

    spec: ModelSpec
    pipe: Any
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def max_tokens(self) -> int:
        return self.pipe.tokenizer.model_max_length

    def new_scheduler(self, name: str | None = None):
        return make_scheduler(name or self.spec.scheduler, self.pipe.scheduler.config)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """CLIP embeddings of prompts padded to the tokenizer's 77 positions (as SD uses them)."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)


def load_pipeline(spec: ModelSpec):
    """``from_pretrained`` for the spec's kind; the safety checker is off (policy: service docs)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline

    cls = StableDiffusionInstructPix2PixPipeline if spec.kind == "instruct" else StableDiffusionPipeline
    dtype = getattr(torch, spec.dtype)
    device = spec.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
        dtype = torch.float32
    pipe = cls.from_pretrained(spec.source, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class ModelRegistry:
    """Name → LoadedModel, loading each model at most once per process."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()
        self.catalog = self.settings.model_catalog()
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        self._clip = None

    def spec(self, name: str) -> ModelSpec:
        if name not in self.catalog:
            raise KeyError(f"unknown model {name!r}; known: {sorted(self.catalog)}")
        return self.catalog[name]

    def get(self, name: str) -> LoadedModel:
        with self._lock:
            if name not in self._loaded:
                spec = self.spec(name)
                self._loaded[name] = LoadedModel(spec=spec, pipe=load_pipeline(spec))
            return self._loaded[name]

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def clip_scorer(self):
        """The CLIP of ``metrics`` and the dataset filter, loaded on first use (``settings.clip``)."""
        from worker.scoring.clip import ClipScorer

        with self._lock:
            if self._clip is None:
                clip = self.settings.clip
                self._clip = ClipScorer(self.settings.clip_source(), device=clip.device,
                                        dtype=getattr(torch, clip.dtype))
            return self._clip
