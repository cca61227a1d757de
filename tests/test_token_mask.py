"""TokenMask: SEAL's logit penalty on vocabulary entries, and phrases forbidden across tokens."""

from collections import Counter

import pytest
import torch
from conftest import PROMPTS
from tolerance import assert_close

import surgery
from interventions import TokenMask
from surgery.triggers import StepWindow


def plain(model, n=24):
    return surgery.generate(model, PROMPTS, n, chat=True)


def test_soft_penalty_shifts_exactly_the_matching_entries(tiny):
    mask = TokenMask(["wait"], penalty=-3.0)
    with surgery.trace(tiny, mask) as tr:
        penalised = tr.run(PROMPTS)
    reference = surgery.run(tiny, PROMPTS)
    hit = torch.tensor(["wait" in t.lower() for t in tiny.vocabulary_texts])
    assert hit.sum() >= 1  # "Wait"
    _, attention = surgery.encode_prompts(tiny, PROMPTS)
    valid = attention.bool()  # padding positions are left alone
    assert_close(penalised[valid][:, hit], reference[valid][:, hit] - 3.0)
    assert torch.equal(penalised[valid][:, ~hit], reference[valid][:, ~hit])
    assert torch.equal(penalised[~valid], reference[~valid])


def test_zero_penalty_is_the_identity(tiny):
    with surgery.trace(tiny, TokenMask(["Wait", "so"], penalty=0.0)) as tr:
        assert tr.generate(PROMPTS, 24, chat=True).token_ids == plain(tiny).token_ids


def frequent_words(model, out, n=2):
    words = Counter(w for text in out.texts for w in text.split() if w.isalpha() and len(w) > 2)
    return [w for w, _ in words.most_common(n)]


def test_hard_mask_words_never_appear(tiny):
    before = plain(tiny, 40)
    words = frequent_words(tiny, before)
    assert words, "the plain run should write some words"
    with surgery.trace(tiny, TokenMask(words, penalty=None)) as tr:
        after = tr.generate(PROMPTS, 40, chat=True)
    for text in after.texts:
        assert not any(w.lower() in text.lower() for w in words)
    assert after.token_ids != before.token_ids


def test_phrases_are_blocked_across_token_boundaries(tiny):
    before = plain(tiny, 30)
    texts = tiny.vocabulary_texts
    # a phrase the plain run writes over two tokens, with a space inside
    row, k = next((r, k) for r, ids in enumerate(before.token_ids) for k in range(1, len(ids))
                  if " " in (texts[ids[k - 1]] + texts[ids[k]]).strip() and texts[ids[k - 1]].strip())
    phrase = (texts[before.token_ids[row][k - 1]] + texts[before.token_ids[row][k]]).strip()
    with surgery.trace(tiny, TokenMask([phrase], penalty=None, case_sensitive=True)) as tr:
        after = tr.generate(PROMPTS, 30, chat=True)
    assert all(phrase not in text for text in after.texts)
    # the row agrees with the plain run up to the token that would have completed the phrase
    assert after.token_ids[row][:k] == before.token_ids[row][:k] and after.token_ids[row][k] != before.token_ids[row][k]


def test_step_window_limits_the_mask(tiny):
    before = plain(tiny, 20)
    first = {ids[5] for ids in before.token_ids}
    words = [tiny.vocabulary_texts[t].strip() for t in first if tiny.vocabulary_texts[t].strip()]
    with surgery.trace(tiny, TokenMask(words, penalty=None, match="token", when=StepWindow(50))) as tr:
        assert tr.generate(PROMPTS, 20, chat=True).token_ids == before.token_ids


def test_batched_equals_alone(tiny):
    words = frequent_words(tiny, plain(tiny, 40))

    def masked(prompts):
        with surgery.trace(tiny, TokenMask(words + ["let me check"], penalty=-5.0)) as tr:
            return tr.generate(prompts, 30, chat=True).token_ids

    batched = masked(PROMPTS)
    assert [masked([p])[0] for p in PROMPTS] == batched


def test_bad_words_and_penalties_are_clear_errors(tiny_llama):
    with pytest.raises(ValueError, match="non-empty words"):
        TokenMask([])
    with pytest.raises(ValueError, match="non-empty words"):
        TokenMask(["  "])
    with pytest.raises(ValueError, match="finite number or None"):
        TokenMask(["wait"], penalty=float("nan"))
    with pytest.raises(ValueError, match="match must be"):
        TokenMask(["wait"], match="regex")
    with pytest.raises(ValueError, match="cannot encode '€uro'"):
        with surgery.trace(tiny_llama, TokenMask(["€uro"])):
            pass
    assert tiny_llama._active_trace is None


@pytest.mark.parametrize("penalty", [-5.0, None])
def test_the_triton_kernel_edits_as_torch(tiny, monkeypatch, penalty):
    # TokenMask.edit goes through surgery.kernels.mask_logits: forced onto the Triton kernel (the
    # interpreter without a GPU), a run writes the same tokens and records the same hits.
    pytest.importorskip("triton")

    def run(kernels):
        monkeypatch.setenv("SURGERY_KERNELS", kernels)
        mask = TokenMask.example(tiny)
        mask = TokenMask(mask.config.words, penalty=penalty, when=mask.config.when)
        with surgery.trace(tiny, mask) as tr:
            return tr.generate(PROMPTS, 10, chat=True).token_ids, mask.fired()

    tokens, fired = run("torch")
    assert any(fired), "the example mask should hit some top tokens"
    assert run("triton") == (tokens, fired)
