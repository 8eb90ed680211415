"""Count CLIP tokens of a prompt in the gateway, without torch.

Why: a prompt over 77 tokens is silently truncated by the text encoder, and P2P's word indices past the
cut then point nowhere. The gateway must refuse it before queueing.

Which counter is used, per model:
1. ``transformers.CLIPTokenizer`` loaded from the model's local ``tokenizer/`` folder (the model source
   folder, or ``models_dir/<name>/tokenizer``). Importing it does not import torch (a test checks this).
2. If transformers is not installed, the ``tokenizers`` library's ``Tokenizer`` from ``tokenizer.json``
   in that folder (same ids: the fast CLIP tokenizer is built from it).
3. No local tokenizer (e.g. a hub id whose weights only the GPU worker downloads): a conservative
   *lower bound* — every CLIP pre-token (a run of letters, a single digit, a run of other symbols) is at
   least one BPE token, plus start/end. It never rejects a prompt that fits; a longer prompt that slips
   through is truncated by the encoder, as diffusers does.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from service.config import ModelSpec, Settings

log = logging.getLogger(__name__)

_PRE_TOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+", re.IGNORECASE)


@dataclass(frozen=True)
class TokenCount:
    tokens: int  # including the start and end tokens
    method: str  # "clip" | "tokenizers" | "lower-bound"


def lower_bound_tokens(text: str) -> int:
    return len(_PRE_TOKEN.findall(text.lower())) + 2


class PromptTokenCounter:
    """One tokenizer per model folder, loaded on first use and cached (thread-safe)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._counters: dict[str, Callable[[str], int] | None] = {}
        self._methods: dict[str, str] = {}
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Load every catalog model's tokenizer now (each takes a noticeable fraction of a second), so no submit
        waits for one."""
        for spec in self.settings.model_catalog().values():
            try:
                self._counter(spec)
            except Exception:  # a broken folder is reported again, as a 4xx-free fallback, at first use
                log.exception("tokenizer for %s not preloaded", spec.name)

    def tokenizer_folder(self, spec: ModelSpec) -> Path | None:
        for folder in (Path(spec.source) / "tokenizer", Path(self.settings.models_dir) / spec.name / "tokenizer"):
            try:
                if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
                    return folder
            except OSError:
                continue
        return None

    def count(self, spec: ModelSpec, text: str) -> TokenCount:
        counter = self._counter(spec)
        if counter is None:
            return TokenCount(lower_bound_tokens(text), "lower-bound")
        return TokenCount(counter(text), self._methods[spec.name])

    def _counter(self, spec: ModelSpec) -> Callable[[str], int] | None:
        with self._lock:
            if spec.name not in self._counters:
                self._counters[spec.name] = self._load(spec)
            return self._counters[spec.name]

    def _load(self, spec: ModelSpec) -> Callable[[str], int] | None:
        folder = self.tokenizer_folder(spec)
        method, counter = load_counter(str(folder)) if folder is not None else ("lower-bound", None)
        self._methods[spec.name] = method
        return counter


@lru_cache(maxsize=16)
def load_counter(folder: str) -> tuple[str, Callable[[str], int] | None]:
    """(method, counter) for a tokenizer folder; cached per process because loading one is slow."""
    try:
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(folder)
        tok.model_max_length = 10**9  # we count, never truncate: silence the over-length warning
        backend = getattr(tok, "backend_tokenizer", None)  # the same ids without the Python wrapper (faster)
        if backend is not None and backend.truncation is None:
            return "clip", lambda text: len(backend.encode(text).ids)
        return "clip", lambda text: len(tok(text, truncation=False)["input_ids"])
    except ImportError:
        pass
    except Exception as exc:
        log.warning("CLIPTokenizer from %s failed (%s); trying tokenizers", folder, exc)
    try:
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        fast.no_truncation()
        return "tokenizers", lambda text: len(fast.encode(text).ids)
    except Exception as exc:
        log.warning("no tokenizer in %s (%s); using the lower-bound check", folder, exc)
        return "lower-bound", None
