"""TextMatcher and OnText: occurrences of a string across token boundaries, streamed."""

import pytest
import torch
from conftest import PROMPTS, occurrences_ending_at_each_token

import surgery
from surgery.text_match import TextMatcher
from surgery.triggers import OnText


@pytest.mark.parametrize("pattern", ["\n\n", "aa", "aab", "abab", "Wait", "x"])
def test_matcher_equals_a_string_search_on_random_token_streams(pattern):
    texts = ["a", "b", "aa", "ab", "ba", "\n", "\n\n", ".\n", "Wa", "it", "Wait", "xab", "", "baab"]
    generator = torch.Generator().manual_seed(len(pattern))
    tokens = torch.randint(0, len(texts), (6, 50), generator=generator)
    matcher = TextMatcher(pattern, texts, "cpu")
    _, hits = matcher.scan(matcher.initial(6), tokens, torch.ones(6, 50, dtype=torch.bool))
    for row in range(6):
        assert hits[row].tolist() == occurrences_ending_at_each_token(texts, tokens[row].tolist(), pattern)


def test_streaming_in_pieces_equals_one_scan():
    texts = ["a", "\n", "\n\n", "b."]
    matcher = TextMatcher("\n\n", texts, "cpu")
    tokens = torch.tensor([[1, 1, 0, 2, 1, 3, 1]])
    valid = torch.ones_like(tokens, dtype=torch.bool)
    _, whole = matcher.scan(matcher.initial(1), tokens, valid)
    state, pieces = matcher.initial(1), []
    for column in range(tokens.shape[1]):
        states, hits = matcher.scan(state, tokens[:, column : column + 1], valid[:, column : column + 1])
        state = states[:, -1]
        pieces.append(hits)
    assert torch.equal(torch.cat(pieces, dim=1), whole)


def test_invalid_positions_neither_fire_nor_advance():
    matcher = TextMatcher("\n\n", ["a", "\n"], "cpu")
    tokens = torch.tensor([[1, 1, 1]])
    valid = torch.tensor([[True, False, True]])
    _, hits = matcher.scan(matcher.initial(1), tokens, valid)
    assert hits.tolist() == [[False, False, True]]


def test_on_text_fires_where_the_generated_text_reaches_the_string(tiny):
    from interventions import ResidualAdd

    add = ResidualAdd(torch.zeros(tiny.d_model), site="resid_pre.0", when=OnText("\n\n"))
    with surgery.trace(tiny, add) as tr:
        out = tr.generate(PROMPTS, 20)
    texts = tiny.vocabulary_texts
    for row, prompt in enumerate(PROMPTS):
        ids, _ = surgery.encode_prompts(tiny, [prompt])
        fed = ids[0].tolist() + out.token_ids[row][:-1]
        expected = [p for p, hit in enumerate(occurrences_ending_at_each_token(texts, fed, "\n\n")) if hit]
        assert add.fired()[row] == expected
    assert any(add.fired())


def test_on_text_fires_on_smollm2_style_split_newlines(tiny_llama):
    newline = tiny_llama.tokenizer.convert_tokens_to_ids("Ċ")
    step = surgery.Step.prefill(torch.tensor([[5, newline, newline, 5]]), torch.ones(1, 4, dtype=torch.long),
                                matchers={("\n\n", True): tiny_llama.text_matcher("\n\n")})
    assert OnText("\n\n")(step).tolist() == [[False, False, True, False]]
    assert not surgery.OnTokens("\n\n").bind(tiny_llama)(step).any()


def test_untracked_text_is_a_clear_error():
    step = surgery.Step.prefill(torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="not tracked"):
        OnText("\n\n")(step)
    with pytest.raises(ValueError, match="non-empty string"):
        OnText("")
