"""TLHooks: our blocks inside a TransformerBridge's own generate and run_with_hooks equal our engine
on the same bridge (tiny random Llama and Qwen2, offline), and leave the bridge as found."""

import pytest
import torch
from conftest import ANSWERS, PROMPTS, all_hooks, logits_of
from test_bridge import booted
from tolerance import assert_close

import surgery
from interventions import RepresentationRecycling, ResidualAdd, SteeringVector, ThinkingTokenInsertion, TokenMask
from probes import MIEstimator, RecordSite, ThoughtClassifier
from surgery.hosts.tl_hooks import TLHooks
from surgery.triggers import Always, InThink, OnText, OnTokens, StepWindow

pytest.importorskip("transformer_lens")

# half the rows open a think span, so SEAL's trigger (inside <think> only) differs between rows
THINK_PROMPTS = [p if i % 2 else "<think>" + p for i, p in enumerate(PROMPTS)]
NEW_TOKENS = 16


def generation_blocks(model):
    """Steering at "\\n\\n" inside <think>, an add at a TL hook name, token masks in both match
    modes (soft and hard), and two probes (fresh blocks each call)."""
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)) * 5
    return [
        SteeringVector(vector, layer=1, when=OnTokens("\n\n") & InThink()),
        ResidualAdd(vector / 4, site="blocks.1.hook_out", when=Always()),
        # words the tiny models emit as top tokens, so the masks hit
        TokenMask(["Fi", "Yes"], penalty=-5.0, match="token", when=StepWindow(0, 12)),
        TokenMask(["che", "To", "ely"], penalty=None, match="text"),
        TokenMask(["Ok", "nat", "gh"], penalty=-2.0, match="text", when=StepWindow(1, 16)),
        MIEstimator(answers=ANSWERS),
        ThoughtClassifier("blocks.2.hook_in"),
    ]


def tl_generate(bridge, blocks, eos):
    """bridge.generate with the blocks as TL hooks: (new tokens per row, the TLHooks)."""
    with TLHooks(bridge, *blocks, eos_token_ids=[eos]) as hooks, bridge.hooks(fwd_hooks=hooks.fwd_hooks()):
        tokens = bridge.generate(THINK_PROMPTS, max_new_tokens=NEW_TOKENS, do_sample=False, prepend_bos=False,
                                 eos_token_id=eos, return_type="tokens", verbose=False)
    width = max(len(bridge.tokenizer.encode(p)) for p in THINK_PROMPTS)  # the bridge pads on the left
    return tokens[:, width:].tolist(), hooks


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_steering_and_masks_in_the_bridges_generate_equal_our_engine(tokenizer, kind):
    _, bridge = booted(kind, tokenizer)
    ours = surgery.wrap(bridge)
    # an EOS that a steered row emits, so it stops early and the bridge feeds it EOS after (picked
    # so that every block still acts on both tiny models)
    with surgery.trace(ours, *generation_blocks(ours)) as tr:
        eos = tr.generate(THINK_PROMPTS, NEW_TOKENS).token_ids[1][12]
    engine_blocks = generation_blocks(ours)
    with surgery.trace(ours, *engine_blocks) as tr:
        out = tr.generate(THINK_PROMPTS, NEW_TOKENS, eos_token_ids=[eos])
    assert "eos" in out.stop_reasons and min(out.lengths) < NEW_TOKENS
    assert out.token_ids != surgery.generate(ours, THINK_PROMPTS, NEW_TOKENS, eos_token_ids=[eos]).token_ids

    blocks = generation_blocks(ours)
    theirs, hooks = tl_generate(bridge, blocks, eos)
    names = ["blocks.1.hook_in", "blocks.1.hook_out", "unembed.hook_out", f"blocks.{ours.n_layers - 1}.hook_out", "blocks.2.hook_in"]
    assert [name for name, _ in hooks.fwd_hooks()] == names
    assert [row[:n] for row, n in zip(theirs, out.lengths)] == out.token_ids  # up to each row's stop
    assert all(set(row[n:]) <= {eos} for row, n in zip(theirs, out.lengths))  # then the bridge feeds EOS
    for mine, engine in zip(blocks[:5], engine_blocks[:5]):
        assert mine.fired() == engine.fired()
        assert mine.by_row() == engine.by_row()
    fired = [sum(map(len, block.fired())) for block in engine_blocks[:5]]
    assert all(fired), fired  # every block acted: the test is not vacuous
    for a, b in zip(blocks[5].result(out).values, engine_blocks[5].result(out).values, strict=True):
        assert_close(a, b, precision=torch.float32)
    thoughts, engine_thoughts = blocks[6].result(), engine_blocks[6].result()
    assert thoughts.thoughts == engine_thoughts.thoughts and thoughts.site == "blocks.2.hook_in"
    for a, b in zip(thoughts.states, engine_thoughts.states, strict=True):
        assert_close(a, b, precision=torch.float32)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_run_with_hooks_equals_our_run(tokenizer, kind):
    _, bridge = booted(kind, tokenizer)
    ours = surgery.wrap(bridge)
    vector = torch.randn(ours.d_model, generator=torch.Generator().manual_seed(1)) * 5

    def blocks():
        return [ResidualAdd(vector, site="resid_pre.1", when=OnText("\n\n")), RecordSite("blocks.1.hook_out"),
                ThoughtClassifier("resid_pre.2"), RecordSite("logits", when=OnTokens("."))]

    engine_blocks = blocks()
    with surgery.trace(ours, *engine_blocks) as tr:
        expected = tr.run(THINK_PROMPTS)
    mine = blocks()
    with TLHooks(bridge, *mine) as hooks:
        logits = bridge.run_with_hooks(THINK_PROMPTS, fwd_hooks=hooks.fwd_hooks(), prepend_bos=False, padding_side="left")
    assert mine[0].fired() == engine_blocks[0].fired() and sum(map(len, mine[0].fired())) > 0
    valid = surgery.encode_prompts(ours, THINK_PROMPTS)[1].bool()
    assert_close(logits[valid], expected[valid])
    for probe, engine in [(mine[1], engine_blocks[1]), (mine[3], engine_blocks[3])]:
        got, want = probe.result(), engine.result()
        assert got.rows.tolist() == want.rows.tolist() and got.positions.tolist() == want.positions.tolist()
        assert_close(got.values, want.values)
    assert mine[2].result().thoughts == engine_blocks[2].result().thoughts
    for a, b in zip(mine[2].result().states, engine_blocks[2].result().states, strict=True):
        assert_close(a, b)


def test_token_choice_blocks_are_refused_with_the_way_to_run_them(tokenizer):
    _, bridge = booted("llama", tokenizer)
    for block in (ThinkingTokenInsertion(words=(" Wait",), budget=6, answer_prompt=" So", answer_tokens=2),
                  RepresentationRecycling(layer=0, trigger_words=("Wait",))):
        with pytest.raises(ValueError, match=rf"{type(block).__name__}.*surgery\.trace\(surgery\.wrap\(bridge\), \*blocks\)"):
            TLHooks(bridge, RecordSite("resid_post.0"), block)


def test_hook_functions_outside_the_adapter_and_a_second_prefill_in_a_cache_are_clear_errors(tokenizer):
    _, bridge = booted("llama", tokenizer)
    hooks = TLHooks(bridge, RecordSite("resid_post.0"))
    with pytest.raises(RuntimeError, match="outside `with TLHooks"):
        bridge.run_with_hooks(PROMPTS[0], fwd_hooks=hooks.fwd_hooks(), prepend_bos=False)
    with hooks, pytest.raises(ValueError, match="one token per row after its prefill"):
        logits, cache = bridge.run_with_hooks(PROMPTS[0], fwd_hooks=hooks.fwd_hooks(), prepend_bos=False,
                                              return_type="logits_and_cache", use_cache=True)
        bridge.run_with_hooks(PROMPTS[1], fwd_hooks=hooks.fwd_hooks(), prepend_bos=False, past_key_values=cache)


def test_after_use_and_after_exceptions_the_bridge_computes_what_it_did(tokenizer):
    model, bridge = booted("llama", tokenizer)
    ours = surgery.wrap(bridge)
    surgery.generate(ours, PROMPTS, 2)  # the bridge adds its own capture hooks on a first forward
    before, hooks_before = logits_of(ours), all_hooks(model.module)
    tl_generate(bridge, generation_blocks(ours), eos=2)
    with pytest.raises(KeyboardInterrupt):
        with TLHooks(bridge, *generation_blocks(ours)) as hooks, bridge.hooks(fwd_hooks=hooks.fwd_hooks()):
            bridge.generate(THINK_PROMPTS, max_new_tokens=3, do_sample=False, prepend_bos=False, verbose=False)
            raise KeyboardInterrupt
    with pytest.raises(ValueError, match="answers"):  # raised by a block inside the bridge's forward
        with TLHooks(bridge, MIEstimator(answers=ANSWERS[:2])) as hooks, bridge.hooks(fwd_hooks=hooks.fwd_hooks()):
            bridge.generate(THINK_PROMPTS, max_new_tokens=3, do_sample=False, prepend_bos=False, verbose=False)
    assert all_hooks(model.module) == hooks_before and not bridge.list_hooks()
    assert torch.equal(logits_of(ours), before)
