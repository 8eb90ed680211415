"""Word → token positions on the real CLIP tokenizer (vectors V1/V2 of p2p-reference.md)."""

import pytest

from worker.editing.jobs import EditValidationError
from worker.editing.words import (
    check_prompt_length,
    decoded_tokens,
    prompt_token_ids,
    token_indices,
    word_token_spans,
)
from worker.models.tokenizer import build_clip_tokenizer

SQUIRREL = "A painting of a squirrel eating a burger"
LASAGNE = "A painting of a squirrel eating a lasagne"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def test_tokenisation_vectors(tok):
    assert prompt_token_ids(SQUIRREL, tok) == [49406, 320, 3086, 539, 320, 14004, 4371, 320, 6548, 49407]
    assert prompt_token_ids(LASAGNE, tok)[-3:] == [31210, 1422, 49407]
    assert prompt_token_ids("pea soup with croutons", tok) == [49406, 13915, 7077, 593, 1075, 1130, 708, 49407]
    assert prompt_token_ids("fried potatos", tok) == [49406, 7310, 5975, 1299, 49407]


@pytest.mark.parametrize(
    "prompt, word, expected",
    [
        (SQUIRREL, "squirrel", [5]),
        (LASAGNE, "lasagne", [8, 9]),
        ("pea soup with croutons", "croutons", [4, 5, 6]),
        ("fried potatos", "potatos", [2, 3]),
        ("a cat's toy", "toy", [4]),
        ("a cat's toy", "cat", [2]),
        ("a cat, sitting", "cat,", [2, 3]),  # the reference's own spelling still works
        ("A painting of a cat", "Painting", [2]),
        ("an x-ray of ice cream", "x-ray", [2, 3, 4]),
        ("an x-ray of ice cream", "ice cream", [6, 7]),  # a phrase gives all its tokens
    ],
)
def test_word_indices_match_reference_vectors(tok, prompt, word, expected):
    assert token_indices(prompt, word, tok) == expected


def test_reference_pitfalls_are_fixed(tok):
    # case-insensitive and every occurrence (the reference gives [4, 7] for "a" and [1] for "A")
    assert token_indices(SQUIRREL, "a", tok) == [1, 4, 7]
    assert token_indices(SQUIRREL, "A", tok) == [1, 4, 7]
    # punctuation glued to a word (reference: [])
    assert token_indices("a cat, sitting", "cat", tok) == [2]
    # double spaces do not shift later words (reference: "cat" → [3], "sitting" → [])
    assert token_indices("a  cat sitting", "cat", tok) == [2]
    assert token_indices("a  cat sitting", "sitting", tok) == [3]


def test_unknown_word_is_refused_with_the_field_name(tok):
    with pytest.raises(EditValidationError) as err:
        token_indices(SQUIRREL, "tiger", tok, field="reweight")
    assert err.value.field == "reweight" and "tiger" in err.value.message
    with pytest.raises(EditValidationError):
        token_indices("a bobcat", "cat", tok)  # a match must start on a word boundary
    with pytest.raises(EditValidationError):
        token_indices(SQUIRREL, "  ", tok)


def test_word_spans_follow_whitespace_words(tok):
    assert word_token_spans(LASAGNE, tok) == [[1], [2], [3], [4], [5], [6], [7], [8, 9]]
    assert word_token_spans("a  cat, sitting", tok) == [[1], [2, 3], [4]]


def test_decoded_tokens_include_start_and_end(tok):
    assert decoded_tokens("a cat", tok) == ["<|startoftext|>", "a", "cat", "<|endoftext|>"]


def test_prompt_length_limit_counts_start_and_end(tok):
    check_prompt_length(" ".join(["cat"] * 75), tok, "source_prompt")  # 77 tokens: fits
    with pytest.raises(EditValidationError) as err:
        check_prompt_length(" ".join(["cat"] * 76), tok, "target_prompts")
    assert err.value.field == "target_prompts" and "78" in err.value.message


def test_refusals_say_exactly_what_is_wrong(tok):
    cases = [("  ", "expected a non-empty word, got '  '"), (5, "expected a non-empty word, got 5"),
             ("tiger", f"'tiger' is not a word of the prompt {SQUIRREL!r}")]
    for word, message in cases:
        with pytest.raises(EditValidationError) as err:
            token_indices(SQUIRREL, word, tok, field="local_blend.source_words")
        assert err.value.field == "local_blend.source_words" and err.value.message == message
    with pytest.raises(EditValidationError) as err:
        check_prompt_length(" ".join(["cat"] * 76), tok, "source_prompt")
    assert err.value.message == "prompt has 78 tokens including start/end; the limit is 77: shorten it"


def test_max_tokens_reads_the_tokenizer_and_defaults_to_77(tok):
    from types import SimpleNamespace

    from worker.editing.words import max_tokens

    assert max_tokens(tok) == 77
    assert max_tokens(SimpleNamespace(model_max_length=64)) == 64
    assert max_tokens(SimpleNamespace(model_max_length=None)) == 77
    assert max_tokens(SimpleNamespace()) == 77


def test_the_last_word_and_repeated_phrases_are_found(tok):
    assert token_indices(SQUIRREL, "burger", tok) == [8]
    assert token_indices("a red car and a red car", "red car", tok) == [2, 3, 6, 7]
    assert check_prompt_length("a cat", tok, "source_prompt") == prompt_token_ids("a cat", tok)


def test_a_match_cannot_start_inside_the_first_word(tok):
    # "lasagne" is 'lasag' + 'ne</w>' and "ne" alone is that same 'ne</w>' id: its only candidate sits at
    # position 2, right after an unfinished pre-token, so it is no word of the prompt
    assert prompt_token_ids("ne", tok)[1:-1] == prompt_token_ids("lasagne", tok)[2:-1]
    with pytest.raises(EditValidationError):
        token_indices("lasagne", "ne", tok)
    assert token_indices("ne lasagne", "ne", tok) == [1]


def test_the_default_field_is_word(tok):
    with pytest.raises(EditValidationError) as err:
        token_indices(SQUIRREL, "tiger", tok)
    assert err.value.field == "word"


def test_a_word_without_tokens_is_refused_with_the_field_name(tok):
    class NoTokensFor:
        """The real tokenizer, except that one word tokenizes to nothing (the defensive branch)."""

        def __init__(self, word):
            self.word = word

        def __call__(self, text, **kw):
            out = tok(text, **kw)
            if text == self.word:
                out["input_ids"] = []
            return out

        def __getattr__(self, name):
            return getattr(tok, name)

    with pytest.raises(EditValidationError) as err:
        token_indices(SQUIRREL, " squirrel ", NoTokensFor("squirrel"), field="reweight")
    assert err.value.field == "reweight" and err.value.message == "' squirrel ' has no tokens"


class Tweaked:
    """The real tokenizer with one thing changed: its length limit, or the ids of one whole prompt."""

    def __init__(self, tok, model_max_length=77, whole=None, extra_id=None):
        self.tok, self.model_max_length, self.whole, self.extra_id = tok, model_max_length, whole, extra_id

    def __call__(self, text, **kw):
        out = self.tok(text, **kw)
        if text == self.whole and kw.get("add_special_tokens"):
            out["input_ids"] = [*out["input_ids"][:-1], self.extra_id, out["input_ids"][-1]]
        return out

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_the_start_and_end_tokens_are_never_words(tok):
    for special in ("<|startoftext|>", "<|endoftext|>"):
        with pytest.raises(EditValidationError):
            token_indices("a cat", special, tok)


def test_a_word_longer_than_the_encoder_is_searched_whole(tok):
    phrase = " ".join(["cat dog"] * 39)  # 78 tokens: cut to 77, it would still match, one token short
    assert token_indices(phrase, phrase, tok) == list(range(1, 79))


def test_the_prompt_limit_is_the_tokenizers_own(tok):
    short = Tweaked(tok, model_max_length=5)
    assert check_prompt_length("a b c", short, "source_prompt") == prompt_token_ids("a b c", tok)
    with pytest.raises(EditValidationError) as err:
        check_prompt_length("a b c d", short, "source_prompt")
    assert err.value.message == "prompt has 6 tokens including start/end; the limit is 5: shorten it"


def test_word_spans_refuse_a_prompt_that_tokenizes_differently_whole(tok):
    odd = Tweaked(tok, whole="a cat", extra_id=320)
    with pytest.raises(RuntimeError) as err:
        word_token_spans("a cat", odd)
    assert str(err.value) == "tokenizing 'a cat' word by word differs from tokenizing it whole"
