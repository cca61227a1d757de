"""TransformerLens 4 as a backend: a TransformerBridge wrapped, its hook names as sites, and
architectures our table lacks resolved through the bridge (tiny random models, offline)."""

import copy
import warnings

import pytest
import torch
from conftest import PROMPTS, all_hooks, frequent_words, assert_same_probe_results, logits_of, run_full_stack, tiny_model
from tolerance import assert_close

import surgery
from interventions import ResidualAdd
from probes import RecordSite, ThoughtClassifier
from surgery.hosts.bridge import BridgeArchitecture
from surgery.triggers import Always

transformer_lens = pytest.importorskip("transformer_lens")
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402


def booted(kind, tokenizer):
    """A fresh tiny model and a bridge booted around it (in place: compare on this module)."""
    model = tiny_model(kind, tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(f"tiny-{kind}", hf_model=model.module, tokenizer=copy.deepcopy(tokenizer))
    return model, bridge


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_plain_generation_equals_the_bridges_own_generate(tokenizer, kind):
    model, bridge = booted(kind, tokenizer)
    ours = surgery.wrap(bridge)
    assert ours.host is bridge and isinstance(ours.architecture, BridgeArchitecture) and ours.module is model.module
    rows = [tokenizer.encode(p) for p in PROMPTS]  # token ids: no BOS added by either side
    out = surgery.generate(ours, rows, 12, eos_token_ids=[])
    width = max(map(len, rows))
    padded = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    with torch.no_grad():
        theirs = bridge.generate(padded, max_new_tokens=12, do_sample=False, stop_at_eos=False, attention_mask=mask,
                                 return_type="tokens", verbose=False)
    assert out.token_ids == theirs[:, width:].tolist()
    # and both are the tokens of the same weights never booted (a bridge whose attention lost the
    # KV cache would agree with itself, not with this)
    assert out.token_ids == surgery.generate(tiny_model(kind, tokenizer), rows, 12, eos_token_ids=[]).token_ids


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_booted_models_own_generate_reads_its_kv_cache(tokenizer, kind):
    """TransformerLens 4.3's attention reads the cache as past_key_values=, transformers >= 5.24
    passes it as cache=: once the toolkit has seen the bridge, the HF model's own greedy generate
    on the booted module gives the never-booted model's tokens, as on transformers <= 5.23."""
    never_booted = tiny_model(kind, tokenizer).module  # the same seed: the same weights
    model, bridge = booted(kind, tokenizer)
    surgery.wrap(bridge)
    surgery.wrap(bridge)  # idempotent
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            ours = model.module.generate(ids, max_new_tokens=12, do_sample=False)
            reference = never_booted.generate(ids, max_new_tokens=12, do_sample=False)
        assert ours.tolist() == reference.tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_full_stack_gives_the_same_tokens_and_probe_results_as_on_hf(tokenizer, kind):
    model, bridge = booted(kind, tokenizer)
    eos, words = surgery.generate(model, PROMPTS, 12, chat=True).token_ids[0][5], frequent_words(model)
    hf_out, hf_blocks, hf_results = run_full_stack(model, eos, words)
    out, blocks, results = run_full_stack(surgery.wrap(bridge), eos, words)
    assert sum(map(len, hf_blocks[0].fired())) > 0 and sum(map(len, hf_blocks[2].fired())) > 0  # steering and RR act
    assert out.token_ids == hf_out.token_ids and out.stop_reasons == hf_out.stop_reasons
    for ours, theirs in zip(blocks[:4], hf_blocks[:4]):
        assert ours.by_row() == theirs.by_row()
    assert_same_probe_results(results, hf_results)


def test_transformer_lens_hook_names_are_sites_and_results_name_them_as_written(tokenizer):
    model, bridge = booted("llama", tokenizer)
    ours = surgery.wrap(bridge)
    vector = torch.randn(ours.d_model, generator=torch.Generator().manual_seed(1)) * 5
    runs = {}
    for label, site in [("ours", "resid_post.1"), ("tl", "blocks.1.hook_out"), ("alias", "blocks.1.hook_resid_post")]:
        with surgery.trace(ours, ResidualAdd(vector, site=site, when=Always())) as tr:
            runs[label] = tr.generate(PROMPTS, 10, chat=True).token_ids
    assert runs["tl"] == runs["ours"] == runs["alias"] != surgery.generate(ours, PROMPTS, 10, chat=True).token_ids
    probe = ThoughtClassifier("blocks.2.hook_in")
    with surgery.trace(ours, probe) as tr:
        tr.generate(PROMPTS, 10, chat=True)
    assert probe.result().site == "blocks.2.hook_in"


def test_hook_names_mean_the_hf_hidden_states(tokenizer):
    """blocks.L.hook_in is hidden_states[L], blocks.L.hook_out hidden_states[L+1], on HF and on the bridge."""
    model, bridge = booted("qwen2", tokenizer)
    for wrapped in (model, surgery.wrap(bridge)):
        probes = {name: RecordSite(name, when=Always()) for name in ("blocks.1.hook_in", "blocks.1.hook_out", "hook_unembed")}
        with surgery.trace(wrapped, *probes.values()) as tr:
            logits = tr.run(["Tom has 3 apples."])
        ids, _ = surgery.encode_prompts(wrapped, ["Tom has 3 apples."])
        with torch.no_grad():
            hidden = model.module(input_ids=ids, output_hidden_states=True).hidden_states
        assert_close(probes["blocks.1.hook_in"].result().values, hidden[1][0])
        assert_close(probes["blocks.1.hook_out"].result().values, hidden[2][0])
        assert_close(probes["hook_unembed"].result().values, logits[0])


def test_leaving_a_trace_leaves_the_bridge_as_found(tokenizer):
    model, bridge = booted("llama", tokenizer)
    ours = surgery.wrap(bridge)
    surgery.generate(ours, PROMPTS, 2)  # the bridge adds its own capture hooks on a first forward
    before, hooks = logits_of(ours), all_hooks(model.module)
    blocks = run_full_stack(ours, eos=2)[1]
    with pytest.raises(KeyboardInterrupt):
        with surgery.trace(ours, *[type(b).from_dict(b.to_dict(), b.tensors()) for b in blocks]) as tr:
            tr.generate(PROMPTS, 4, chat=True)
            raise KeyboardInterrupt
    assert all_hooks(model.module) == hooks and not bridge.list_hooks()
    assert torch.equal(logits_of(ours), before)
    with torch.no_grad():
        assert torch.equal(bridge(torch.tensor([[5, 6, 7]])), model.module(input_ids=torch.tensor([[5, 6, 7]])).logits)


def test_a_bridge_in_compatibility_mode_or_a_booted_module_is_a_clear_error(tokenizer):
    model, bridge = booted("llama", tokenizer)
    with pytest.raises(ValueError, match="wrap the bridge instead"):
        surgery.wrap(model.module, tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge.enable_compatibility_mode(disable_warnings=True)
    with pytest.raises(ValueError, match="compatibility mode.*without\\s+enable_compatibility_mode"):
        surgery.wrap(bridge)


def foreign(kind, tokenizer):
    """A tiny random model of an architecture our site table lacks (configs checked offline)."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, Olmo2Config,
                              Olmo2ForCausalLM, Phi3Config, Phi3ForCausalLM)

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=128, pad_token_id=0, eos_token_id=2, bos_token_id=None, initializer_range=0.2)
    made = {
        "phi3": lambda: Phi3ForCausalLM(Phi3Config(num_key_value_heads=2, original_max_position_embeddings=128,
                                                   tie_word_embeddings=False, **common)),
        "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                                         sliding_window=8, **common)),
        "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=True,
                                                             tie_word_embeddings=False, **common)),
        "olmo2": lambda: Olmo2ForCausalLM(Olmo2Config(num_key_value_heads=2, **common)),
    }
    torch.manual_seed(0)
    module = made[kind]().eval()
    module.generation_config.pad_token_id = 0
    return module


@pytest.mark.parametrize("kind", ["phi3", "gemma2", "gpt_neox"])
def test_architectures_our_table_lacks_resolve_through_a_bridge(tokenizer, kind):
    module = foreign(kind, tokenizer)
    with pytest.warns(UserWarning, match=f"'{kind}' is not in surgery's site table: booted a TransformerLens bridge"):
        model = surgery.wrap(module, tokenizer)
    assert isinstance(model.architecture, BridgeArchitecture) and model.architecture.name == kind
    ids, mask = surgery.encode_prompts(model, PROMPTS)
    with torch.no_grad():
        reference = module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert surgery.generate(model, PROMPTS, 10, eos_token_ids=[]).token_ids == reference[:, ids.shape[1]:].tolist()
    # the sites are HF's hidden states, and an edit at one changes the tokens
    probes = [RecordSite("resid_pre.1", when=Always()), RecordSite("resid_post.1", when=Always())]
    with surgery.trace(model, *probes) as tr:
        tr.run(["Tom has 3 apples."])
    one, _ = surgery.encode_prompts(model, ["Tom has 3 apples."])
    with torch.no_grad():
        hidden = module(input_ids=one, output_hidden_states=True).hidden_states
    assert_close(probes[0].result().values, hidden[1][0])
    assert_close(probes[1].result().values, hidden[2][0])
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1)) * 5
    with surgery.trace(model, ResidualAdd(vector, site="resid_post.0", when=Always())) as tr:
        steered = tr.generate(PROMPTS, 10, eos_token_ids=[]).token_ids
    assert steered != reference[:, ids.shape[1]:].tolist()


def test_an_architecture_neither_table_knows_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match=r"unsupported architecture 'olmo2'.*TransformerLens cannot resolve it either"):
        surgery.wrap(foreign("olmo2", tokenizer), tokenizer)
