"""Prompt length in CLIP tokens at the gateway (``service.prompt_tokens``); that counting tokens never imports
torch is checked with the other layer rules in test_architecture.py."""

from __future__ import annotations


def test_lower_bound_never_exceeds_the_real_count():
    from service.config import Settings
    from service.prompt_tokens import PromptTokenCounter, lower_bound_tokens

    settings = Settings()
    counter = PromptTokenCounter(settings)
    spec = settings.model_catalog()["tiny-sd"]
    for text in ["a cat", "an astronaut's 3 dogs, watercolor!!", "über-cool ___ photo 2024", "a" * 60, "🙂 ok"]:
        real = counter.count(spec, text)
        if real.method != "lower-bound":
            assert lower_bound_tokens(text) <= real.tokens, text
