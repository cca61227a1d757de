"""The released TTTS procedure against a transcription of the authors' rule, on identical inputs.

The transcription (:func:`released_reference`) is written from reading ChnQ/MI-Peaks
``TTTS_evaluate.py`` (``batch_TTTS_generation``): each pass greedy with HF ``model.generate``
on one prompt at a time, read back as vLLM would return it; joined as the release joins.
"""

import json

import pytest
import torch
from conftest import PROMPTS

import surgery
from interventions import ThinkingTokenInsertion, TokenMask
from interventions.released_ttts import (RELEASED_ANSWER_PROMPT, RELEASED_STOP_STRINGS, RELEASED_TTTS_WORDS,
                                         ReleasedTTTSOutput, released_prompt, released_ttts, trace_generate)
from surgery.blocks import Block
from surgery.prompts import apply_chat_template


def greedy_pass(model, text, max_tokens, eos, stop_strings):
    """One released pass, in our words: tokenize the text as vLLM does (special tokens added),
    continue it greedily until an EOS id or ``max_tokens``; vLLM would have stopped at the first
    token whose text holds a stop string, and returns the text without the stop (EOS, or the stop
    string and what follows), special tokens kept."""
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                    do_sample=False, eos_token_id=list(eos), pad_token_id=model.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if new and new[-1] in eos:
        new = new[:-1]

    def read(tokens):
        return model.tokenizer.decode(tokens, skip_special_tokens=False)

    for k in range(1, len(new) + 1):
        found = [read(new[:k]).find(s) for s in stop_strings if s in read(new[:k])]
        if found:
            return read(new[:k])[: min(found)]
    return read(new)


def released_reference(model, question, word, first_budget, budget, answer_prompt, answer_tokens, eos,
                       stop_strings=RELEASED_STOP_STRINGS):
    """The three passes: the output stripped, "question output word" continued and stripped,
    then that text, the continuation and the answer prompt continued; the last text is graded
    stripped. Returns (first, second, budget prompt, final prompt, answer, graded)."""
    first = greedy_pass(model, question, first_budget, eos, stop_strings).strip()
    budget_prompt = question + " " + first + " " + word
    second = greedy_pass(model, budget_prompt, budget, eos, stop_strings).strip() if budget else ""
    final_prompt = budget_prompt + second + answer_prompt
    answer = greedy_pass(model, final_prompt, answer_tokens, eos, stop_strings)
    return first, second, budget_prompt, final_prompt, answer, answer.rstrip().strip()


def assert_equals_reference(model, out, questions, word, first_budget, budget, answer_prompt, answer_tokens, eos,
                            stop_strings=RELEASED_STOP_STRINGS):
    assert isinstance(out, ReleasedTTTSOutput)
    for i, question in enumerate(questions):
        first, second, budget_prompt, final_prompt, answer, graded = released_reference(
            model, question, word, first_budget, budget, answer_prompt, answer_tokens, eos, stop_strings)
        assert out.first_texts[i] == first
        assert out.extension_texts[i] == second
        assert out.budget_prompts[i] == budget_prompt
        assert out.final_prompts[i] == final_prompt
        assert out.answer_texts[i] == answer
        assert out.texts[i] == graded


def stop_id(model, prompts):
    """An id that the plain run emits early in one row, so some rows stop on it."""
    return surgery.generate(model, prompts, 6, eos_token_ids=[model.pad_token_id]).token_ids[1][3]


def test_equals_the_released_procedure_on_tiny_models(tiny):
    eos = stop_id(tiny, PROMPTS)
    out = released_ttts(tiny, PROMPTS, "Wait", 12, 10, " So the answer is", 4, eos_token_ids=[eos])
    assert_equals_reference(tiny, out, PROMPTS, "Wait", 12, 10, " So the answer is", 4, [eos])
    reasons = out.first_stop_reasons + out.extension_stop_reasons + out.stop_reasons
    assert "eos" in reasons and "length" in reasons  # both ways a pass ends are exercised
    # token counts: the engine's, stop token included; the word goes after the first pass's tokens
    assert out.first_lengths == out.passes[0].lengths and out.extension_lengths == out.passes[1].lengths
    assert out.total_lengths == [a + b + c for a, b, c in zip(out.first_lengths, out.extension_lengths, out.lengths)]
    assert all(0 < n <= 12 for n in out.first_lengths) and all(n <= 4 for n in out.lengths)
    records = out.records()
    assert json.loads(json.dumps(records)) == records and records[0]["word"] == "Wait"
    assert records[2]["answer_tokens"] == out.lengths[2] and records[2]["extension_text"] == out.extension_texts[2]


def test_stop_strings_cut_the_text_as_vllm_does(tiny_llama):
    plain = released_ttts(tiny_llama, PROMPTS, "Hmm", 10, 8, " Answer:", 3, stop_strings=(),
                          eos_token_ids=[tiny_llama.pad_token_id])
    texts = tiny_llama.vocabulary_texts
    stop = texts[plain.passes[0].token_ids[0][4]].strip() or "e"  # a text the first pass writes
    out = released_ttts(tiny_llama, PROMPTS, "Hmm", 10, 8, " Answer:", 3, stop_strings=(stop, "</s>"),
                        eos_token_ids=[tiny_llama.pad_token_id])
    assert "stop_string" in out.first_stop_reasons
    assert_equals_reference(tiny_llama, out, PROMPTS, "Hmm", 10, 8, " Answer:", 3, [tiny_llama.pad_token_id],
                            (stop, "</s>"))


def test_zero_budget_skips_the_second_pass_and_chat_templates_first(tiny_llama):
    eos = stop_id(tiny_llama, PROMPTS)
    out = released_ttts(tiny_llama, PROMPTS[:2], "Wait", 8, 0, " Answer:", 3, chat=True, eos_token_ids=[eos])
    templated = apply_chat_template(tiny_llama, PROMPTS[:2])
    assert_equals_reference(tiny_llama, out, templated, "Wait", 8, 0, " Answer:", 3, [eos])
    assert out.extension_texts == ["", ""] and out.extension_stop_reasons == ["skipped", "skipped"]
    assert out.passes[1] is None and out.final_prompts[0] == f"{templated[0]} {out.first_texts[0]} Wait Answer:"


def test_equals_the_released_procedure_with_the_real_r1_tokenizer(tiny_r1_plain):
    model = tiny_r1_plain
    questions = [released_prompt("What is 7 * 8?"),
                 released_prompt("Natalia sold 48 clips in April and half as many in May. How many in all?")]
    eos = surgery.generate(model, questions, 4).token_ids[0][2]  # so a pass can end on "EOS"
    out = released_ttts(model, questions, "Wait", 8, 6, RELEASED_ANSWER_PROMPT, 4, eos_token_ids=[eos, 151643])
    assert_equals_reference(model, out, questions, "Wait", 8, 6, RELEASED_ANSWER_PROMPT, 4, [eos, 151643])
    # each pass is the joined text, tokenized again with the BOS, the word after a space
    assert out.passes[1].prompt_lengths[0] == len(model.tokenizer(out.budget_prompts[0])["input_ids"])
    assert model.tokenizer(out.budget_prompts[0])["input_ids"][0] == 151646
    assert out.budget_prompts[0].endswith(" Wait") and out.final_prompts[0].endswith(" Final Answer within \\boxed{}:")


def test_other_blocks_stay_attached_in_every_pass(tiny_llama):
    eos = stop_id(tiny_llama, PROMPTS)
    plain = released_ttts(tiny_llama, PROMPTS, "Wait", 10, 8, " Answer:", 3, eos_token_ids=[eos])
    texts = tiny_llama.vocabulary_texts
    word = texts[plain.passes[0].token_ids[0][0]].strip()  # a word the first pass writes
    mask = TokenMask([word], penalty=-50.0)
    out = released_ttts(tiny_llama, PROMPTS, "Wait", 10, 8, " Answer:", 3, blocks=[mask], eos_token_ids=[eos])
    assert out.first_texts != plain.first_texts
    assert len(out.block_rows) == 3 and all(len(rows) == 1 for rows in out.block_rows)
    # the mask held in each pass: the engine under the same mask gives each pass's tokens
    with surgery.trace(tiny_llama, TokenMask([word], penalty=-50.0)) as tr:
        for pass_prompts, done, budget in ((PROMPTS, out.passes[0], 10), (out.budget_prompts, out.passes[1], 8),
                                           (out.final_prompts, out.passes[2], 3)):
            again = tr.generate(pass_prompts, budget, eos_token_ids=[eos], stop_strings=RELEASED_STOP_STRINGS)
            assert again.token_ids == done.token_ids


def test_a_study_condition_runs_it_through_trace_generate(tiny_llama):
    eos = stop_id(tiny_llama, PROMPTS)
    block = ThinkingTokenInsertion.released("Wait", first_budget=None, budget=6, answer_prompt=" Answer:",
                                            answer_tokens=3)
    again = Block.from_dict(json.loads(json.dumps(block.to_dict())))
    assert again.config == block.config and again.config.joins == "released"
    with surgery.trace(tiny_llama, again) as tr:
        out = trace_generate(tr, PROMPTS, 9, eos_token_ids=[eos])  # first_budget None: max_new_tokens
        with pytest.raises(ValueError, match="trace_generate"):
            tr.generate(PROMPTS, 9, eos_token_ids=[eos])
    direct = released_ttts(tiny_llama, PROMPTS, "Wait", 9, 6, " Answer:", 3, eos_token_ids=[eos])
    assert out.texts == direct.texts and out.first_texts == direct.first_texts and out.lengths == direct.lengths
    assert again.by_row() == [[n - (why == "eos")] for n, why in zip(out.first_lengths, out.first_stop_reasons)]
    with surgery.trace(tiny_llama) as tr:  # nothing released attached: plain tr.generate
        assert trace_generate(tr, PROMPTS, 5).token_ids == surgery.generate(tiny_llama, PROMPTS, 5).token_ids


def test_bad_input_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="one word per run"):
        ThinkingTokenInsertion(words=("Wait", "Hmm"), answer_prompt=" A:", joins="released")
    with pytest.raises(ValueError, match="answer_prompt"):
        ThinkingTokenInsertion(words=("Wait",), joins="released")
    with pytest.raises(ValueError, match="max_insertions=1"):
        ThinkingTokenInsertion(words=("Wait",), answer_prompt=" A:", max_insertions=2, joins="released")
    with pytest.raises(ValueError, match="joins must be one of"):
        ThinkingTokenInsertion(joins="text")
    with pytest.raises(ValueError, match="prompts must be non-empty strings"):
        released_ttts(tiny_llama, [[1, 2, 3]], "Wait")
    with pytest.raises(ValueError, match="word must be"):
        released_ttts(tiny_llama, PROMPTS, " ")
    for name, value in (("first_budget", 0), ("budget", -1), ("answer_tokens", 0)):
        with pytest.raises(ValueError, match=f"{name} must be an integer"):
            released_ttts(tiny_llama, PROMPTS, "Wait", **{name: value})
    with pytest.raises(TypeError, match="Model or an active Trace"):
        released_ttts(tiny_llama.module, PROMPTS, "Wait")
    with surgery.trace(tiny_llama) as tr:
        with pytest.raises(ValueError, match="attach them to it"):
            released_ttts(tr, PROMPTS, "Wait", blocks=[TokenMask(["So"])])
        with pytest.raises(ValueError, match="set by released_ttts"):
            released_ttts(tr, PROMPTS, "Wait", max_new_tokens=3)
    two = ThinkingTokenInsertion.released("Wait"), ThinkingTokenInsertion.released("Hmm")
    with surgery.trace(tiny_llama, *two) as tr:
        with pytest.raises(ValueError, match="one such block per trace"):
            trace_generate(tr, PROMPTS, 4)


def test_released_constants():
    assert len(RELEASED_TTTS_WORDS) == 18 and all(w.isalpha() for w in RELEASED_TTTS_WORDS)
    assert released_prompt("Q?").startswith("User: Q?\nPlease reason step by step")
    released = ThinkingTokenInsertion.released().config
    assert RELEASED_ANSWER_PROMPT == r" Final Answer within \boxed{}:" == released.answer_prompt
    assert (released.first_budget, released.budget, released.answer_tokens, released.words) == (4096, 4096, 16, ("Wait",))
