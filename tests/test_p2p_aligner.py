"""Replace / refine mappers and schedules on the real CLIP tokenizer (vectors V3–V6 of p2p-reference.md)."""

import pytest
import torch

from worker.editing.jobs import EditValidationError
from worker.editing.schedules import cross_alpha, self_range
from worker.editing.seq_aligner import align_target_to_source, refine_mapper, replace_mapper
from worker.models.tokenizer import build_clip_tokenizer

SQUIRREL = "A painting of a squirrel eating a burger"
LION = "A painting of a lion eating a burger"
LASAGNE = "A painting of a squirrel eating a lasagne"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def _diag(start: int, stop: int, shift: int = 0) -> list[tuple[int, int]]:
    return [(i, i + shift) for i in range(start, stop)]


def _ones(mapper: torch.Tensor) -> set[tuple[int, int]]:
    return {tuple(ij) for ij in (mapper == 1).nonzero().tolist()}


# --- replace ----------------------------------------------------------------------------------------

def test_equal_token_swap_is_identity(tok):
    assert torch.equal(replace_mapper(SQUIRREL, LION, tok), torch.eye(77))
    assert torch.equal(replace_mapper("a cat sitting", "a tiger sitting", tok), torch.eye(77))


def test_one_to_two_tokens_splits_half_half_and_keeps_end_token_order(tok):
    m = replace_mapper("A painting of a squirrel eating a burger", LASAGNE, tok)
    assert m[8, 8] == 0.5 and m[8, 9] == 0.5 and m[8].sum() == 1
    assert _ones(m) == set(_diag(0, 8)) | set(_diag(9, 76, shift=1))  # source EOT 9 → target EOT 10
    assert torch.allclose(m[:, :77].sum(0)[[8, 9]], torch.tensor([0.5, 0.5]))


def test_multi_token_swap_before_other_words_does_not_copy_the_reference_bug(tok):
    m = replace_mapper("a burger on a table", "a lasagne on a table", tok)
    assert m[2, 2] == m[2, 3] == 0.5
    # correct: 'on a table' + EOT shift by one (the reference writes M[j, j] and leaves row 3 empty)
    assert _ones(m) == {(0, 0), (1, 1)} | set(_diag(3, 76, shift=1))


def test_two_tokens_to_one_sums_both_pieces(tok):
    m = replace_mapper("a lasagne", "a cat", tok)
    assert m[2, 2] == 1 and m[3, 2] == 1 and m[3, 3] == 0  # no spurious (3, 3) of the reference
    assert _ones(m) == {(0, 0), (1, 1), (2, 2), (3, 2)} | set(_diag(4, 77, shift=-1))


def test_different_word_counts_are_refused_naming_both_counts(tok):
    with pytest.raises(EditValidationError) as err:
        replace_mapper("a cat", ["a dog", "a big dog"], tok)
    assert err.value.field == "target_prompts"
    assert "2 words" in err.value.message and "has 3" in err.value.message


def test_list_of_targets_stacks(tok):
    m = replace_mapper(SQUIRREL, [LION, LASAGNE], tok)
    assert m.shape == (2, 77, 77) and torch.equal(m[0], torch.eye(77))


# --- refine -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "source, target, mapper, zeros",
    [
        ("a cat", "a fluffy cat", [0, 1, -1, 2, 3], [2]),
        ("soup", "pea soup", [0, -1, 1, 2], [1]),
        ("soup", "pea soup with croutons", [0, -1, 1, -1, -1, -1, -1, 2], [1, 3, 4, 5, 6]),
        ("potatos", "fried potatos", [0, -1, 1, 2, 3], [1]),
        ("a photo of a house on a mountain", "a photo of a house on a mountain at fall",
         [0, 1, 2, 3, 4, 5, 6, 7, 8, -1, -1, 9], [9, 10]),
        (SQUIRREL, "A neoclassical painting of a squirrel eating a burger",
         [0, 1, -1, -1, 2, 3, 4, 5, 6, 7, 8, 9], [2, 3]),
        ("a cat sitting next to a mirror", "a silver cat sculpture sitting next to a mirror",
         [0, 1, -1, 2, -1, 3, 4, 5, 6, 7, 8], [2, 4]),
        ("a cat", "a dog", [0, 1, -1, 3], [2]),  # gap 0: a swapped word is delete + insert
        ("a fluffy cat", "a cat", [0, 1, 3, 4], []),
        ("a cat and a dog", "a dog", [0, 1, 5, 6], []),  # tie-break pairs the first 'a'
        ("a dog", "a cat and a dog", [0, 1, -1, -1, -1, 2, 3], [2, 3, 4]),
        (SQUIRREL, SQUIRREL, list(range(10)), []),
    ],
)
def test_refine_vectors(tok, source, target, mapper, zeros):
    m, a = refine_mapper(source, target, tok)
    n = len(mapper)
    assert m[:n].tolist() == mapper
    assert m[n:].tolist() == list(range(n, 77))  # past the target's end: n ← n, alpha 1
    expected_alpha = torch.ones(77)
    expected_alpha[zeros] = 0
    assert torch.equal(a, expected_alpha)
    assert m.dtype == torch.int64


def test_refine_fluffy_cat_full_vectors(tok):
    m, a = refine_mapper("a cat", "a fluffy cat", tok)
    assert m[:7].tolist() == [0, 1, -1, 2, 3, 5, 6] and a[:7].tolist() == [1, 1, 0, 1, 1, 1, 1]
    assert a.sum() == 76


def test_needleman_wunsch_tie_order_left_up_diagonal():
    assert align_target_to_source([5, 7, 5], [5]) == [0]  # ties go 'up' first: the first 5 is paired
    assert align_target_to_source([5], [5, 7, 5]) == [0, -1, -1]  # 'left' first: the first 5 is paired
    assert align_target_to_source([1, 2], [2, 1]) == [1, -1]  # LCS of length 1, the later pairing wins


def test_refine_list_stacks(tok):
    m, a = refine_mapper("a cat", ["a fluffy cat", "a cat"], tok)
    assert m.shape == a.shape == (2, 77)


# --- schedules --------------------------------------------------------------------------------------

def _rows(alpha_column: torch.Tensor) -> list[int]:
    return alpha_column.nonzero().flatten().tolist()


@pytest.mark.parametrize(
    "value, rows",
    [(0.8, range(40)), (0.4, range(20)), (0.5, range(25)), (0.2, range(10)), (1.0, range(51)),
     (0.0, range(0)), ((0.2, 0.6), range(10, 30)), ([0.2, 0.6], range(10, 30)), (1, range(51))],
)
def test_cross_alpha_vectors(tok, value, rows):
    alpha = cross_alpha(value, [LION], tok, num_steps=50)
    assert alpha.shape == (51, 1, 77)
    assert _rows(alpha[:, 0, 3]) == list(rows) and torch.equal(alpha[:, 0, 3:4].expand(51, 77), alpha[:, 0])


def test_cross_alpha_per_word(tok):
    steps = {"default_": 1.0, "lion": 0.4}
    for value in (steps, {"lion": 0.4}):
        alpha = cross_alpha(value, [LION], tok, num_steps=50)
        assert _rows(alpha[:, 0, 5]) == list(range(20))
        assert _rows(alpha[:, 0, 4]) == list(range(51))
    assert steps == {"default_": 1.0, "lion": 0.4}  # the caller's dict is not mutated
    two = cross_alpha({"default_": 0.8, "lion": (0.1, 0.3)}, [LION, SQUIRREL], tok, num_steps=50)
    assert _rows(two[:, 0, 5]) == list(range(5, 15)) and _rows(two[:, 1, 5]) == list(range(40))


@pytest.mark.parametrize(
    "value", [1.5, -0.1, (0.6, 0.2), {"tiger": 0.4}, {"default_": 2.0}, "0.5", (0.1, 0.2, 0.3), float("nan")]
)
def test_cross_alpha_refuses_bad_values(tok, value):
    with pytest.raises(EditValidationError) as err:
        cross_alpha(value, [LION], tok, num_steps=50)
    assert err.value.field == "cross_replace_steps"


def test_self_range_vectors():
    assert self_range(0.4, 50) == (0, 20)
    assert self_range(0.2, 50) == (0, 10)
    assert self_range(0.5, 50) == (0, 25)
    assert self_range((0.2, 0.6), 50) == (10, 30)
    assert self_range(0, 50) == (0, 0)
    with pytest.raises(EditValidationError) as err:
        self_range((0.7, 0.3), 50)
    assert err.value.field == "self_replace_steps"


def test_alignment_edges_an_empty_source_and_a_new_first_token():
    assert align_target_to_source([], [7, 8]) == [-1, -1]  # nothing to inherit: every token is new
    assert align_target_to_source([1], [2, 1]) == [-1, 0]  # a new token before the first match
    assert align_target_to_source([3, 1], [1]) == [1]  # a dropped first source token


def test_word_count_refusals_name_the_target(tok):
    with pytest.raises(EditValidationError) as err:
        replace_mapper("a cat", "a big cat", tok)
    assert err.value.field == "target_prompts" and err.value.message == (
        "replace swaps words one for one, so both prompts need the same number of words: "
        "the source prompt has 2 words, the target prompt has 3")
    with pytest.raises(EditValidationError) as err:
        replace_mapper("a cat", ["a dog", "a big dog"], tok)
    assert err.value.message.endswith("the source prompt has 2 words, the target prompt 1 has 3")


def test_replace_refuses_a_word_without_tokens(tok):
    class Silent:
        """The real tokenizer, except that the word "zz" has no tokens (alone or in a prompt)."""

        def __call__(self, text, **kw):
            return tok(" ".join(w for w in text.split() if w != "zz"), **kw)

        def __getattr__(self, name):
            return getattr(tok, name)

    with pytest.raises(EditValidationError) as err:
        replace_mapper("a zz cat", "a dog cat", Silent())
    assert err.value.field == "target_prompts"
    assert err.value.message == "replace cannot map a word that has no tokens"


def test_replace_maps_the_last_position_when_one_is_left_after_the_words(tok):
    source, target = " ".join(["cat"] * 74 + ["dog"]), " ".join(["cat"] * 74 + ["lion"])
    mapper = replace_mapper(source, target, tok)  # 1 + 75 tokens: only position 76 (the end token) is left
    assert mapper[76, 76] == 1.0 and mapper[75, 75] == 1.0 and mapper.sum() == 77
