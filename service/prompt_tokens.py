"""Count CLIP tokens of a prompt in the gateway, without torch.

Why: a prompt over 77 tokens is silently truncated by the text encoder, and P2P's word indices past the
cut then point nowhere. The gateway must refuse it before queueing, with the model's own tokenizer.

Where each model's tokenizer files come from (small: ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
``special_tokens_map.json``, ``tokenizer.json`` if any):
1. A local ``tokenizer/`` folder: the model source folder's, or ``models_dir/<name>/tokenizer``.
2. A hub id (``CompVis/stable-diffusion-v1-4``): only its ``tokenizer/`` subfolder, through ``huggingface_hub``
   (``snapshot_download`` with ``allow_patterns``), into the ordinary HF cache: ``HF_HOME`` / ``HF_HUB_CACHE``,
   ``HF_HUB_OFFLINE=1`` to use a pre-populated cache only, ``HF_TOKEN`` for gated repos.

They are loaded with ``transformers.CLIPTokenizer`` (its import does not import torch; a test checks this), or the
``tokenizers`` library from ``tokenizer.json`` when transformers is missing. There is no fallback: a model whose
tokenizer cannot be loaded is not served (503 ``not_ready`` naming ``model``), and when it is one the gateway must
serve (:func:`required_models`) ``/readyz`` says so, naming it. A failed load is tried again after
``RETRY_SECONDS`` (the hub may have been unreachable for a moment).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from editserve.contract import ErrorType
from service.config import ModelSpec, Settings
from service.errors import ApiError

log = logging.getLogger(__name__)

RETRY_SECONDS = 30.0
TOKENIZER_PATTERNS = ["tokenizer/*.json", "tokenizer/*.txt"]
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class TokenCount:
    tokens: int  # including the start and end tokens
    method: str  # "clip" | "tokenizers"


class TokenizerUnavailable(RuntimeError):
    def __init__(self, model: str, reason: str):
        super().__init__(f"{model}: {reason}")
        self.model, self.reason = model, reason


def required_models(settings: Settings) -> list[str]:
    """The models whose tokenizers the gateway must have to be ready: every model of an explicit
    ``EDITSERVE_MODELS`` catalog; with the built-in catalog, the default P2P and IP2P models plus
    ``EDITSERVE_ENABLED_MODELS`` (the built-in catalog also lists production hub models a dev box never serves)."""
    catalog = settings.model_catalog()
    if settings.models is not None:
        return list(catalog)
    names = [settings.default_p2p_model, settings.default_ip2p_model, *(settings.enabled_models or [])]
    return [name for name in dict.fromkeys(names) if name in catalog]


def _has_tokenizer_files(folder: Path) -> bool:
    try:
        return (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
    except OSError:
        return False


def is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.fullmatch(source)) and not Path(source).exists()


def hub_tokenizer_folder(repo_id: str) -> Path:
    """The repo's ``tokenizer/`` subfolder, downloaded alone (a few MB) or found in the HF cache."""
    from huggingface_hub import snapshot_download

    snapshot = Path(snapshot_download(repo_id, allow_patterns=TOKENIZER_PATTERNS))
    folder = snapshot / "tokenizer"
    if not _has_tokenizer_files(folder):
        raise FileNotFoundError(f"hub repo {repo_id!r} has no tokenizer/vocab.json or tokenizer/tokenizer.json")
    return folder


class PromptTokenCounter:
    """One tokenizer per model, loaded at start (:meth:`warm`) or on first use, and cached (thread-safe)."""

    def __init__(self, settings: Settings, retry_seconds: float = RETRY_SECONDS):
        self.settings = settings
        self.retry_seconds = retry_seconds
        self._counters: dict[str, tuple[str, Callable[[str], int]]] = {}
        self._failures: dict[str, tuple[float, str]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def warm(self) -> None:
        """Load the required models' tokenizers now (a fraction of a second each from disk; a download for a hub
        id), so no submit waits for one. Other catalog models load on first use."""
        catalog = self.settings.model_catalog()
        for name in required_models(self.settings):
            try:
                self._counter(catalog[name])
            except TokenizerUnavailable as exc:
                log.error("tokenizer for model %s not loaded: %s", name, exc.reason)

    def missing(self) -> dict[str, str]:
        """Required models without a tokenizer, with the reason (loading each one not tried yet)."""
        catalog = self.settings.model_catalog()
        missing = {}
        for name in required_models(self.settings):
            try:
                self._counter(catalog[name])
            except TokenizerUnavailable as exc:
                missing[name] = exc.reason
        return missing

    def tokenizer_folder(self, spec: ModelSpec) -> Path:
        """Local first (the source's ``tokenizer/``, ``models_dir/<name>/tokenizer``, ``spec.tokenizer`` as a
        folder), then the hub (``spec.tokenizer``, else the source, when it is a hub id)."""
        folders = [Path(spec.source) / "tokenizer", Path(self.settings.models_dir) / spec.name / "tokenizer"]
        if spec.tokenizer and not is_hub_id(spec.tokenizer):
            folders += [Path(spec.tokenizer) / "tokenizer", Path(spec.tokenizer)]
        for folder in folders:
            if _has_tokenizer_files(folder):
                return folder
        for source in (spec.tokenizer, spec.source):
            if source and is_hub_id(source):
                return hub_tokenizer_folder(source)
        raise FileNotFoundError(f"no tokenizer/ folder in {spec.source} or {self.settings.models_dir / spec.name}"
                                + (f" or {spec.tokenizer}" if spec.tokenizer else ""))

    def count(self, spec: ModelSpec, text: str) -> TokenCount:
        """The prompt's CLIP tokens (start and end included); 503 ``not_ready`` naming ``model`` when the model's
        tokenizer is not loaded (never a guess: a prompt must not be truncated silently)."""
        try:
            method, counter = self._counter(spec)
        except TokenizerUnavailable as exc:
            raise ApiError(503, f"model {spec.name!r} is not ready: its tokenizer could not be loaded ({exc.reason})",
                           type=ErrorType.not_ready, field="model",
                           headers={"Retry-After": str(int(self.retry_seconds))}) from None
        return TokenCount(counter(text), method)

    def _counter(self, spec: ModelSpec) -> tuple[str, Callable[[str], int]]:
        loaded = self._counters.get(spec.name)
        if loaded is not None:
            return loaded
        with self._guard:
            lock = self._locks.setdefault(spec.name, threading.Lock())
        with lock:  # one load per model at a time; other models' prompts are counted meanwhile
            loaded = self._counters.get(spec.name)
            if loaded is not None:
                return loaded
            failed = self._failures.get(spec.name)
            if failed is not None and time.monotonic() - failed[0] < self.retry_seconds:
                raise TokenizerUnavailable(spec.name, failed[1])
            try:
                loaded = load_counter(str(self.tokenizer_folder(spec)))
            except Exception as exc:  # noqa: BLE001 — hub errors, missing files, a broken vocab: all "not loaded"
                reason = f"{type(exc).__name__}: {exc}"[:500]
                self._failures[spec.name] = (time.monotonic(), reason)
                raise TokenizerUnavailable(spec.name, reason) from None
            self._failures.pop(spec.name, None)
            self._counters[spec.name] = loaded
            return loaded


@lru_cache(maxsize=16)
def load_counter(folder: str) -> tuple[str, Callable[[str], int]]:
    """(method, counter) for a tokenizer folder; cached per process because loading one is slow. Raises when
    the folder holds no loadable tokenizer."""
    try:
        from transformers import CLIPTokenizer
    except ImportError:
        CLIPTokenizer = None
    if CLIPTokenizer is not None:
        tok = CLIPTokenizer.from_pretrained(folder)
        tok.model_max_length = 10**9  # we count, never truncate: silence the over-length warning
        backend = getattr(tok, "backend_tokenizer", None)  # the same ids without the Python wrapper (faster)
        if backend is not None and backend.truncation is None:
            return "clip", lambda text: len(backend.encode(text).ids)
        return "clip", lambda text: len(tok(text, truncation=False)["input_ids"])
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    fast.no_truncation()
    return "tokenizers", lambda text: len(fast.encode(text).ids)
