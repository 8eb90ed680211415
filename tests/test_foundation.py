"""The offline model story: real CLIP tokenization, tiny models loadable with from_pretrained."""

import json

from worker.models.tokenizer import build_clip_tokenizer


def test_clip_tokenizer_is_the_real_one(tmp_path):
    tok = build_clip_tokenizer(tmp_path / "tok")
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77


def test_tiny_models_load_through_from_pretrained(tiny_models):
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(str(tiny_models["tiny-sd"]), safety_checker=None)
    ip = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(tiny_models["tiny-ip2p"]), safety_checker=None)
    assert sd.unet.config.in_channels == 4 and ip.unet.config.in_channels == 8
    assert sd.tokenizer("a photo of a cat").input_ids[-2] == 2368
    # cross-attention at three resolutions, as in SD-1.x
    assert sum(t.startswith("CrossAttn") for t in sd.unet.config.down_block_types) == 3
    assert json.loads((tiny_models["tiny-sd"] / "editserve_model.json").read_text())["random_weights"] is True


def test_registry_loads_by_name(tiny_models):
    from service.config import Settings
    from worker.models.registry import ModelRegistry

    reg = ModelRegistry(Settings(models_dir=tiny_models["tiny-sd"].parent))
    m = reg.get("tiny-sd")
    assert reg.get("tiny-sd") is m  # loaded once
    assert m.vae_scale_factor == 8 and m.max_tokens == 77
    emb = m.encode_text(["a cat", "a dog"])
    assert emb.shape == (2, 77, 32)
    assert type(m.new_scheduler("euler_a")).__name__ == "EulerAncestralDiscreteScheduler"
