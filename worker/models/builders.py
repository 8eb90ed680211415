"""Build randomly initialised, SD-1.x-shaped diffusers models and save them as normal folders.

Why: no weights can be downloaded here, but the serving code must load models exactly as it loads
``CompVis/stable-diffusion-v1-4`` or ``timbrooks/instruct-pix2pix`` — through ``from_pretrained``.
``tiny`` keeps SD's topology (4 UNet levels, cross-attention at 3 of them, an 8× VAE, a CLIP text
encoder with the real tokenizer) at toy widths; ``sd15-shaped`` has SD-1.5's real sizes, for GPU
speed and memory benchmarks. Random weights produce noise pictures: that is expected.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Literal

import torch

from worker.models.tokenizer import build_clip_tokenizer

Kind = Literal["text2image", "instruct"]
Shape = Literal["tiny", "sd15-shaped"]

_SHAPES = {
    "tiny": dict(
        unet_channels=(32, 32, 64, 64), layers_per_block=1, head_dim=8, text_dim=32, text_layers=2,
        text_heads=4, text_ffn=64, vae_channels=(16, 16, 32, 32), vae_layers=1, sample_size=16,
    ),
    "sd15-shaped": dict(
        unet_channels=(320, 640, 1280, 1280), layers_per_block=2, head_dim=8, text_dim=768, text_layers=12,
        text_heads=12, text_ffn=3072, vae_channels=(128, 256, 512, 512), vae_layers=2, sample_size=64,
    ),
}


def _make_unet(shape: dict, in_channels: int, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=shape["sample_size"],
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=shape["unet_channels"],
        layers_per_block=shape["layers_per_block"],
        attention_head_dim=shape["head_dim"],
        cross_attention_dim=shape["text_dim"],
        norm_num_groups=min(32, shape["unet_channels"][0]),
    )
    return unet


def _give_cross_attention_signal(unet, gain: float = 4.0) -> None:
    """Scale cross-attention query/key projections so that random maps are far from uniform.

    With a default init, softmax(QKᵀ) over 77 tokens is nearly flat and P2P edits move nothing
    measurable; sharper maps make tiny-model tests of attention injection meaningful.
    """
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(gain)
                module.to_k.weight.mul_(gain)


def _make_text_encoder(shape: dict, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=shape["text_dim"], intermediate_size=shape["text_ffn"],
        num_hidden_layers=shape["text_layers"], num_attention_heads=shape["text_heads"],
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        projection_dim=shape["text_dim"], hidden_act="quick_gelu",
    )
    model = CLIPTextModel(cfg)
    with torch.no_grad():  # distinct, well-spread token embeddings so words differ in attention
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    return model


def _make_vae(shape: dict, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=shape["vae_channels"], layers_per_block=shape["vae_layers"],
        norm_num_groups=min(32, shape["vae_channels"][0]),
        sample_size=shape["sample_size"] * 8,
    )


def _scheduler_for(kind: Kind):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if kind == "instruct":
        return EulerAncestralDiscreteScheduler(**common, steps_offset=1, timestep_spacing="linspace")
    return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_model(folder: Path, kind: Kind = "text2image", shape: Shape = "tiny", seed: int = 0,
                dtype: torch.dtype = torch.float32) -> Path:
    """Build one random SD-1.x-shaped pipeline and ``save_pretrained`` it into ``folder``."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline

    folder = Path(folder)
    dims = _SHAPES[shape]
    unet = _make_unet(dims, in_channels=8 if kind == "instruct" else 4, seed=seed)
    _give_cross_attention_signal(unet)
    tokenizer = build_clip_tokenizer(folder / "_tokenizer_build")
    pipe_cls = StableDiffusionInstructPix2PixPipeline if kind == "instruct" else StableDiffusionPipeline
    pipe = pipe_cls(
        vae=_make_vae(dims, seed + 1), text_encoder=_make_text_encoder(dims, seed + 2), tokenizer=tokenizer,
        unet=unet, scheduler=_scheduler_for(kind), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for leftover in (folder / "_tokenizer_build").glob("*"):
        leftover.unlink()
    (folder / "_tokenizer_build").rmdir()
    (folder / "editserve_model.json").write_text(json.dumps(
        {"kind": kind, "shape": shape, "seed": seed, "random_weights": True,
         "note": "randomly initialised: images are noise by design"}))
    return folder


TINY_MODELS: dict[str, Kind] = {"tiny-sd": "text2image", "tiny-ip2p": "instruct"}
TINY_CLIP = "tiny-clip"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny random CLIP (ViT image tower at 224 px, the real tokenizer), saved like
    ``openai/clip-vit-large-patch14``: ``CLIPModel``/``CLIPTokenizer.from_pretrained`` load either.

    Its scores are numbers from random weights: they exercise the code, not image quality.
    """
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=32,
    )
    model = CLIPModel(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer = build_clip_tokenizer(folder / "_tokenizer_build")
    tokenizer.save_pretrained(str(folder))
    for leftover in (folder / "_tokenizer_build").glob("*"):
        leftover.unlink()
    (folder / "_tokenizer_build").rmdir()
    (folder / "preprocessor_config.json").write_text(json.dumps({  # CLIPImageProcessor's fields, ViT-L/14 values
        "image_processor_type": "CLIPImageProcessor", "crop_size": {"height": 224, "width": 224},
        "size": {"shortest_edge": 224}, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "resample": 3, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}))
    (folder / "editserve_model.json").write_text(json.dumps(
        {"kind": "clip", "shape": "tiny", "seed": seed, "random_weights": True,
         "note": "randomly initialised: CLIP scores are meaningless numbers by design"}))
    return folder


def ensure_tiny_models(root: Path) -> dict[str, Path]:
    """Build the tiny models (and the tiny CLIP) under ``root`` unless a complete build is already there."""
    out = {}
    for name, kind in TINY_MODELS.items():
        folder = Path(root) / name
        if not (folder / "editserve_model.json").exists():
            build_model(folder, kind=kind, shape="tiny")
        out[name] = folder
    clip_folder = Path(root) / TINY_CLIP
    if not (clip_folder / "editserve_model.json").exists():
        build_clip(clip_folder)
    out[TINY_CLIP] = clip_folder
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build random-weight SD-1.x-shaped diffusers models (no download).")
    p.add_argument("--out", type=Path, default=None, help="folder for one model (with --kind/--shape)")
    p.add_argument("--kind", choices=["text2image", "instruct"], default="text2image")
    p.add_argument("--shape", choices=list(_SHAPES), default="tiny")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--tiny-root", type=Path, default=None, help="build both tiny models under this folder")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    if a.tiny_root:
        for name, folder in ensure_tiny_models(a.tiny_root).items():
            print(f"{name}: {folder}")
    elif a.out:
        build_model(a.out, kind=a.kind, shape=a.shape, dtype=getattr(torch, a.dtype))
        print(f"{a.shape} {a.kind}: {a.out}")
    else:
        p.error("give --out or --tiny-root")
    print(f"built in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
