"""Compiling the UNet step once per worker: ``torch.compile`` (optionally with CUDA graphs), an on-disk cache,
and a warm-up over the row buckets.

Why: at small batch an SD step on a GPU is bound by the host launching kernels, not by the GPU. A compiled
UNet launches fused kernels; in ``reduce-overhead`` mode torch captures them as CUDA graphs (one replay per
step). Compiling costs seconds to minutes, so it is paid at worker start for each configured row bucket
(``buckets``), and inductor's artefacts are cached on disk so a restarted worker is ready fast.

What stays eager: the P2P attention hook (``P2PAttnProcessor.attend``) runs outside the compiled graphs, so
per-job controllers never become guards (a recompile per job); the tensor controllers keep that hook free of
host reads. The per-job row-vector GEMMs (``batch.PerJobRowVectors``, a CPU bit-exactness device) are not
used under compilation, so batched results there equal alone within the tests' tolerance, not bit for bit.
On the CPU everything runs uncompiled by default and gives the same results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

COMPILE_CHOICES = ("auto", "on", "off")
AUTO_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)  # a P2P pair is 4 rows, an IP2P cell 3


@dataclass(frozen=True)
class StepAcceleration:
    """How a worker runs its UNet step (from ``WorkerSettings``; the defaults run everything eager)."""

    compile: str = "off"  # "auto": compile on CUDA devices only; "on"; "off"
    compile_mode: str = "max-autotune-no-cudagraphs"  # torch.compile mode when CUDA graphs are off
    cuda_graphs: bool = False  # compiling on a CUDA device: capture the step as CUDA graphs ("reduce-overhead")
    row_buckets: tuple[int, ...] = ()  # pad each UNet call up to a bucket (buckets.bucket_for)
    cache_dir: str | None = None  # inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR)
    backend: str = "inductor"  # torch.compile backend; tests use "aot_eager" (same graphs and guards, no codegen)

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {COMPILE_CHOICES}, got {self.compile!r}")

    def compiles_on(self, device: torch.device | str) -> bool:
        if self.compile == "auto":
            return torch.device(device).type == "cuda"
        return self.compile == "on"

    def mode_on(self, device: torch.device | str) -> str:
        """``reduce-overhead`` (CUDA graphs) when asked for and on CUDA; the configured mode otherwise."""
        if self.cuda_graphs and torch.device(device).type == "cuda":
            return "reduce-overhead"
        return self.compile_mode

    def tensor_controllers_on(self, device: torch.device | str) -> bool:
        """Compiled steps take the tensor-indexed P2P decisions; eager ones keep the host-side controllers."""
        return self.compiles_on(device)

    @classmethod
    def from_settings(cls, worker_settings: Any, device: torch.device | str = "cpu") -> StepAcceleration:
        """From ``WorkerSettings``; ``row_buckets="auto"`` means ``AUTO_BUCKETS`` when compiling on ``device``."""
        from worker.editing.buckets import parse_buckets

        made = cls(compile=worker_settings.compile, compile_mode=worker_settings.compile_mode,
                   cuda_graphs=worker_settings.cuda_graphs, cache_dir=worker_settings.inductor_cache_dir)
        buckets = worker_settings.row_buckets
        if buckets == "auto":
            buckets = AUTO_BUCKETS if made.compiles_on(device) else ()
        return dataclasses.replace(made, row_buckets=parse_buckets(buckets))


def use_compile_cache(cache_dir: str | os.PathLike | None) -> None:
    """Point inductor's FX-graph and kernel caches at ``cache_dir`` (created), before anything compiles."""
    if not cache_dir:
        return
    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    try:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
    except Exception:  # noqa: BLE001 — an old torch without the flag: the env vars still apply
        pass


_COMPILED: dict[tuple[int, str, str], Callable[..., Any]] = {}


def compiled_unet(unet: torch.nn.Module, mode: str, backend: str = "inductor") -> Callable[..., Any]:
    """``torch.compile(unet, mode=mode)``, made once per (UNet, mode, backend) and reused by every batch."""
    key = (id(unet), mode, backend)
    if key not in _COMPILED:
        _exclude_p2p_hook_from_graphs()
        options = {"mode": mode} if backend == "inductor" else {}  # modes are inductor's
        _COMPILED[key] = torch.compile(unet, backend=backend, dynamic=False, **options)
    return _COMPILED[key]


def _exclude_p2p_hook_from_graphs() -> None:
    """Run the P2P router and controllers eagerly (see the module docstring)."""
    from worker.editing.processor import P2PAttnProcessor

    if not getattr(P2PAttnProcessor.attend, "_editserve_eager", False):
        eager = torch.compiler.disable(P2PAttnProcessor.attend, recursive=True)
        eager._editserve_eager = True
        P2PAttnProcessor.attend = eager


def accelerated_unet(model, acceleration: StepAcceleration | None) -> Callable[..., Any] | None:
    """The compiled UNet for ``model`` when ``acceleration`` asks for it on the model's device, else None."""
    if acceleration is None or not acceleration.compiles_on(model.device):
        return None
    use_compile_cache(acceleration.cache_dir)
    return compiled_unet(model.unet, acceleration.mode_on(model.device), acceleration.backend)


@dataclass
class WarmUp:
    """What warming one model up cost: seconds per row bucket (the first includes compilation)."""

    model: str
    seconds: dict[int, float]

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


@torch.no_grad()
def warm_up(model, acceleration: StepAcceleration, *, height: int, width: int,
            buckets: Sequence[int] | None = None, calls: int = 2) -> WarmUp:
    """Run the (compiled) UNet at every bucket's row count so compilation and graph capture happen now,
    not in a user's first step. Inputs are zeros: only the shapes matter. A text-to-image model is warmed
    with the UNet's own processors and again with the P2P hook installed (P2P jobs run that graph).
    Returns seconds per bucket, both passes together."""
    unet = accelerated_unet(model, acceleration)
    unet = model.unet if unet is None else unet
    hooked = (False, True) if getattr(model.spec, "kind", None) == "text2image" else (False,)
    rows_list = list(buckets if buckets is not None else acceleration.row_buckets) or [1]
    f = model.vae_scale_factor
    config = model.unet.config
    seconds: dict[int, float] = {}
    text_dim = config.cross_attention_dim
    text_len = getattr(model, "max_tokens", 77)
    for rows in rows_list:
        sample = torch.zeros(rows, config.in_channels, height // f, width // f, device=model.device,
                             dtype=model.dtype)
        timesteps = torch.full((rows,), 999, device=model.device, dtype=torch.long)
        text = torch.zeros(rows, text_len, text_dim, device=model.device, dtype=model.dtype)
        started = time.perf_counter()
        for with_hook in hooked:
            with _p2p_hook(model.unet, with_hook):
                for _ in range(calls):
                    unet(sample, timesteps, encoder_hidden_states=text, return_dict=False)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        seconds[rows] = time.perf_counter() - started
    result = WarmUp(getattr(model.spec, "name", "?"), seconds)
    log.info("warm-up of %s: %.1f s over buckets %s", result.model, result.total_seconds, rows_list)
    return result


@contextlib.contextmanager
def _p2p_hook(unet, install: bool):
    """The P2P processors with no job routed (every row takes SDPA), restored afterwards."""
    if not install:
        yield
        return
    from worker.editing.processor import install_shared_p2p_processors

    _, previous = install_shared_p2p_processors(unet)
    try:
        yield
    finally:
        unet.set_attn_processor(previous)
