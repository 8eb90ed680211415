"""Prompt length in CLIP tokens at the gateway (``service.prompt_tokens``) with each model's own tokenizer: a local
folder model, a hub-id model whose ``tokenizer/`` files come from the HF cache (``HF_HUB_OFFLINE=1``, a cache
laid out here as huggingface_hub writes it), and a hub id with no tokenizer anywhere: not ready, naming it. The
gateway is a real process (``service.serving``) on the real Redis and S3 endpoint. That counting tokens never
imports torch is checked with the other layer rules in test_architecture.py."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from devtools.devstack import LocalStack

# 40 words, 82 CLIP tokens ("photo" + "realistic" each): a count of one token per word would let it through
LONG_PROMPT = " ".join(["photorealistic"] * 40)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_cache_with_tokenizer(hf_home, repo_id: str, tokenizer_folder) -> None:
    """The layout huggingface_hub reads offline: hub/models--org--name/refs/main holds the commit, and
    snapshots/<commit>/ the files (``tokenizer/`` only, as ``allow_patterns`` fetches)."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(tokenizer_folder, repo / "snapshots" / COMMIT / "tokenizer")


@pytest.fixture
def gateway(redis_url, s3_server, tiny_models, tmp_path):
    """``gateway(models)``: a gateway process serving that explicit catalog, offline, with the HF cache above."""
    hf_home = tmp_path / "hf"
    hf_cache_with_tokenizer(hf_home, "acme/sd-hub", tiny_models["tiny-sd"] / "tokenizer")
    stacks = []

    def start(models: list[dict]) -> str:
        env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "EDITSERVE_MODELS": json.dumps(models),
               "EDITSERVE_DEFAULT_P2P_MODEL": models[0]["name"]}
        stack = LocalStack(redis_url=redis_url, s3=s3_server, models_dir=tmp_path / "no-models", extra_env=env)
        stacks.append(stack)
        return stack.start_gateway()

    yield start
    for stack in stacks:
        stack.stop()


def p2p(base: str, model: str, prompt: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/edits", json={"kind": "p2p", "model": model, "source_prompt": prompt,
                                                "target_prompts": [prompt], "steps": 2}, timeout=30)


def test_each_model_counts_with_its_own_tokenizer_and_one_without_is_not_ready(gateway, tiny_models):
    """One gateway process, four models: a local folder, a hub id in the HF cache, a model whose weights only workers
    have (tokenizer by hub id), and a hub id with no tokenizer anywhere."""
    local = {"name": "local-sd", "kind": "text2image", "source": str(tiny_models["tiny-sd"])}
    hub = {"name": "hub-sd", "kind": "text2image", "source": "acme/sd-hub"}
    elsewhere = {"name": "worker-only", "kind": "text2image", "source": "/models/not-on-this-machine",
                 "tokenizer": "acme/sd-hub"}
    missing = {"name": "hub-missing", "kind": "text2image", "source": "acme/not-in-the-cache"}
    base = gateway([local, hub, elsewhere, missing])

    ready = httpx.get(f"{base}/readyz", timeout=30)
    assert ready.status_code == 503, ready.text
    body = ready.json()
    assert body["error"]["type"] == "not_ready" and "'hub-missing'" in body["error"]["message"]
    tokenizers = body["checks"]["tokenizers"]
    assert "hub-missing" in tokenizers and "LocalEntryNotFoundError" in tokenizers
    assert not any(name in tokenizers for name in ("local-sd", "'hub-sd'", "worker-only"))  # those three loaded

    for model in ("local-sd", "hub-sd", "worker-only"):
        assert p2p(base, model, "a photo of a cat riding a bike").status_code == 202
        too_long = p2p(base, model, LONG_PROMPT)
        assert too_long.status_code == 422, too_long.text
        error = too_long.json()["error"]
        assert error["field"] == "source_prompt" and "82 CLIP tokens" in error["message"], error
        assert "counted by clip" in error["message"]

    refused = p2p(base, "hub-missing", "a photo of a cat")
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["field"] == "model" and "hub-missing" in refused.json()["error"]["message"]


def test_only_the_served_models_of_the_built_in_catalog_are_required(tiny_models):
    """The built-in catalog lists production hub models (sd14, ip2p) beside the tiny ones: a dev gateway needs the
    default models' tokenizers (and EDITSERVE_ENABLED_MODELS'), an explicit catalog needs every model's."""
    from service.config import ModelSpec, Settings
    from service.prompt_tokens import required_models

    built_in = Settings(models_dir=tiny_models["tiny-sd"].parent)
    assert required_models(built_in) == ["tiny-sd", "tiny-ip2p"]
    production = Settings(models_dir=tiny_models["tiny-sd"].parent, default_p2p_model="sd14",
                          default_ip2p_model="ip2p")
    assert required_models(production) == ["sd14", "ip2p"]
    explicit = Settings(models=[ModelSpec(name="a", kind="text2image", source="x/a"),
                                ModelSpec(name="b", kind="instruct", source="x/b")])
    assert required_models(explicit) == ["a", "b"]
