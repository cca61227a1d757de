"""Triggers: vocabulary masks, think spans, windows, combinations, per-row correctness."""

import pytest
import torch
from conftest import PROMPTS

import surgery
from surgery.step import Step
from surgery.triggers import Always, And, FromPromptEnd, InThink, Not, OnTokens, Or, SealThinkFlag, StepWindow, Trigger


def prefill_step(model, texts, chat=False):
    input_ids, mask = surgery.encode_prompts(model, texts, chat=chat)
    return Step.prefill(input_ids, mask, model.think_token_ids)


def test_separator_string_matches_every_vocabulary_entry_containing_it(tiny_llama):
    trigger = OnTokens("\n\n").bind(tiny_llama)
    texts = tiny_llama.vocabulary_texts
    expected = {i for i, t in enumerate(texts) if "\n\n" in t}
    assert set(trigger._vocabulary.nonzero().flatten().tolist()) == expected
    vocabulary = tiny_llama.tokenizer.get_vocab()
    for token in ["ĊĊ", ".ĊĊ", "ĊĊĊ", ".ĊĊĊ"]:  # "\n\n", ".\n\n", "\n\n\n", ".\n\n\n"
        assert trigger._vocabulary[vocabulary[token]]


def test_token_trigger_fires_exactly_on_tokens_whose_text_contains_the_string(tiny_llama):
    step = prefill_step(tiny_llama, PROMPTS)
    fired = OnTokens("\n\n").bind(tiny_llama)(step)
    texts = tiny_llama.vocabulary_texts
    expected = torch.tensor([["\n\n" in texts[t] for t in row] for row in step.token_ids.tolist()]) & step.valid
    assert torch.equal(fired, expected) and fired.any()


def test_case_insensitive_strings_and_ids(tiny_llama):
    vocabulary = tiny_llama.tokenizer.get_vocab()
    trigger = OnTokens("wait", case_sensitive=False).bind(tiny_llama)
    assert trigger._vocabulary[vocabulary["Wait"]]
    assert not OnTokens("wait").bind(tiny_llama)._vocabulary[vocabulary["Wait"]]
    by_id = OnTokens(ids=[7, 9]).bind(tiny_llama)
    assert by_id._vocabulary.nonzero().flatten().tolist() == [7, 9]


def test_in_think_and_combinations(tiny):
    step = prefill_step(tiny, ["Let me think.\n\nFirst"], chat=True)
    separator = OnTokens("\n\n").bind(tiny)
    think = InThink().bind(tiny)
    both = (separator & think)(step)
    assert torch.equal(both, separator(step) & step.in_think)
    # the prompt's own "\n\n" sits before <think>: only the template's "\n" after <think> is inside
    assert torch.equal((separator | think)(step), separator(step) | step.in_think)
    assert torch.equal((~think)(step), ~step.in_think & step.valid)
    assert torch.equal(Always()(step), step.valid)


def test_step_window():
    step = Step.prefill(torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long))
    later = step.next(torch.tensor([3]), torch.tensor([False]), (None, None))
    window = StepWindow(1, 2)
    assert not window(step).any() and window(later).all()
    assert StepWindow(0)(step).all()
    with pytest.raises(ValueError, match="start <= stop"):
        StepWindow(3, 1)


def test_triggers_round_trip_through_json():
    trigger = (OnTokens(["\n\n", "Wait"], case_sensitive=False) & InThink()) | ~StepWindow(2, 5) | Always()
    import json

    assert Trigger.from_dict(json.loads(json.dumps(trigger.to_dict()))) == trigger
    assert isinstance(trigger, Or) and isinstance(trigger.left, Or) and isinstance(trigger.left.left, And)
    assert isinstance(trigger.left.right, Not)


def test_bad_triggers_are_clear_errors(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match="at least one string"):
        OnTokens()
    with pytest.raises(ValueError, match="non-empty strings"):
        OnTokens([""])
    with pytest.raises(ValueError, match="out of range"):
        OnTokens(ids=[10**6]).bind(tiny_llama)
    with pytest.raises(TypeError, match="combine with triggers"):
        OnTokens("a") & "b"
    with pytest.raises(ValueError, match="unknown trigger kind"):
        Trigger.from_dict({"kind": "sometimes"})
    with pytest.raises(RuntimeError, match="not bound"):
        OnTokens("a").mask(Step.prefill(torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.long)))


def test_in_think_needs_think_tokens(tokenizer):
    from conftest import tiny_model

    model = tiny_model("llama", tokenizer)
    model.__dict__["think_token_ids"] = (None, None)  # as for a vocabulary without them
    with pytest.raises(ValueError, match="would never fire"):
        InThink().bind(model)


def test_a_row_fires_at_the_same_positions_alone_as_in_a_batch(tiny):
    from interventions import ResidualAdd

    def fired(prompts):
        add = ResidualAdd(torch.zeros(tiny.d_model), site="resid_pre.1", when=OnTokens("\n\n") & InThink())
        with surgery.trace(tiny, add) as tr:
            out = tr.generate(prompts, 24, chat=True)
        return add.fired(), out

    batched, out = fired(PROMPTS)
    assert sum(map(len, batched)) > 0
    for i, prompt in enumerate(PROMPTS):
        alone, _ = fired([prompt])
        assert alone[0] == batched[i]


# ---- the real DeepSeek-R1-Distill-Qwen tokenizer ------------------------------------------------

def test_r1_separators_are_the_565_vocabulary_tokens_holding_a_blank_line(tiny_r1, r1_tokenizer):
    assert r1_tokenizer(".\n\n", add_special_tokens=False)["input_ids"] == [382]
    assert r1_tokenizer("\n\n", add_special_tokens=False)["input_ids"] == [271]
    assert tiny_r1.think_token_ids == (151648, 151649)
    vocabulary = OnTokens("\n\n").bind(tiny_r1)._vocabulary
    assert int(vocabulary.sum()) == 565  # as the released SEAL code counts them on Qwen2.5's tokenizer
    assert all(vocabulary[i] for i in (271, 382, 1406)) and not vocabulary[198]  # "\n" alone is not one


def released_seal_flag(prompt_ids, fed_ids, think_ids):
    """Transcription of the released SEAL think flag, per fed position: set by any <think> of the
    prompt, then by a fed <think>, cleared by a fed </think> (METHODS.md section 1)."""
    open_id, close_id = think_ids
    flag = open_id in prompt_ids
    flags = [flag] * len(prompt_ids)
    for token in fed_ids:
        flag = True if token == open_id else False if token == close_id else flag
        flags.append(flag)
    return flags


@pytest.mark.parametrize("tail", [
    "<think>\nLet me see.\n\nFirst, 2 + 3 = 5.\n\n",                      # an open span
    "<think>\nOld.\n\nDone.</think>\n\nThe answer is 5.\n\n",               # an earlier, closed span
    "No tags at all.\n\n",
])
def test_seal_think_flag_and_in_think_against_their_rules_on_r1_prompts(tiny_r1, r1_tokenizer, tail):
    head = r1_tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                            add_generation_prompt=True)
    prompt = r1_tokenizer(head + tail, add_special_tokens=False)["input_ids"]
    completion = r1_tokenizer("Wait, check.\n\n</think>\n\nSo 5.\n\n<think>\nAgain.\n\n", add_special_tokens=False)["input_ids"]
    step = Step.replay(torch.tensor(prompt), torch.tensor(completion), tiny_r1.think_token_ids)
    assert step.seal_think[0].tolist() == released_seal_flag(prompt, completion, tiny_r1.think_token_ids)
    inside, span = False, []
    for token in prompt + completion:  # the paper's span: the last tag seen decides
        inside = True if token == 151648 else False if token == 151649 else inside
        span.append(inside)
    assert step.in_think[0].tolist() == span
    closed = "</think>" in tail
    assert (step.seal_think[0, len(prompt) - 1] != step.in_think[0, len(prompt) - 1]) == closed


def test_from_prompt_end_passes_the_last_prompt_token_and_every_decode_position(tiny_r1, r1_tokenizer):
    ids = r1_tokenizer(["a.\n\nb.\n\n", "c.\n\n"], add_special_tokens=False, padding=True,
                       return_tensors="pt", padding_side="left")
    prefill = Step.prefill(ids["input_ids"], ids["attention_mask"], tiny_r1.think_token_ids)
    fired = (OnTokens("\n\n").bind(tiny_r1) & FromPromptEnd())(prefill)
    assert fired.tolist() == [[False, False, False, True], [False, False, False, True]]
    decode = prefill.next(torch.tensor([382, 271]), torch.zeros(2, dtype=torch.bool), tiny_r1.think_token_ids)
    assert FromPromptEnd()(decode).tolist() == [[True], [True]]
    assert Trigger.from_dict(FromPromptEnd().to_dict()) == FromPromptEnd()
    assert Trigger.from_dict(SealThinkFlag().to_dict()) == SealThinkFlag()


def test_seal_think_flag_needs_a_think_token(tokenizer):
    from conftest import tiny_model

    model = tiny_model("llama", tokenizer)
    model.__dict__["think_token_ids"] = (None, None)  # as for a vocabulary without them
    with pytest.raises(ValueError, match="needs a '<think>' token"):
        SealThinkFlag().bind(model)
