"""RecordSite: recorded values equal the model's own hidden states, only where it fires."""

import torch
from conftest import PROMPTS
from tolerance import assert_close

import surgery
from probes import RecordSite
from surgery.triggers import OnTokens


def test_records_equal_output_hidden_states_at_fired_positions(tiny):
    probe = RecordSite("resid_post.1", when=OnTokens("\n\n"))
    with surgery.trace(tiny, probe) as tr:
        out = tr.generate(PROMPTS, 16)
    got = probe.result()
    assert len(got.values) > 0
    mask_all = tiny.vocabulary_mask(("\n\n",))
    for row, prompt in enumerate(PROMPTS):
        ids, _ = surgery.encode_prompts(tiny, [prompt])
        fed = torch.tensor([ids[0].tolist() + out.token_ids[row][:-1]])
        with torch.no_grad():
            hidden = tiny.module(input_ids=fed, output_hidden_states=True).hidden_states[2][0]
        expected_positions = mask_all[fed[0]].nonzero().flatten()
        positions, values = got.for_row(row)
        assert positions.tolist() == expected_positions.tolist()
        assert_close(values, hidden[expected_positions])


def test_probe_does_not_change_tokens(tiny):
    with surgery.trace(tiny, RecordSite("resid_pre.0"), RecordSite("logits")) as tr:
        out = tr.generate(PROMPTS, 12)
    assert out.token_ids == surgery.generate(tiny, PROMPTS, 12).token_ids


def test_empty_result_when_nothing_fires(tiny_llama):
    probe = RecordSite("mlp_out.-1", when=OnTokens(ids=[1]) & ~OnTokens(ids=[1]))
    with surgery.trace(tiny_llama, probe) as tr:
        tr.generate(PROMPTS, 4)
    assert probe.result().values.shape == (0, 64)
