"""Integration on the embedded SmolLM2-135M-Instruct (slow: loads the real model; run in CI)."""

import pytest
import torch
from conftest import occurrences_ending_at_each_token

import surgery
from interventions import ResidualAdd
from probes import RecordSite
from surgery.examples import ARITHMETIC_PROBLEMS
from surgery.triggers import OnText, OnTokens

pytestmark = pytest.mark.slow

PROMPTS = [ARITHMETIC_PROBLEMS[0], "What is 7 * 8? Explain in two short paragraphs.", ARITHMETIC_PROBLEMS[2]]


def test_greedy_equals_hf_generate_on_a_padded_batch(smollm2):
    out = surgery.generate(smollm2, PROMPTS, 40, chat=True)
    input_ids, mask = surgery.encode_prompts(smollm2, PROMPTS, chat=True)
    assert len(set(mask.sum(1).tolist())) == 3
    with torch.inference_mode():
        reference = smollm2.module.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=40,
                                            do_sample=False, pad_token_id=smollm2.pad_token_id)
    eos = set(smollm2.eos_token_ids)
    for row, tokens in zip(reference[:, input_ids.shape[1]:].tolist(), out.token_ids):
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        assert row[:cut] == tokens


def test_steering_fires_at_blank_lines_and_rows_match_alone(smollm2):
    vector = torch.randn(smollm2.d_model, generator=torch.Generator().manual_seed(0)) * 20

    def steer(prompts):
        add = ResidualAdd(vector, site="resid_pre.15", when=OnText("\n\n"))
        record = RecordSite("resid_pre.15", when=OnText("\n\n"))
        with surgery.trace(smollm2, add, record) as tr:
            out = tr.generate(prompts, 64, chat=True)
        return out, add.fired(), record.result()

    out, fired, recorded = steer(PROMPTS)
    assert sum(map(len, fired)) >= 2
    texts = smollm2.vocabulary_texts
    for row, prompt in enumerate(PROMPTS):
        ids, _ = surgery.encode_prompts(smollm2, [prompt], chat=True)
        fed = ids[0].tolist() + out.token_ids[row][:-1]
        hits = occurrences_ending_at_each_token(texts, fed, "\n\n")
        assert fired[row] == [position for position, hit in enumerate(hits) if hit]
        alone, fired_alone, _ = steer([prompt])
        assert alone.token_ids[0] == out.token_ids[row] and fired_alone[0] == fired[row]
    # the probe fires at the same (row, position) pairs as the add
    recorded_pairs = sorted(zip(recorded.rows.tolist(), recorded.positions.tolist()))
    assert recorded_pairs == sorted((r, p) for r, row in enumerate(fired) for p in row)


def test_steered_logits_equal_a_plain_hook_without_cache(smollm2):
    vector = torch.randn(smollm2.d_model, generator=torch.Generator().manual_seed(1)) * 20
    add = ResidualAdd(vector, site="resid_pre.10", when=OnText("\n\n"))
    with surgery.trace(smollm2, add) as tr:
        out = tr.generate([PROMPTS[0]], 64, chat=True)
    assert add.fired()[0]
    ids, _ = surgery.encode_prompts(smollm2, [PROMPTS[0]], chat=True)
    full = torch.tensor([ids[0].tolist() + out.token_ids[0]])
    fire = torch.zeros_like(full, dtype=torch.bool)
    fire[0, add.fired()[0]] = True
    layer = smollm2.architecture.block_list(smollm2.module)[10]
    handle = layer.register_forward_pre_hook(lambda m, a, k: ((a[0] + fire[:, :, None] * vector,), k), with_kwargs=True)
    try:
        with torch.inference_mode():
            logits = smollm2.module(input_ids=full).logits[0]
    finally:
        handle.remove()
    assert logits[ids.shape[1] - 1 : -1].argmax(-1).tolist() == out.token_ids[0]


def test_single_token_separators_exist_in_the_vocabulary(smollm2):
    mask = OnTokens("\n\n").bind(smollm2)._vocabulary
    texts = smollm2.vocabulary_texts
    assert mask[texts.index("\n\n")] and mask[texts.index("\n\n\n")] and mask[texts.index(" \n\n")]
    assert int(mask.sum()) == sum("\n\n" in t for t in texts)


def test_bad_input_on_the_real_model(smollm2):
    with pytest.raises(ValueError, match="context of 8192"):
        surgery.generate(smollm2, ["word " * 9000], 4)
    with pytest.raises(ValueError, match="width 64"):
        with surgery.trace(smollm2, ResidualAdd(torch.ones(64), site="resid_pre.3")):
            pass
    assert surgery.generate(smollm2, ["2+2="], 4).lengths == [4]
