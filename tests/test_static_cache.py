"""The engine's static-cache path: the same tokens as the dynamic path, with every block.

``cache="static"`` allocates the KV cache once (prompt plus new tokens) and passes one attention
mask for the whole run; attention then runs over the whole static length with the unwritten
part masked, so logits may differ from the dynamic path's in the last bits, and greedy tokens
must not (issue: "Greedy tokens equal the eager path exactly in float32").
"""

import pytest
import torch
from conftest import PROMPTS, assert_same_probe_results, frequent_words, full_stack, run_full_stack
from test_block_contract import contract_blocks, stop_token
from tolerance import assert_close

import interventions  # noqa: F401  (registers the shipped blocks)
import probes  # noqa: F401
import surgery
from surgery.blocks import registered_blocks

NEW_TOKENS = 20


def both(model, prompts, new_tokens=NEW_TOKENS, **options):
    dynamic = surgery.generate(model, prompts, new_tokens, **options)
    static = surgery.generate(model, prompts, new_tokens, cache="static", **options)
    return dynamic, static


@pytest.mark.parametrize("chat", [False, True])
def test_greedy_tokens_equal_the_dynamic_path_for_a_padded_batch(tiny, chat):
    dynamic, static = both(tiny, PROMPTS, chat=chat)
    assert len(set(surgery.encode_prompts(tiny, PROMPTS, chat=chat)[1].sum(1).tolist())) > 1  # rows are padded
    assert static.token_ids == dynamic.token_ids
    assert static.stop_reasons == dynamic.stop_reasons


def test_an_unpadded_batch_and_early_stops(tiny_llama):
    eos = stop_token(tiny_llama)
    for prompts in ([PROMPTS[0]], [PROMPTS[0], PROMPTS[0]], PROMPTS):
        dynamic, static = both(tiny_llama, prompts, chat=True, eos_token_ids=[eos])
        assert static.token_ids == dynamic.token_ids and static.stop_reasons == dynamic.stop_reasons
    assert "eos" in static.stop_reasons and "length" in static.stop_reasons


def test_sampled_rows_equal_the_dynamic_path(tiny_llama):
    dynamic, static = both(tiny_llama, PROMPTS, chat=True, do_sample=True, temperature=0.8, seed=3)
    assert static.token_ids == dynamic.token_ids


def test_logits_agree_closely(tiny_llama):
    """The logits the static path picks from match the dynamic path's within float32 rounding."""
    seen = {}
    for cache in ("dynamic", "static"):
        logits = []

        def keep(choice, logits=logits):
            logits.append(choice.logits.clone())

        surgery.generate(tiny_llama, PROMPTS, 8, chat=True, cache=cache, on_choose=keep)
        seen[cache] = torch.stack(logits)
    scale = seen["dynamic"].abs().max()
    assert (seen["static"] - seen["dynamic"]).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("name", contract_blocks())
def test_every_block_gives_the_same_tokens_and_results(tiny, name):
    cls = registered_blocks()[name]
    eos = stop_token(tiny)
    outs, rows = [], []
    for cache in ("dynamic", "static"):
        block = cls.example(tiny, PROMPTS)
        with surgery.trace(tiny, block) as tr:
            outs.append(tr.generate(PROMPTS, NEW_TOKENS, chat=True, eos_token_ids=[eos], cache=cache))
        rows.append(block.by_row())
    assert outs[1].token_ids == outs[0].token_ids and outs[1].stop_reasons == outs[0].stop_reasons
    if rows[0] is not None:  # float32 states through a differently shaped attention
        assert_close(rows[1], rows[0], precision=torch.float32, path=f"{name}.by_row()")


def test_the_full_stack_gives_the_same_tokens_and_probe_results(tiny):
    eos, words = stop_token(tiny), frequent_words(tiny)
    ours = run_full_stack(tiny, eos, words)
    blocks = full_stack(tiny, words)
    with surgery.trace(tiny, *blocks) as tr:
        static = tr.generate(PROMPTS, 28, chat=True, eos_token_ids=[eos], cache="static")
    assert static.token_ids == ours[0].token_ids
    assert blocks[2].fired() == ours[1][2].fired() and any(blocks[2].fired())  # recycling fired
    assert_same_probe_results(ours[2], [blocks[4].result(static), blocks[5].result(), blocks[6].result()])


def test_a_bad_cache_kind_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="cache must be one of 'dynamic', 'static', got 'paged'"):
        surgery.generate(tiny_llama, PROMPTS, 4, cache="paged")


@pytest.mark.slow
def test_smollm2_full_stack_static_equals_dynamic(smollm2):
    from interventions import RepresentationRecycling, SteeringVector, TokenMask
    from surgery.triggers import OnText

    prompts = ["What is 12 * 7? Think step by step.", "List three prime numbers.", "Say hi."]

    def stack():
        vector = torch.randn(smollm2.d_model, generator=torch.Generator().manual_seed(0)) * 4
        return [SteeringVector(vector, layer=15, when=OnText("\n\n")), TokenMask(["Wait"], penalty=-3.0),
                RepresentationRecycling(layer=20)]

    outs = []
    for cache in ("dynamic", "static"):
        blocks = stack()
        with surgery.trace(smollm2, *blocks) as tr:
            outs.append(tr.generate(prompts, 48, chat=True, cache=cache))
        outs.append(blocks[2].fired())
    assert outs[2].token_ids == outs[0].token_ids
    assert outs[3] == outs[1]
