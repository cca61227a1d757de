"""surgery.decode.kv_cache: the two cache kinds and the edits a recompute needs, against a cache built
by the model itself."""

import pytest
import torch
import transformers
from conftest import tiny_model
from packaging.version import Version
from transformers import DynamicCache, MistralConfig, MistralForCausalLM, StaticCache

from surgery.decode.kv_cache import cache_keyword, last_entry, new_cache, passed_cache, restore_last_entry, rollback

KINDS = ["dynamic", "static"]


def _filled(model, kind, length=5, batch=2):
    cache = new_cache(kind, model.module.config, max_length=12)
    ids = torch.arange(1, 1 + batch * length).reshape(batch, length) % model.vocab_size
    with torch.no_grad():
        model.module(input_ids=ids, use_cache=True, **{cache_keyword(model.module): cache})
    return cache, ids


def _length(cache, layer=0):
    stored = cache.layers[layer]
    return int(stored.cumulative_length) if isinstance(cache, StaticCache) else stored.keys.shape[2]


def _keys_at(cache, layer, position):
    return cache.layers[layer].keys[:, :, position]


def test_cache_keyword_is_the_name_the_installed_transformers_gives_it(tiny, tokenizer):
    """transformers 5.24 renamed the forward's past_key_values to cache (the old name warns until 5.40)."""
    expected = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    for module in (tiny.module, tiny_model("gpt2", tokenizer).module):
        assert cache_keyword(module) == expected

    class OldStyle(torch.nn.Module):  # remote code written for transformers <= 5.23
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return input_ids

    assert cache_keyword(OldStyle()) == "past_key_values"


def test_passed_cache_finds_the_cache_under_either_name():
    cache = DynamicCache()
    assert passed_cache({"cache": cache}) is cache
    assert passed_cache({"past_key_values": cache, "use_cache": True}) is cache
    assert passed_cache({"cache": None, "past_key_values": cache}) is cache
    assert passed_cache({"use_cache": True}) is None


def test_new_cache_kinds_and_errors():
    config = MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, sliding_window=4)
    assert isinstance(new_cache("dynamic", config, 8), DynamicCache)
    with pytest.raises(ValueError, match="sliding-window.*cache='dynamic'"):
        new_cache("static", config, 8)
    with pytest.raises(ValueError, match="cache must be one of 'dynamic', 'static'"):
        new_cache("paged", config, 8)
    assert MistralForCausalLM  # the family the sliding-window refusal is about


@pytest.mark.parametrize("kind", KINDS)
def test_rollback_then_forward_rewrites_the_last_position(tiny_llama, kind):
    cache, ids = _filled(tiny_llama, kind)
    reference, _ = _filled(tiny_llama, "dynamic")
    rollback(cache, [0])  # layer 0 only
    assert _length(cache, 0) == 4 and _length(cache, 1) == 5
    rollback(cache, range(1, tiny_llama.n_layers))
    assert all(_length(cache, layer) == 4 for layer in range(tiny_llama.n_layers))
    # feeding the last token again restores every layer's last position as it was
    with torch.no_grad():
        tiny_llama.module(input_ids=ids[:, -1:], use_cache=True, position_ids=torch.full((2, 1), 4),
                          **{cache_keyword(tiny_llama.module): cache})
    for layer in range(tiny_llama.n_layers):
        assert _length(cache, layer) == 5
        torch.testing.assert_close(_keys_at(cache, layer, 4), _keys_at(reference, layer, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_last_entry_and_restore_for_some_rows(tiny_llama, kind):
    cache, _ = _filled(tiny_llama, kind)
    keys, values = last_entry(cache, 1)
    assert keys.shape[2] == 1 and torch.equal(keys[:, :, 0], _keys_at(cache, 1, 4))
    stored = cache.layers[1]
    stored.keys[:, :, 4] += 1.0  # what a re-run would write
    stored.values[:, :, 4] += 1.0
    restore_last_entry(cache, 1, keys, values, torch.tensor([True, False]))
    assert torch.equal(stored.keys[0, :, 4], keys[0, :, 0])  # row 0 restored
    assert torch.equal(stored.keys[1, :, 4], keys[1, :, 0] + 1.0)  # row 1 keeps the new entry
    assert torch.equal(stored.values[1, :, 4], values[1, :, 0] + 1.0)
    assert _length(cache, 1) == 5
