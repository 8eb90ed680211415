"""Token-level correspondences between a source prompt and a target prompt.

Replace (word swap) pairs the n-th word of both prompts; refine (added words) aligns the whole
token sequences. Both say, for each target token, which source attention column it inherits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.editing.jobs import EditValidationError
from worker.editing.words import prompt_token_ids, word_token_spans

MATCH, MISMATCH, GAP = 1, -1, 0
# traceback moves, in the reference's tie order: left beats up beats diagonal
_LEFT, _UP, _DIAG, _STOP = 1, 2, 3, 4


def _one_replace_mapper(source: str, target: str, tokenizer, max_len: int, target_index: int | None) -> torch.Tensor:
    src_spans = word_token_spans(source, tokenizer)
    tgt_spans = word_token_spans(target, tokenizer)
    if len(src_spans) != len(tgt_spans):
        which = "target prompt" if target_index is None else f"target prompt {target_index}"
        raise EditValidationError(
            "target_prompts",
            f"replace swaps words one for one, so both prompts need the same number of words: "
            f"the source prompt has {len(src_spans)} words, the {which} has {len(tgt_spans)}",
        )
    mapper = torch.zeros(max_len, max_len)
    mapper[0, 0] = 1.0  # start token
    for src, tgt in zip(src_spans, tgt_spans):
        if len(src) == len(tgt):
            mapper[src, tgt] = 1.0
        elif not src or not tgt:
            raise EditValidationError("target_prompts", "replace cannot map a word that has no tokens")
        else:  # every source piece feeds every target piece; 1 → 2 tokens splits 0.5 / 0.5
            mapper[torch.tensor(src)[:, None], torch.tensor(tgt)[None, :]] = 1.0 / len(tgt)
    # end token and padding keep their order after the words, shifted by the token-count difference
    # (the reference maps (j, j) here after a length-changing swap: a bug we do not copy)
    i = 1 + sum(len(s) for s in src_spans)
    j = 1 + sum(len(t) for t in tgt_spans)
    steps = min(max_len - i, max_len - j)
    if steps > 0:
        mapper[torch.arange(i, i + steps), torch.arange(j, j + steps)] = 1.0
    return mapper


def replace_mapper(source: str, target: str | Sequence[str], tokenizer, max_len: int = 77) -> torch.Tensor:
    """Word-swap mapper M (max_len × max_len), ``M[w, n]`` = share of source token w in target token n.

    A list of targets gives a stacked (N, max_len, max_len) tensor. Different word counts raise
    ``EditValidationError("target_prompts", ...)`` naming both counts.
    """
    if isinstance(target, str):
        return _one_replace_mapper(source, target, tokenizer, max_len, None)
    return torch.stack([_one_replace_mapper(source, t, tokenizer, max_len, k) for k, t in enumerate(target)])


def global_align(x: Sequence[int], y: Sequence[int]) -> list[list[int]]:
    """Needleman–Wunsch traceback table (gap 0, match +1, mismatch −1), ties left > up > diagonal."""
    rows, cols = len(x) + 1, len(y) + 1
    score = [[0] * cols for _ in range(rows)]
    trace = [[_LEFT] * cols for _ in range(rows)]
    for i in range(1, rows):
        score[i][0] = i * GAP
        trace[i][0] = _UP
    for j in range(1, cols):
        score[0][j] = j * GAP
    trace[0][0] = _STOP
    for i in range(1, rows):
        xi, prev, cur = x[i - 1], score[i - 1], score[i]
        for j in range(1, cols):
            left = cur[j - 1] + GAP
            up = prev[j] + GAP
            diag = prev[j - 1] + (MATCH if xi == y[j - 1] else MISMATCH)
            best = max(left, up, diag)
            cur[j] = best
            trace[i][j] = _LEFT if best == left else _UP if best == up else _DIAG
    return trace


def align_target_to_source(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """For each token of ``y``, the aligned index in ``x`` or −1 (a token new in ``y``)."""
    trace = global_align(x, y)
    i, j = len(x), len(y)
    mapped: list[int] = []
    while i > 0 or j > 0:
        move = trace[i][j]
        if move == _DIAG:
            i, j = i - 1, j - 1
            mapped.append(i)
        elif move == _LEFT:
            j -= 1
            mapped.append(-1)
        elif move == _UP:
            i -= 1
        else:
            break
    mapped.reverse()
    return mapped


def _one_refine_mapper(source: str, target: str, tokenizer, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = prompt_token_ids(source, tokenizer)
    y = prompt_token_ids(target, tokenizer)
    aligned = align_target_to_source(x, y)[:max_len]
    mapper = torch.arange(max_len, dtype=torch.int64)  # past the target's end: position n ← n
    alphas = torch.ones(max_len)
    mapper[: len(aligned)] = torch.tensor(aligned, dtype=torch.int64)
    alphas[: len(aligned)] = (mapper[: len(aligned)] != -1).float()
    return mapper, alphas


def refine_mapper(
    source: str, target: str | Sequence[str], tokenizer, max_len: int = 77
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refinement alignment: (mapper int64, alphas float), each (max_len,) or (N, max_len) for a list.

    ``mapper[n]`` = source column for target token n (−1 = new token, ``alphas[n]`` = 0: it keeps
    its own attention); positions past the target's length map to themselves with alpha 1.
    """
    if isinstance(target, str):
        return _one_refine_mapper(source, target, tokenizer, max_len)
    pairs = [_one_refine_mapper(source, t, tokenizer, max_len) for t in target]
    return torch.stack([m for m, _ in pairs]), torch.stack([a for _, a in pairs])
