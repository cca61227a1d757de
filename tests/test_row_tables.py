"""Per-row parameter tables (surgery/decode/row_tables.py): many steering settings in one op.

The reference is each prompt run alone with its own block (itself tested against HF
``generate``): under a table, every row's tokens, stop reason and firings must be the same bit
for bit, with and without slots, while the masked add runs once per forward at the site instead
of once per block.
"""

import pytest
import torch
from conftest import PROMPTS

import interventions.residual_add as residual_add_module
import surgery
from interventions import ResidualAdd, SteeringVector, TokenMask
from surgery.decode.row_tables import find_tables

MIXED = [*PROMPTS, "A longer prompt: the train leaves at noon.", PROMPTS[2]]
BUDGETS = [7, 16, 5, 12, 9, 14]


def vectors(model, n, seed=0):
    """``n`` distinct steering blocks at one site: different vectors and alphas, one trigger."""
    gen = torch.Generator().manual_seed(seed)
    layer = model.n_layers // 2
    return [SteeringVector((torch.randn(model.d_model, generator=gen) * 3).to(model.dtype), layer=layer,
                           alpha=(0.5, 1.0, -2.0)[i % 3], when=surgery.OnText("\n\n") | surgery.StepWindow(2, 4))
            for i in range(n)]


def count_masked_adds(monkeypatch):
    calls = []
    real = residual_add_module.masked_add

    def spy(value, fire, vector, *args):
        calls.append(tuple(vector.shape))
        return real(value, fire, vector, *args)

    monkeypatch.setattr(residual_add_module, "masked_add", spy)
    return calls


@pytest.mark.parametrize("batch_size", [None, 2])
def test_distinct_vectors_per_row_equal_each_row_alone(tiny, batch_size):
    blocks = vectors(tiny, 4)
    carried = [blocks[0], blocks[1], None, blocks[2], blocks[3], blocks[1]]  # one plain row; blocks[1] twice
    stacks = [[] if block is None else [block] for block in carried]
    with surgery.trace(tiny, *blocks) as tr:
        out = tr.generate(MIXED, BUDGETS, chat=True, batch_size=batch_size, stacks=stacks)
    fired = [block.fired() for block in blocks]
    for i, (prompt, block) in enumerate(zip(MIXED, carried)):
        alone = vectors(tiny, 4)[blocks.index(block)] if block is not None else None
        with surgery.trace(tiny, *([alone] if alone else [])) as tr:
            single = tr.generate([prompt], BUDGETS[i], chat=True)
        assert out.token_ids[i] == single.token_ids[0], f"row {i}"
        assert out.stop_reasons[i] == single.stop_reasons[0]
        for j, member in enumerate(blocks):  # each block lists where it fired on its own rows only
            assert fired[j][i] == (alone.fired()[0] if member is block else []), f"row {i}, block {j}"
    assert any(fired[j][i] for j in range(4) for i in range(6))  # the triggers did fire


def test_one_masked_add_per_forward_for_every_vector(tiny_llama, monkeypatch):
    blocks = vectors(tiny_llama, 8)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    calls = count_masked_adds(monkeypatch)
    with surgery.trace(tiny_llama, blocks[0]) as tr:  # one shared vector: one add per forward
        tr.generate(prompts, 6, chat=True, eos_token_ids=[])
    forwards = len(calls)
    calls.clear()
    with surgery.trace(tiny_llama, *blocks) as tr:
        tr.generate(prompts, 6, chat=True, eos_token_ids=[], stacks=[[block] for block in blocks])
    assert forwards == 6 and len(calls) == forwards  # prefill + 5 decode steps, 8 vectors, one add each
    assert set(calls) == {(8, tiny_llama.d_model)}  # one [batch, d_model] table


def test_without_stacks_each_block_still_adds_its_own_vector(tiny_llama, monkeypatch):
    blocks = vectors(tiny_llama, 3)
    calls = count_masked_adds(monkeypatch)
    with surgery.trace(tiny_llama, *blocks) as tr:
        tr.generate(PROMPTS[:2], 3, chat=True)
    assert set(calls) == {(tiny_llama.d_model,)} and len(calls) % 3 == 0


def test_which_blocks_share_a_table(tiny_llama):
    a, b, c, d = vectors(tiny_llama, 4)
    other_site = SteeringVector(a.vector, layer=0, alpha=1.0, when=a.config.when)
    other_trigger = SteeringVector(a.vector, layer=tiny_llama.n_layers // 2, when=surgery.OnText("\n\n"))
    assert [t.members for t in find_tables([a, b, c], [[a], [b], [c]])] == [[a, b, c]]
    # one prompt carries two: its vectors would add in another rounding order, so they split
    assert [t.members for t in find_tables([a, b, c], [[a, b], [c]])] == [[b, c]]
    assert find_tables([a, other_site], [[a], [other_site]]) == []
    assert find_tables([a, other_trigger], [[a], [other_trigger]]) == []
    # another intervention at the same site between them keeps each row's order: no table across it
    plain = ResidualAdd(a.vector, site=a.config.site, when=surgery.Always())
    assert [t.members for t in find_tables([a, b, plain, c, d], [[a], [b], [plain], [c], [d]])] == [[a, b], [c, d]]
    # a block of another kind (or one at another site) between them does not matter
    mask = TokenMask(["Wait"])
    assert [t.members for t in find_tables([a, mask, b], [[a], [b, mask]])] == [[a, b]]


def test_a_row_carrying_two_vectors_still_gets_both_in_order(tiny_llama):
    a, b, c = vectors(tiny_llama, 3)
    stacks = [[a, b], [c], [a]]
    with surgery.trace(tiny_llama, a, b, c) as tr:
        out = tr.generate(PROMPTS[:3], 10, chat=True, stacks=stacks)
    for i, stack in enumerate(stacks):
        fresh = vectors(tiny_llama, 3)
        alone = [fresh[[a, b, c].index(block)] for block in stack]
        with surgery.trace(tiny_llama, *alone) as tr:
            assert tr.generate([PROMPTS[i]], 10, chat=True).token_ids[0] == out.token_ids[i]


def test_the_same_site_spelled_two_ways_keeps_the_order_between_members(tiny_llama):
    """A and B at resid_pre.2, X at resid_pre.-2 (the same site of 4 blocks) attached between them:
    a row carrying X and B gets X's add, then B's, as alone; so A and B share no table."""
    a, b = vectors(tiny_llama, 2)
    x = ResidualAdd(torch.full((tiny_llama.d_model,), 0.3), site="resid_pre.-2", when=a.config.when)
    stacks = [[a], [x, b], [b]]
    with surgery.trace(tiny_llama, a, x, b) as tr:
        out = tr.generate(PROMPTS[:3], 10, chat=True, stacks=stacks)
        assert tr._stacks.tables == []  # the trace matched the sites as resolved
    assert [t.members for t in find_tables([a, x, b], stacks)] == [[a, b]]  # as written they look apart
    for i, stack in enumerate(stacks):
        fresh_a, fresh_b = vectors(tiny_llama, 2)
        alone = {id(a): fresh_a, id(b): fresh_b, id(x): ResidualAdd(x.vector, site="resid_pre.-2", when=a.config.when)}
        with surgery.trace(tiny_llama, *[alone[id(block)] for block in stack]) as tr:
            assert tr.generate([PROMPTS[i]], 10, chat=True).token_ids[0] == out.token_ids[i], f"row {i}"
