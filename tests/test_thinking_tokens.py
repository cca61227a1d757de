"""ThinkingTokenInsertion (TTTS): words in place of stops, budgets, the forced answer."""

import pytest
from conftest import PROMPTS

import surgery
from interventions import ThinkingTokenInsertion


def early_stopper(model):
    """An EOS id that stops some rows early but not all (the tiny models rarely emit a real EOS)."""
    free = surgery.generate(model, PROMPTS, 30, chat=True)
    return free.token_ids[1][4], free


def run(model, block, eos, n=40):
    with surgery.trace(model, block) as tr:
        return tr.generate(PROMPTS, n, chat=True, eos_token_ids=[eos])


def test_zero_budget_changes_nothing(tiny):
    eos, _ = early_stopper(tiny)
    plain = surgery.generate(tiny, PROMPTS, 40, chat=True, eos_token_ids=[eos])
    out = run(tiny, ThinkingTokenInsertion(words=(" Wait",), budget=0, answer_prompt=" Answer:"), eos)
    assert out.token_ids == plain.token_ids and out.stop_reasons == plain.stop_reasons


def test_rows_that_stop_early_get_the_word_and_go_on(tiny):
    eos, _ = early_stopper(tiny)
    plain = surgery.generate(tiny, PROMPTS, 40, chat=True, eos_token_ids=[eos])
    tts = ThinkingTokenInsertion(words=(" Wait",), budget=12)
    out = run(tiny, tts, eos)
    word = tiny.tokenizer(" Wait", add_special_tokens=False)["input_ids"]
    stopped = [i for i, r in enumerate(plain.stop_reasons) if r == "eos"]
    assert stopped
    for row in range(len(PROMPTS)):
        k = plain.lengths[row] - 1
        if row in stopped:
            assert tts.insertions()[row] == [k]
            assert out.token_ids[row][:k] == plain.token_ids[row][:k]
            assert out.token_ids[row][k : k + len(word)] == word
            assert out.lengths[row] > k + len(word) or out.stop_reasons[row] == "length"
            # 12 model tokens after the word (the word is not counted), unless the row ends earlier
            assert out.lengths[row] <= k + len(word) + 12
            if out.stop_reasons[row] == "block":
                assert out.lengths[row] == k + len(word) + 12
        else:
            assert tts.insertions()[row] == [] and out.token_ids[row] == plain.token_ids[row]


def test_answer_prompt_is_forced_when_the_budget_runs_out(tiny):
    eos, _ = early_stopper(tiny)
    plain = surgery.generate(tiny, PROMPTS, 60, chat=True, eos_token_ids=[eos])
    tts = ThinkingTokenInsertion(words=(" Wait",), budget=5, answer_prompt=" So the answer is", answer_tokens=3)
    with surgery.trace(tiny, tts) as tr:
        out = tr.generate(PROMPTS, 60, chat=True, eos_token_ids=[eos])
    answer = tiny.tokenizer(" So the answer is", add_special_tokens=False)["input_ids"]
    word = tiny.tokenizer(" Wait", add_special_tokens=False)["input_ids"]
    checked = 0
    for row, reason in enumerate(plain.stop_reasons):
        if reason != "eos":
            continue
        k, ids = tts.insertions()[row][0], out.token_ids[row]
        # the answer prompt follows the extension: after the word and the 5-token budget, or
        # earlier where the row stopped again with no insertion left
        end = k + len(word) + 5
        start = next(j for j in range(k + len(word), end + 1) if ids[j : j + len(answer)] == answer)
        assert start <= end
        if out.stop_reasons[row] == "block":  # then exactly answer_tokens model tokens
            assert len(ids) == start + len(answer) + 3
        checked += 1
    assert checked


def test_several_insertions_cycle_through_the_words(tiny):
    eos, _ = early_stopper(tiny)
    tts = ThinkingTokenInsertion(words=(" Wait", " Hmm"), budget=30, max_insertions=3)
    out = run(tiny, tts, eos, n=60)
    hmm = tiny.tokenizer(" Hmm", add_special_tokens=False)["input_ids"]
    for row, places in enumerate(tts.insertions()):
        assert len(places) <= 3
        if len(places) >= 2:
            assert out.token_ids[row][places[1] : places[1] + len(hmm)] == hmm


def test_first_budget_counts_as_a_stop(tiny):
    tts = ThinkingTokenInsertion(words=(" Wait",), budget=4, first_budget=6)
    with surgery.trace(tiny, tts) as tr:
        out = tr.generate(PROMPTS, 20, chat=True)
    word = tiny.tokenizer(" Wait", add_special_tokens=False)["input_ids"]
    assert tts.insertions() == [[6]] * len(PROMPTS)
    assert all(ids[6 : 6 + len(word)] == word for ids in out.token_ids)
    # the word, then 4 model tokens: the budget does not count the inserted word
    assert all(length == 6 + len(word) + 4 and reason == "block" for length, reason in zip(out.lengths, out.stop_reasons))


def test_batched_equals_alone(tiny):
    eos, _ = early_stopper(tiny)

    def go(prompts):
        tts = ThinkingTokenInsertion(words=(" Wait",), budget=6, answer_prompt=" Answer:", answer_tokens=2)
        with surgery.trace(tiny, tts) as tr:
            out = tr.generate(prompts, 40, chat=True, eos_token_ids=[eos])
        return out.token_ids, tts.insertions()

    batched, places = go(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        alone, alone_places = go([prompt])
        assert alone[0] == batched[i] and alone_places[0] == places[i]


def test_bad_settings_are_clear_errors(tiny_llama):
    with pytest.raises(ValueError, match="budget must be an integer >= 0"):
        ThinkingTokenInsertion(budget=-1)
    with pytest.raises(ValueError, match="non-empty words"):
        ThinkingTokenInsertion(words=())
    with pytest.raises(ValueError, match="answer_tokens must be"):
        ThinkingTokenInsertion(answer_tokens=0)
    with pytest.raises(ValueError, match="first_budget"):
        ThinkingTokenInsertion(first_budget=0)
