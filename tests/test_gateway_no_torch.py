"""The gateway must never import torch: it runs on small CPU pods next to the GPU workers."""

from __future__ import annotations

import subprocess
import sys

from gateway_support import REPO_ROOT


def test_gateway_import_and_prompt_validation_do_not_import_torch():
    code = (
        "import sys\n"
        "import service.app\n"
        "assert 'torch' not in sys.modules, 'importing service.app imported torch'\n"
        "from service.config import Settings\n"
        "from service.prompt_tokens import PromptTokenCounter\n"
        "settings = Settings()\n"
        "counter = PromptTokenCounter(settings)\n"
        "for name in ('tiny-sd', 'tiny-ip2p'):\n"
        "    count = counter.count(settings.model_catalog()[name], 'a photo of a cat riding a bike')\n"
        "    print(name, count.method, count.tokens)\n"
        "assert 'torch' not in sys.modules, 'loading the CLIP tokenizer imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # the real CLIP BPE: 8 words + start/end = 10 tokens, when the tiny models' tokenizer folders exist
    for line in result.stdout.splitlines():
        name, method, tokens = line.split()
        assert method in ("clip", "tokenizers", "lower-bound")
        if method != "lower-bound":
            assert tokens == "10"


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
