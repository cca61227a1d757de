"""Prompts that join a running pool get what they get alone, under their own stacks."""

import pytest
import torch

import surgery
from surgery.decode.late_rows import LateRow, LateRows
from interventions import SteeringVector, TokenMask

GIVEN = ["So the answer is", "Wait, let me check"]
LATE = ["Alternatively", "So", "Wait", "the answer"]


def _late(model, prompts, budgets, stacks=None, arrive_after=1):
    """A source that hands one late prompt per call, from the ``arrive_after``-th call on."""
    queue = [LateRow(model.tokenizer(p)["input_ids"], b, f"late:{i}", None if stacks is None else stacks[i])
             for i, (p, b) in enumerate(zip(prompts, budgets))]
    calls = {"n": 0, "free": []}

    def take(free):
        calls["n"] += 1
        calls["free"].append(free)
        if calls["n"] < arrive_after or not queue:
            return []
        return [queue.pop(0)]

    return LateRows(take, capacity=16, bound=64), calls


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_late_prompts_equal_their_runs_alone(tiny, cache, do_sample):
    late, calls = _late(tiny, LATE, [6, 16, 9, 12], arrive_after=3)
    options = dict(cache=cache, do_sample=do_sample, seed=1, temperature=0.9)
    out = surgery.generate(tiny, GIVEN, [10, 5], batch_size=3, late_rows=late, row_keys=["g0", "g1"], **options)
    assert len(out.token_ids) == 6 and calls["n"] >= 6
    assert calls["free"][0] == 1  # the third slot starts empty
    keys = ["g0", "g1", *[f"late:{i}" for i in range(len(LATE))]]
    for i, (prompt, budget) in enumerate(zip(GIVEN + LATE, [10, 5, 6, 16, 9, 12])):
        alone = surgery.generate(tiny, [prompt], budget, row_keys=[keys[i]], **options)
        assert out.token_ids[i] == alone.token_ids[0], i
        assert out.stop_reasons[i] == alone.stop_reasons[0]


def test_late_rows_carry_their_own_stacks_and_sample_as_alone(tiny_r1):
    vector = torch.randn(tiny_r1.d_model, generator=torch.Generator().manual_seed(0)) * 3
    steer = SteeringVector(vector, layer=1, alpha=2.0, when=surgery.Always())
    other = SteeringVector(vector, layer=1, alpha=-1.0, when=surgery.Always())  # one per-row table with steer
    mask = TokenMask(words=[" is"], penalty=-20.0)
    late_stacks = [[steer], [mask, other], [], [steer, mask]]
    late, _ = _late(tiny_r1, LATE, [8, 8, 8, 8], stacks=late_stacks)
    with surgery.trace(tiny_r1, steer, other, mask) as tr:
        out = tr.generate(GIVEN, 8, batch_size=2, stacks=[[mask], [other]], late_rows=late, do_sample=True, seed=3,
                          row_keys=["given:0", "given:1"])
        fired = {id(b): b.fired() for b in (steer, other, mask)}
    for i, (prompt, stack) in enumerate(zip(GIVEN + LATE, [[mask], [other], *late_stacks])):
        fresh = [type(b).from_dict(b.to_dict(), b.tensors()) for b in stack]
        key = f"given:{i}" if i < 2 else f"late:{i - 2}"
        with surgery.trace(tiny_r1, *fresh) as tr:
            alone = tr.generate([prompt], 8, do_sample=True, seed=3, row_keys=[key])
        assert out.token_ids[i] == alone.token_ids[0], i
        for block, again in zip(stack, fresh):
            assert fired[id(block)][i] == again.fired()[0], (i, type(block).__name__)
    assert fired[id(steer)][2] and fired[id(other)][3]


def test_late_rows_outside_the_pools_limits_are_refused(tiny_r1):
    row = LateRow(tiny_r1.tokenizer("So")["input_ids"], 17, "x")
    with pytest.raises(ValueError, match="capacity"):
        surgery.generate(tiny_r1, GIVEN, 4, batch_size=3, late_rows=LateRows(lambda free: [row], 16, 64))
    with pytest.raises(ValueError, match="batch_size"):
        surgery.generate(tiny_r1, GIVEN, 4, late_rows=LateRows(lambda free: [], 16, 64))
    with pytest.raises(ValueError, match="context"):
        surgery.generate(tiny_r1, GIVEN, 4, batch_size=2, late_rows=LateRows(lambda free: [], 16, 10**9))
