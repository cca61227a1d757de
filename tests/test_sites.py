"""Sites: parsing, range checks, and the per-architecture table against HF's own hidden states."""

import pytest
import torch
from conftest import tiny_model
from tolerance import assert_close

from surgery.sites import ARCHITECTURES, Site, architecture_of, hook_site


def test_parse_and_resolve():
    assert Site.parse("resid_pre.20") == Site("resid_pre", 20)
    assert Site.parse("mlp_out.-1").resolve(30) == Site("mlp_out", 29)
    assert Site.parse("logits").resolve(30) == Site("logits")
    assert str(Site("attn_out", 3)) == "attn_out.3"


@pytest.mark.parametrize(
    "text, message",
    [("resid_mid.3", "unknown site"), ("resid_pre", "unknown site"), ("resid_pre.x", "not an integer"), ("", "unknown site")],
)
def test_bad_sites_name_what_is_supported(text, message):
    with pytest.raises(ValueError, match=message) as error:
        Site.parse(text)
    if message == "unknown site":
        assert "resid_pre.L" in str(error.value) and "logits" in str(error.value)


@pytest.mark.parametrize(
    "name, site",
    [("blocks.15.hook_in", "resid_pre.15"), ("blocks.15.hook_resid_pre", "resid_pre.15"),
     ("blocks.3.hook_out", "resid_post.3"), ("blocks.3.hook_resid_post", "resid_post.3"),
     ("blocks.0.attn.hook_out", "attn_out.0"), ("blocks.0.hook_attn_out", "attn_out.0"),
     ("blocks.-1.mlp.hook_out", "mlp_out.-1"), ("blocks.2.hook_mlp_out", "mlp_out.2"),
     ("unembed.hook_out", "logits"), ("hook_unembed", "logits")],
)
def test_transformer_lens_hook_names_are_sites_named_as_written(name, site):
    parsed = Site.parse(name)
    assert parsed == Site.parse(site) and parsed.canonical == site and str(parsed) == name
    resolved = parsed.resolve(30)
    assert str(resolved) == name and resolved.canonical == Site.parse(site).resolve(30).canonical


def test_other_transformer_lens_hooks_are_refused_with_the_list():
    with pytest.raises(ValueError, match=r"unknown site 'blocks.1.attn.hook_pattern'.*blocks.L.hook_in"):
        Site.parse("blocks.1.attn.hook_pattern")


def test_out_of_range_names_the_valid_range():
    with pytest.raises(ValueError, match=r"0\.\.29 \(or -30\.\.-1"):
        Site("resid_post", 30).resolve(30)


def test_unknown_architecture_names_the_supported_ones():
    from transformers import BertConfig, BertModel

    with pytest.raises(ValueError, match="unsupported architecture 'bert'") as error:
        architecture_of(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)))
    assert "llama" in str(error.value) and "qwen2" in str(error.value) and "gpt2" in str(error.value)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_residual_sites_read_hf_hidden_states(tokenizer, kind):
    """resid_pre.L is hidden_states[L]; resid_post.L is hidden_states[L+1] (last one before the norm)."""
    model = tiny_model(kind, tokenizer)
    seen = {}
    handles = []
    for L in range(model.n_layers):
        for name in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
            site = Site(name, L)
            module, hook_kind = model.architecture.module_for(model.module, site)
            handles.append(hook_site(module, hook_kind, lambda v, s=str(site): seen.__setitem__(s, v.clone()) or v))
    module, hook_kind = model.architecture.module_for(model.module, Site("logits"))
    handles.append(hook_site(module, hook_kind, lambda v: seen.__setitem__("logits", v.clone()) or v))
    ids = torch.tensor([[5, 6, 7, 8]])
    try:
        with torch.no_grad():
            out = model.module(input_ids=ids, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    hidden = out.hidden_states
    for L in range(model.n_layers):
        assert_close(seen[f"resid_pre.{L}"], hidden[L])
        if L < model.n_layers - 1:  # HF's last entry is after the final norm; ours is before it
            assert_close(seen[f"resid_post.{L}"], hidden[L + 1])
        # the block adds its attention and MLP outputs to the stream
        assert_close(seen[f"resid_pre.{L}"] + seen[f"attn_out.{L}"] + seen[f"mlp_out.{L}"], seen[f"resid_post.{L}"])
    final_norm = model.module.get_submodule(model.architecture.final_norm)
    with torch.no_grad():
        assert_close(final_norm(seen[f"resid_post.{model.n_layers - 1}"]), hidden[-1])
    assert_close(seen["logits"], out.logits)


def test_every_table_entry_names_real_modules(tokenizer):
    for kind in ("llama", "qwen2", "gpt2"):
        model = tiny_model(kind, tokenizer)
        assert model.architecture is ARCHITECTURES[kind]
        for name in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
            module, _ = model.architecture.module_for(model.module, Site(name, model.n_layers - 1))
            assert isinstance(module, torch.nn.Module)
