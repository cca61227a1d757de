"""Prompt encoding: the chat template, left padding, token-id prompts, the context check."""

import pytest

import surgery
from surgery.prompts import apply_chat_template, check_context, encode_prompts


def test_chat_template_opens_think(tiny):
    input_ids, mask = encode_prompts(tiny, ["Tom has 3 apples."], chat=True)
    text = tiny.tokenizer.decode(input_ids[0])
    assert text.startswith("<|im_start|>user\nTom has 3 apples.<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_apply_chat_template_is_the_tokenizers_user_turn(tiny_llama):
    texts = apply_chat_template(tiny_llama, ["a", "b c"])
    assert texts == [
        tiny_llama.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in ["a", "b c"]
    ]


def test_left_padding_and_token_id_prompts(tiny_llama):
    ids = [[5, 6, 7], [8]]
    input_ids, mask = encode_prompts(tiny_llama, ids)
    assert input_ids.tolist() == [[5, 6, 7], [tiny_llama.pad_token_id, tiny_llama.pad_token_id, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_encode_prompts_is_exported_from_surgery():
    assert surgery.encode_prompts is encode_prompts


def test_chat_without_template_is_refused(tiny_llama):
    tokenizer = tiny_llama.tokenizer
    saved, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(ValueError, match="no chat template"):
            encode_prompts(tiny_llama, ["a"], chat=True)
        with pytest.raises(ValueError, match="no chat template"):
            surgery.generate(tiny_llama, ["a"], 2, chat=True)
    finally:
        tokenizer.chat_template = saved


def test_check_context_counts_the_new_tokens(tiny_llama):
    # the tiny models have a context of 128 positions
    _, mask = encode_prompts(tiny_llama, [[5] * 100, [6] * 3])
    check_context(tiny_llama, mask, 28)  # exactly fills the context
    with pytest.raises(ValueError, match="prompt 0 has 100 tokens; with max_new_tokens=29 that needs 129"):
        check_context(tiny_llama, mask, 29)
    _, long = encode_prompts(tiny_llama, [[6] * 3, [5] * 129])
    with pytest.raises(ValueError, match="prompt 1 has 129 tokens, more than the model's context of 128") as info:
        check_context(tiny_llama, long)
    assert "max_new_tokens" not in str(info.value)


def test_r1_chat_prompts_are_the_real_template_and_open_no_think_span(tiny_r1, r1_tokenizer):
    """The real R1-Distill-Qwen template: one BOS, <｜User｜> ... <｜Assistant｜>, no <think> (the
    model writes it), left-padded with its EOS id."""
    prompts = ["What is 2 + 3?", "Tom has 3 apples.\n\nHe buys 2 more. How many?"]
    ids, mask = encode_prompts(tiny_r1, prompts, chat=True)
    for row, prompt in enumerate(prompts):
        expected = r1_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                    add_generation_prompt=True, return_dict=False)
        assert ids[row][mask[row].bool()].tolist() == list(expected)
        assert expected[:2] == [151646, 151644] and expected[-1] == 151645 and 151648 not in expected
    assert ids[0, 0].item() == r1_tokenizer.pad_token_id == 151643 and not mask[0, 0]
    text = r1_tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}], tokenize=False,
                                            add_generation_prompt=True)
    assert apply_chat_template(tiny_r1, prompts[:1]) == [text] and text.endswith("<｜Assistant｜>")
