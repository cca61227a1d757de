"""The acceptance stack on the embedded SmolLM2 through all three backends (slow: real model).

One SmolLM2 module, booted into a TransformerLens bridge first (booting rebuilds it in place),
then wrapped three ways: as the HF model, as the bridge and as an nnsight LanguageModel. The
same prompts (different lengths) and the same stack give identical greedy tokens, and the
probes agree within float32 tolerance.
"""

import copy
import warnings

import pytest
from conftest import assert_same_probe_results, run_full_stack

import surgery

pytestmark = pytest.mark.slow
transformer_lens = pytest.importorskip("transformer_lens")
nnsight = pytest.importorskip("nnsight")


def test_the_full_stack_is_the_same_on_hf_the_bridge_and_nnsight():
    from transformer_lens.model_bridge import TransformerBridge

    hf = surgery.load()  # its own copy: booting changes the module in place
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a copy: TransformerLens sets a BOS token on the tokenizer it is given
        bridge = TransformerBridge.boot_transformers("smollm2", hf_model=hf.module, tokenizer=copy.deepcopy(hf.tokenizer))
        lm = nnsight.LanguageModel(hf.module, tokenizer=hf.tokenizer)
    eos = hf.eos_token_ids[0]
    words = ("So", "Wait", "First")
    # wrap(bridge, tokenizer): HF's tokenizer, as the bridge's own may prepend BOS to plain text
    backends = [("hf", hf), ("bridge", surgery.wrap(bridge, hf.tokenizer)), ("nnsight", surgery.wrap(lm))]
    runs = {name: run_full_stack(model, eos, words, new_tokens=24) for name, model in backends}
    hf_out, hf_blocks, hf_results = runs["hf"]
    assert sum(map(len, hf_blocks[0].fired())) > 0  # SEAL steering fired at blank lines
    for name in ("bridge", "nnsight"):
        out, blocks, results = runs[name]
        assert out.token_ids == hf_out.token_ids, name
        for ours, theirs in zip(blocks[:4], hf_blocks[:4]):
            assert ours.by_row() == theirs.by_row(), (name, ours.name)
        assert_same_probe_results(results, hf_results)
