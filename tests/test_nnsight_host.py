"""nnsight 0.8 as a backend: a LanguageModel (or NNsight) wrapped, the same tokens and probe
results as on the HF model, and unsupported wrappers refused clearly."""

import warnings

import pytest
import torch
from conftest import PROMPTS, all_hooks, assert_same_probe_results, frequent_words, logits_of, run_full_stack, tiny_model

import surgery

nnsight = pytest.importorskip("nnsight")


def language_model(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LanguageModel's deprecation notice
        return nnsight.LanguageModel(model.module, tokenizer=model.tokenizer)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_plain_generation_equals_nnsights_own_generate(tokenizer, kind):
    model = tiny_model(kind, tokenizer)
    lm = language_model(model)
    ours = surgery.wrap(lm)
    assert ours.host is lm and ours.module is model.module and ours.tokenizer is lm.tokenizer
    out = surgery.generate(ours, PROMPTS, 12)
    with torch.no_grad():
        theirs = lm.generate(PROMPTS, max_new_tokens=12, do_sample=False)
    new = theirs[:, -12:].tolist()
    for row, tokens in zip(new, out.token_ids):  # nnsight pads a finished row with the pad id
        assert row[: len(tokens)] == tokens and set(row[len(tokens):]) <= {ours.pad_token_id}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_full_stack_gives_the_same_tokens_and_probe_results_as_on_hf(tokenizer, kind):
    model = tiny_model(kind, tokenizer)
    eos, words = surgery.generate(model, PROMPTS, 12, chat=True).token_ids[0][5], frequent_words(model)
    hf_out, hf_blocks, hf_results = run_full_stack(model, eos, words)
    out, blocks, results = run_full_stack(surgery.wrap(language_model(model)), eos, words)
    assert sum(map(len, hf_blocks[0].fired())) > 0 and sum(map(len, hf_blocks[2].fired())) > 0
    assert out.token_ids == hf_out.token_ids and out.stop_reasons == hf_out.stop_reasons
    for ours, theirs in zip(blocks[:4], hf_blocks[:4]):
        assert ours.by_row() == theirs.by_row()
    assert_same_probe_results(results, hf_results)


def test_plain_nnsight_takes_the_tokenizer_as_an_argument(tokenizer):
    model = tiny_model("llama", tokenizer)
    wrapped = nnsight.NNsight(model.module)
    with pytest.raises(ValueError, match=r"no tokenizer: surgery.wrap\(lm, tokenizer\)"):
        surgery.wrap(wrapped)
    ours = surgery.wrap(wrapped, tokenizer)
    assert surgery.generate(ours, PROMPTS, 8).token_ids == surgery.generate(model, PROMPTS, 8).token_ids


def test_leaving_a_trace_leaves_the_nnsight_model_as_found(tokenizer):
    model = tiny_model("llama", tokenizer)
    lm = language_model(model)
    ours = surgery.wrap(lm)
    with torch.no_grad():
        before_theirs = lm.generate(PROMPTS, max_new_tokens=6, do_sample=False)
    before, hooks = logits_of(ours), all_hooks(model.module)
    blocks = run_full_stack(ours, eos=2)[1]
    with pytest.raises(KeyboardInterrupt):
        with surgery.trace(ours, *[type(b).from_dict(b.to_dict(), b.tensors()) for b in blocks]) as tr:
            tr.generate(PROMPTS, 4, chat=True)
            raise KeyboardInterrupt
    assert all_hooks(model.module) == hooks
    assert torch.equal(logits_of(ours), before)
    with torch.no_grad():
        assert torch.equal(lm.generate(PROMPTS, max_new_tokens=6, do_sample=False), before_theirs)


def test_remote_and_vllm_models_are_clear_errors(tokenizer):
    from nnsight.modeling.vllm import VLLM
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        remote = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=2))
    # what a model built for remote execution holds here: weights on the meta device
    with pytest.raises(ValueError, match="not loaded locally .* meta device.*dispatch=True"):
        surgery.wrap(nnsight.NNsight(remote), tokenizer)
    with pytest.raises(ValueError, match="runs on vLLM"):
        surgery.wrap(VLLM.__new__(VLLM))
