"""Step: think-span flags, positions, and the decode-step successor."""

import pytest
import torch

from surgery.step import Step, think_state

OPEN, CLOSE = 3, 4


def naive_think_state(row, valid, before=False):
    state, out = before, []
    for token, ok in zip(row, valid):
        if ok and token == OPEN:
            state = True
        elif ok and token == CLOSE:
            state = False
        out.append(state)
    return out


def test_think_state_matches_a_left_to_right_scan():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 8, (16, 40), generator=generator)
    valid = torch.rand(16, 40, generator=generator) > 0.1
    before = torch.rand(16, generator=generator) > 0.5
    got = think_state(tokens, valid, (OPEN, CLOSE), before)
    for i in range(16):
        assert got[i].tolist() == naive_think_state(tokens[i].tolist(), valid[i].tolist(), bool(before[i]))


def test_think_state_without_think_tokens_keeps_the_previous_state():
    tokens = torch.tensor([[1, 2, 3]])
    assert think_state(tokens, torch.ones_like(tokens, dtype=torch.bool), (None, None)).tolist() == [[False] * 3]


def test_prefill_positions_come_from_the_attention_mask():
    tokens = torch.tensor([[0, 0, 5, OPEN, 6], [7, OPEN, 8, CLOSE, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    step = Step.prefill(tokens, mask, (OPEN, CLOSE))
    assert step.positions.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert step.valid.tolist() == [[False, False, True, True, True], [True] * 5]
    assert step.in_think.tolist() == [[False, False, False, True, True], [False, True, True, False, False]]
    assert step.is_prefill and step.batch_size == 2 and step.length == 5


def test_next_step_feeds_one_token_and_carries_the_think_state():
    step = Step.prefill(torch.tensor([[5, OPEN], [5, 6]]), torch.ones(2, 2, dtype=torch.long), (OPEN, CLOSE))
    nxt = step.next(torch.tensor([CLOSE, OPEN]), torch.tensor([False, True]), (OPEN, CLOSE))
    assert nxt.index == 1 and nxt.token_ids.tolist() == [[CLOSE], [OPEN]]
    assert nxt.positions.tolist() == [[2], [2]]
    assert nxt.in_think.tolist() == [[False], [False]]  # row 1 is finished: its fed pad is not counted
    assert nxt.valid.tolist() == [[True], [False]]


def test_tail_aligns_with_shorter_values():
    step = Step.prefill(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long))
    tail = step.tail(1)
    assert tail.token_ids.tolist() == [[3]] and tail.positions.tolist() == [[2]] and tail.index == 0
    assert step.tail(3) is step


def test_shapes_are_checked_under_pytest():
    # jaxtyping's import hook checks annotated shapes in tests: a mismatch is caught at the call
    with pytest.raises(Exception, match="Type-check error"):
        think_state(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool), (OPEN, CLOSE))
