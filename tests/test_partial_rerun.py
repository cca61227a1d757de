"""surgery.decode.partial_rerun: recycling re-runs only the blocks from its layer up, with the tokens of
a full re-run. (tests/test_recycling.py checks the same path against a full-sequence reference.)"""

import pytest
import torch
from conftest import PROMPTS, frequent_words

import surgery
import surgery.decode.forward
from interventions import RepresentationRecycling, ResidualAdd
from surgery.decode.partial_rerun import LayerInputs
from surgery.triggers import Always

LAYER = 2


def count_calls(module):
    calls = []
    return calls, module.register_forward_pre_hook(lambda *_: calls.append(1))


def go(model, cache, words):
    rr = RepresentationRecycling(layer=LAYER, trigger_words=words)
    # an edit at the recycled block's own input: a re-run must apply it exactly once
    add = ResidualAdd(torch.randn(model.d_model, generator=torch.Generator().manual_seed(1)), site=f"resid_pre.{LAYER}",
                      when=Always())
    blocks = model.architecture.block_list(model.module)
    (bottom, h1), (top, h2) = count_calls(blocks[0]), count_calls(blocks[-1])
    try:
        with surgery.trace(model, add, rr) as tr:
            out = tr.generate(PROMPTS, 20, chat=True, cache=cache)
    finally:
        h1.remove()
        h2.remove()
    decode_reruns = rr.reruns() - int(bool(rr._records[0][1].any()))  # the first token's re-run is a full one
    return out, rr.fired(), len(bottom), len(top), decode_reruns


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_partial_rerun_equals_a_full_rerun_and_skips_the_blocks_below(tiny, cache, monkeypatch):
    words = frequent_words(tiny)
    out, fired, bottom, top, decode_reruns = go(tiny, cache, words)
    monkeypatch.setattr(surgery.decode.forward, "supports_partial_rerun", lambda architecture: False)
    full_out, full_fired, full_bottom, full_top, _ = go(tiny, cache, words)
    assert out.token_ids == full_out.token_ids and fired == full_fired
    assert decode_reruns > 0
    assert full_bottom - bottom == decode_reruns  # block 0 never ran again for a decode-step re-run
    assert top == full_top  # the blocks above ran in both


def test_layer_inputs_errors(tiny_llama):
    with pytest.raises(ValueError, match="first must be a block index in 0..3, got 4"):
        LayerInputs(tiny_llama.module, tiny_llama.architecture, 4)
    inputs = LayerInputs(tiny_llama.module, tiny_llama.architecture, 1)
    try:
        with pytest.raises(RuntimeError, match="no single-position forward has been recorded"):
            inputs.rerun(1)
        with pytest.raises(ValueError, match="recorded blocks are 1..3, asked to start at 0"):
            inputs.rerun(0)
    finally:
        inputs.remove()
    assert not any(block._forward_pre_hooks for block in tiny_llama.architecture.block_list(tiny_llama.module))


def test_layer_inputs_rerun_reproduces_the_forward(tiny_llama):
    """Re-running blocks 1.. on their recorded inputs (cache rolled back) gives the forward's logits."""
    from surgery.decode.kv_cache import cache_keyword, new_cache, rollback

    module = tiny_llama.module
    cache = new_cache("dynamic", module.config, 16)
    inputs = LayerInputs(module, tiny_llama.architecture, 1)
    try:
        with torch.no_grad():
            passing = {cache_keyword(module): cache, "use_cache": True}
            module(input_ids=torch.tensor([[3, 4, 5]]), **passing)
            logits = module(input_ids=torch.tensor([[6]]), **passing).logits[:, -1]
            rollback(cache, range(1, tiny_llama.n_layers))
            again = inputs.rerun(1)
    finally:
        inputs.remove()
    assert torch.equal(again, logits.float())
