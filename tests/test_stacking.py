"""All four interventions in one trace, with a probe: batched rows behave as they would alone."""

import torch
from conftest import PROMPTS, frequent_words
from tolerance import assert_close

import surgery
from interventions import RepresentationRecycling, SteeringVector, ThinkingTokenInsertion, TokenMask
from probes import RecordSite
from surgery.triggers import OnText


def stacked_run(model, prompts, eos, words):
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)) * 5
    blocks = [
        SteeringVector(vector, layer=1),  # SEAL default: "\n\n" tokens inside <think>
        TokenMask(["Hmm", "let me check"], penalty=-4.0),
        RepresentationRecycling(layer=0, trigger_words=words, probability=0.7, seed=1),
        ThinkingTokenInsertion(words=(" Wait",), budget=6, answer_prompt=" So", answer_tokens=2),
    ]
    probe = RecordSite("resid_post.-1", when=OnText("\n\n"))
    with surgery.trace(model, *blocks, probe) as tr:
        out = tr.generate(prompts, 32, chat=True, eos_token_ids=[eos])
    return out, blocks, probe.result()


def test_all_four_stack_and_each_row_behaves_as_alone(tiny):
    eos = surgery.generate(tiny, PROMPTS, 12, chat=True).token_ids[0][5]
    words = frequent_words(tiny)
    out, blocks, recorded = stacked_run(tiny, PROMPTS, eos, words)
    steer, _, rr, tts = blocks
    assert sum(map(len, steer.fired())) > 0 and sum(map(len, rr.fired())) > 0
    assert out.token_ids != surgery.generate(tiny, PROMPTS, 32, chat=True, eos_token_ids=[eos]).token_ids
    for i, prompt in enumerate(PROMPTS):
        alone, alone_blocks, alone_recorded = stacked_run(tiny, [prompt], eos, words)
        assert alone.token_ids[0] == out.token_ids[i]
        assert alone_blocks[0].fired()[0] == steer.fired()[i]
        assert alone_blocks[2].fired()[0] == rr.fired()[i]
        assert alone_blocks[3].insertions()[0] == tts.insertions()[i]
        positions, values = recorded.for_row(i)
        alone_positions, alone_values = alone_recorded.for_row(0)
        assert positions.tolist() == alone_positions.tolist()
        assert_close(values, alone_values)


def probes_run(model, prompts, answers, words, eos):
    from probes import MIEstimator, ReasoningGraph, ThoughtClassifier

    mi, thoughts, graph = MIEstimator(answers=answers), ThoughtClassifier("resid_pre.1"), ReasoningGraph(n_clusters=2)
    steer = SteeringVector(torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)) * 5, layer=1)
    rr = RepresentationRecycling(layer=0, trigger_words=words)
    with surgery.trace(model, steer, mi, rr, thoughts, graph) as tr:
        out = tr.generate(prompts, 28, chat=True, eos_token_ids=[eos])
    return out, mi.result(out), thoughts.result(), graph.result()


def test_the_three_probes_stack_with_interventions_and_rows_behave_as_alone(tiny):
    eos = surgery.generate(tiny, PROMPTS, 12, chat=True).token_ids[0][5]
    words, answers = frequent_words(tiny), ["8", "56", "Wait", "30"]
    out, mi, thoughts, steps = probes_run(tiny, PROMPTS, answers, words, eos)
    assert sum(len(v) for v in mi.values) == sum(out.lengths)
    assert sum(map(len, thoughts.thoughts)) > 0 and sum(len(s) for s in steps) > 0
    for i, prompt in enumerate(PROMPTS):
        alone, alone_mi, alone_thoughts, alone_steps = probes_run(tiny, [prompt], [answers[i]], words, eos)
        assert alone.token_ids[0] == out.token_ids[i]
        assert_close(alone_mi.values[0], mi.values[i], precision=torch.float32)  # float64 MI of float32 states
        assert [(t.label, t.position) for t in alone_thoughts.thoughts[0]] == [(t.label, t.position) for t in thoughts.thoughts[i]]
        assert_close(alone_thoughts.states[0], thoughts.states[i])
        assert_close(alone_steps[0], steps[i])
