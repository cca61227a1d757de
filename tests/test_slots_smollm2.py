"""Continuous batching with mixed stacks on the embedded SmolLM2-135M-Instruct (slow: real model).

Word problems of different lengths with budgets 6 to 30 tokens go through 2 slots, so prompts
are admitted mid-run; each row carries its own stack (two distinct steering vectors, served by
one per-row table, a token mask, thinking-token insertion, or nothing). Each prompt's tokens,
stop reason and firings must equal that prompt run alone under its own stack.
"""

import pytest
import torch

import surgery
from interventions import SteeringVector, ThinkingTokenInsertion, TokenMask
from surgery.examples import ARITHMETIC_PROBLEMS

pytestmark = pytest.mark.slow
BUDGETS = [8, 30, 12, 24, 6, 16]


def blocks_for(model):
    gen = torch.Generator().manual_seed(0)
    when = surgery.OnText("\n\n") | surgery.StepWindow(3, 6)
    up, down = (SteeringVector((torch.randn(model.d_model, generator=gen) * 8).to(model.dtype), layer=15, alpha=a,
                               when=when) for a in (1.0, -2.0))
    mask = TokenMask(["Step", "First"], penalty=None)
    ttts = ThinkingTokenInsertion(words=(" Wait",), budget=2, answer_prompt=" So", answer_tokens=3)
    return up, down, mask, ttts


def stacks_of(blocks):
    up, down, mask, ttts = blocks
    return [[up], [down, mask], [], [up, ttts], [down], [mask]]


@pytest.mark.parametrize("do_sample", [False, True])
def test_mixed_stacks_through_two_slots_equal_each_prompt_alone(smollm2, do_sample):
    prompts = [ARITHMETIC_PROBLEMS[i % len(ARITHMETIC_PROBLEMS)] + " " * (i // len(ARITHMETIC_PROBLEMS))
               for i in range(len(BUDGETS))]
    options = dict(chat=True, do_sample=do_sample, temperature=0.8, seed=5)
    keys = surgery.decode.sampling.row_keys_for(*surgery.encode_prompts(smollm2, prompts, chat=True))
    blocks = blocks_for(smollm2)
    with surgery.trace(smollm2, *blocks) as tr:
        pooled = tr.generate(prompts, BUDGETS, batch_size=2, stacks=stacks_of(blocks), **options)
    for i, prompt in enumerate(prompts):
        fresh = blocks_for(smollm2)
        stack = [fresh[blocks.index(b)] for b in stacks_of(blocks)[i]]
        with surgery.trace(smollm2, *stack) as tr:
            single = tr.generate([prompt], BUDGETS[i], row_keys=[keys[i]], **options)
        assert pooled.token_ids[i] == single.token_ids[0], f"prompt {i}"
        assert pooled.stop_reasons[i] == single.stop_reasons[0]
        for block in stack:
            assert blocks[fresh.index(block)].by_row()[i] == block.by_row()[0], f"prompt {i}: {block.name}"
    assert blocks[0].fired()[0] and blocks[1].fired()[4]  # the steering did fire
