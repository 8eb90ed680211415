"""Words → CLIP token positions, robust where the reference's ``get_word_inds`` is not.

Why: every P2P edit (per-word schedules, reweighting, local blend, the replace mapper) addresses
attention columns by token position. The reference matches decoded token lengths against
space-split words, so case, punctuation glued to a word ("cat,") and double spaces silently give
wrong or empty indices. Here a word is tokenised on its own and searched as a token-id
subsequence that starts and ends on pre-token boundaries (CLIP marks a pre-token's last piece with
``</w>``), which is exact because CLIP's BPE never crosses a pre-token boundary.
"""

from __future__ import annotations

from worker.editing.jobs import EditValidationError

WORD_END = "</w>"


def prompt_token_ids(prompt: str, tokenizer) -> list[int]:
    """All token ids of ``prompt`` including start and end tokens, never truncated or padded."""
    return list(tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids)


def max_tokens(tokenizer) -> int:
    """The text encoder's sequence length (77 for CLIP), start and end tokens included."""
    return int(getattr(tokenizer, "model_max_length", 77) or 77)


def check_prompt_length(prompt: str, tokenizer, field: str) -> list[int]:
    """Token ids of ``prompt``; refuses prompts the text encoder would silently truncate."""
    ids = prompt_token_ids(prompt, tokenizer)
    limit = max_tokens(tokenizer)
    if len(ids) > limit:
        raise EditValidationError(
            field, f"prompt has {len(ids)} tokens including start/end; the limit is {limit}: shorten it"
        )
    return ids


def _word_ids(text: str, tokenizer) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)


def _starts_pretoken(tokens: list[str], position: int) -> bool:
    """A match may only start where the previous token closed a pre-token (or after the start token)."""
    return position <= 1 or tokens[position - 1].endswith(WORD_END)


def token_indices(prompt: str, word: str, tokenizer, field: str = "word") -> list[int]:
    """Positions (start token = 0) of every occurrence of ``word`` in ``prompt``.

    Case-insensitive (CLIP lowercases), punctuation attached to words is its own token so "cat"
    is found in "a cat, sitting", multi-token words and multi-word phrases give all their tokens.
    A word that does not occur raises ``EditValidationError(field, ...)``: a silent miss would turn
    the edit into a no-op.
    """
    if not isinstance(word, str) or not word.strip():
        raise EditValidationError(field, f"expected a non-empty word, got {word!r}")
    needle = _word_ids(word.strip(), tokenizer)
    ids = prompt_token_ids(prompt, tokenizer)
    if not needle:
        raise EditValidationError(field, f"{word!r} has no tokens")
    tokens = tokenizer.convert_ids_to_tokens(ids)
    n = len(needle)
    found: list[int] = []
    for start in range(1, len(ids) - n):  # skip the start and end tokens
        if ids[start : start + n] == needle and _starts_pretoken(tokens, start):
            found.extend(range(start, start + n))
    if not found:
        raise EditValidationError(field, f"{word!r} is not a word of the prompt {prompt!r}")
    return sorted(set(found))


def word_token_spans(prompt: str, tokenizer) -> list[list[int]]:
    """Token positions of each whitespace-separated word of ``prompt`` (start token = 0).

    Why per word: the replace mapper pairs the n-th word of the source with the n-th of the
    target. Double spaces do not create empty words (a reference pitfall).
    """
    spans: list[list[int]] = []
    position = 1
    all_ids: list[int] = []
    for word in prompt.split():
        ids = _word_ids(word, tokenizer)
        spans.append(list(range(position, position + len(ids))))
        position += len(ids)
        all_ids.extend(ids)
    if all_ids != prompt_token_ids(prompt, tokenizer)[1:-1]:
        raise RuntimeError(f"tokenizing {prompt!r} word by word differs from tokenizing it whole")
    return spans


def decoded_tokens(prompt: str, tokenizer) -> list[str]:
    """Readable caption per token of ``prompt``, start and end tokens included (attention-map tiles)."""
    return [tokenizer.decode([i]).strip() for i in prompt_token_ids(prompt, tokenizer)]
