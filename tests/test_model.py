"""Model and wrap: facts about the model, vocabulary masks, and what wrap accepts."""

import pytest
import torch

import surgery


def test_facts(tiny_llama, tokenizer):
    assert tiny_llama.n_layers == 4 and tiny_llama.d_model == 64
    assert tiny_llama.vocab_size == len(tokenizer)
    assert tiny_llama.device == torch.device("cpu") and tiny_llama.dtype == torch.float32
    assert tiny_llama.max_context == 128
    assert tiny_llama.eos_token_ids == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    assert tiny_llama.think_token_ids == tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>"))
    assert "tiny-llama" in repr(tiny_llama)


def test_vocabulary_mask_is_computed_once_and_matches_the_texts(tiny_llama):
    mask = tiny_llama.vocabulary_mask(("Wait",))
    assert mask is tiny_llama.vocabulary_mask(("Wait",))
    texts = tiny_llama.vocabulary_texts
    assert mask.tolist() == ["Wait" in t for t in texts]
    assert len(texts) == tiny_llama.vocab_size


def test_wrap_accepts_hf_models_and_refuses_the_rest(tiny_llama, tokenizer):
    assert surgery.wrap(tiny_llama) is tiny_llama
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        surgery.wrap(tiny_llama.module)
    with pytest.raises(TypeError, match="expects a transformers causal LM"):
        surgery.wrap(torch.nn.Linear(2, 2), tokenizer)


def test_the_test_tokenizer_has_the_reasoning_tokens(tokenizer):
    vocabulary = tokenizer.get_vocab()
    for token in ("ĊĊ", "<think>", "</think>", "Wait"):  # "ĊĊ" is "\n\n" in byte-level BPE
        assert token in vocabulary
    assert tokenizer.decode([vocabulary["ĊĊ"]]) == "\n\n"
    assert tokenizer.tokenize("<think>\nWait") == ["<think>", "Ċ", "Wait"]
