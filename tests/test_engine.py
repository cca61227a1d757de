"""The decode engine against HF generate, and its options and errors."""

import pytest
import torch
from conftest import PROMPTS, tiny_model
from tolerance import assert_close

import surgery
from surgery.prompts import encode_prompts


def hf_greedy(model, prompts, max_new_tokens, chat=False, **kwargs):
    """model.generate's tokens per row, cut after the first EOS (the reference)."""
    input_ids, attention_mask = encode_prompts(model, prompts, chat=chat)
    out = model.module.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=model.pad_token_id, **kwargs,
    )
    eos = set(kwargs.get("eos_token_id", model.eos_token_ids) if not isinstance(kwargs.get("eos_token_id"), int) else [kwargs["eos_token_id"]])
    rows = []
    for row in out[:, input_ids.shape[1]:].tolist():
        for i, token in enumerate(row):
            if token in eos:
                row = row[: i + 1]
                break
        rows.append(row)
    return rows


@pytest.mark.parametrize("chat", [False, True])
def test_greedy_equals_hf_generate_for_a_padded_batch(tiny, chat):
    out = surgery.generate(tiny, PROMPTS, 24, chat=chat)
    assert out.token_ids == hf_greedy(tiny, PROMPTS, 24, chat=chat)
    assert out.lengths == [len(t) for t in out.token_ids]
    assert len(set(out.prompt_lengths)) > 1  # rows really differ in length


def test_greedy_equals_hf_generate_with_early_eos(tiny_llama):
    # pick as EOS a token the model emits early in one row only, so rows stop at different steps
    free = surgery.generate(tiny_llama, PROMPTS, 16)
    eos = free.token_ids[1][3]
    out = surgery.generate(tiny_llama, PROMPTS, 16, eos_token_ids=[eos])
    assert out.token_ids == hf_greedy(tiny_llama, PROMPTS, 16, eos_token_id=eos)
    assert out.stop_reasons[1] == "eos" and out.token_ids[1][-1] == eos
    assert "length" in out.stop_reasons


def test_gpt2_architecture_generates_like_hf(tokenizer):
    model = tiny_model("gpt2", tokenizer)
    out = surgery.generate(model, PROMPTS, 12)
    assert out.token_ids == hf_greedy(model, PROMPTS, 12)


def test_rows_alone_equal_rows_in_a_batch(tiny):
    batched = surgery.generate(tiny, PROMPTS, 20, chat=True)
    for i, prompt in enumerate(PROMPTS):
        alone = surgery.generate(tiny, [prompt], 20, chat=True)
        assert alone.token_ids[0] == batched.token_ids[i]


def test_token_id_prompts_generate_like_hf(tiny_llama):
    ids = [[5, 6, 7], [8]]
    assert surgery.generate(tiny_llama, ids, 5).token_ids == hf_greedy(tiny_llama, ids, 5)


def test_stop_strings_stop_each_row_at_its_string(tiny_llama):
    free = surgery.generate(tiny_llama, PROMPTS, 30)
    out = surgery.generate(tiny_llama, PROMPTS, 30, stop_strings=["\n\n"])
    for row, full, text, reason in zip(out.token_ids, free.token_ids, out.texts, out.stop_reasons):
        assert full[: len(row)] == row  # same tokens up to the stop
        if reason == "stop_string":
            assert "\n\n" in text and "\n\n" not in tiny_llama.tokenizer.decode(row[:-1])
        else:
            assert "\n\n" not in text and len(row) == 30
    assert "stop_string" in out.stop_reasons


def test_sampling_is_seeded_and_top_p_one_token_is_greedy(tiny_llama):
    a = surgery.generate(tiny_llama, PROMPTS, 12, do_sample=True, seed=3, temperature=1.5)
    b = surgery.generate(tiny_llama, PROMPTS, 12, do_sample=True, seed=3, temperature=1.5)
    c = surgery.generate(tiny_llama, PROMPTS, 12, do_sample=True, seed=4, temperature=1.5)
    assert a.token_ids == b.token_ids != c.token_ids
    # a nucleus this small keeps only the top token: sampling becomes greedy
    nucleus = surgery.generate(tiny_llama, PROMPTS, 12, do_sample=True, seed=5, top_p=1e-6)
    assert nucleus.token_ids == surgery.generate(tiny_llama, PROMPTS, 12).token_ids


def test_run_returns_the_models_logits(tiny):
    logits = surgery.run(tiny, ["Tom has 3 apples.", "Wait"])
    input_ids, mask = encode_prompts(tiny, ["Tom has 3 apples.", "Wait"])
    with torch.no_grad():
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        reference = tiny.module(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits
    valid = mask.bool()
    assert_close(logits[valid], reference[valid])


def test_timings_and_output_fields(tiny_llama):
    out = surgery.generate(tiny_llama, PROMPTS[:2], 8)
    assert set(out.timings) == {"prefill_s", "decode_s", "total_s", "new_tokens", "tokens_per_s"}
    assert out.timings["new_tokens"] == sum(out.lengths) and out.timings["tokens_per_s"] > 0
    assert out.texts == tiny_llama.tokenizer.batch_decode(out.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([], {}, "no prompts"),
        ([""], {}, "encode to no tokens"),
        (["a", [1, 2]], {}, "all be strings or all token-id lists"),
        ([[1, 10_000]], {}, "outside the vocabulary"),
        (["a"], {"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        (["a"], {"max_new_tokens": -3}, "max_new_tokens must be a positive integer"),
        (["a " * 200], {}, "more than the model's context of 128"),
        (["a " * 60], {"max_new_tokens": 100}, "lower max_new_tokens"),
        (["a"], {"do_sample": True, "temperature": 0.0}, "temperature must be > 0"),
        (["a"], {"top_p": 0.0}, "top_p must be in"),
        (["a"], {"stop_strings": "x"}, "stop_strings must be a list"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_the_model_untouched(tiny_llama, prompts, kwargs, message):
    before = {k: v.clone() for k, v in tiny_llama.module.state_dict().items()}
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        surgery.generate(tiny_llama, prompts, **kwargs)
    after = tiny_llama.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
