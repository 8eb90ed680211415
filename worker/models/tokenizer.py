"""Build the real 49,408-token CLIP BPE tokenizer offline.

Why: no weights can be downloaded, yet P2P's word indices and alignments must be tested on the
tokenization the production models use. The merges ship inside the PyPI package ``open-clip-torch``;
we read the data file without importing the package (its import pulls torchvision).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges; vocab = 2*256 bytes + merges + 2 specials


def _bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open-clip-torch is not installed; `pip install --no-deps open-clip-torch`")
    return Path(list(spec.submodule_search_locations)[0]) / BPE_FILE


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte→printable-character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` in the layout of openai/clip-vit-large-patch14."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m) for m in merges)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_path, merges_path


def build_clip_tokenizer(folder: Path):
    """Save a CLIPTokenizer to ``folder`` and load it back with ``from_pretrained(folder)``.

    Loading through ``from_pretrained`` matters: in transformers 5 building one from file arguments
    can silently give a 3-token vocabulary.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    write_clip_tokenizer_files(folder)
    config = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
    )
    tok = CLIPTokenizer.from_pretrained(str(folder))
    if len(tok) != 49408:
        raise RuntimeError(f"CLIP tokenizer built with {len(tok)} tokens, expected 49408")
    return tok
