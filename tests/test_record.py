"""RecordSite: recorded values equal the model's own hidden states, only where it fires."""

import torch
from conftest import PROMPTS
from tolerance import assert_close

import surgery
from probes import RecordSite
from surgery.triggers import OnText, OnTokens, StepWindow


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


def test_in_slots_the_result_equals_the_fixed_batch_and_each_prompt_alone(tiny):
    """Continuous batching (batch_size=2 over five prompts, rows ending at different steps):
    every vector is kept under its prompt with the row's own step index, and the whole result
    (order included) equals a fixed batch's; a fixed run afterwards is as a fresh probe's."""
    prompts = [*PROMPTS, PROMPTS[0]]
    eos = surgery.generate(tiny, PROMPTS, 12, chat=True).token_ids[1][4]  # ends some rows early

    def go(prompts, probe=None, **options):
        probe = probe or RecordSite("resid_post.1", when=OnText("\n\n") | StepWindow(2, 4))
        with surgery.trace(tiny, probe) as tr:
            out = tr.generate(prompts, 14, chat=True, eos_token_ids=[eos], **options)
        return out, probe

    pooled_out, pooled = go(prompts, batch_size=2)
    fixed_out, fixed = go(prompts)
    assert pooled_out.token_ids == fixed_out.token_ids and len(set(fixed_out.lengths)) > 1
    got, expected = pooled.result(), fixed.result()
    assert got.steps.max() <= max(fixed_out.lengths) < pooled_out.timings["steps"]  # own steps, not the pool's
    assert_close(got, expected, precision=torch.float32)
    assert set(got.rows.tolist()) == set(range(len(prompts))) and set(got.steps.tolist()) >= {0, 2, 3}
    assert len(pooled.by_row()) == len(prompts)
    for i, prompt in enumerate(prompts):
        _, alone = go([prompt])
        assert_close(alone.by_row()[0], pooled.by_row()[i], precision=torch.float32)
        assert torch.equal(alone.result().steps, got.steps[got.rows == i])
    _, again = go(prompts, pooled)  # reset: a fixed run as before
    assert_close(again.result(), expected, precision=torch.float32)
