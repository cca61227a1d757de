"""SignalBoard: each row's current and previous signal value, in a fixed batch and in a slot pool.

Under continuous batching (surgery.decode.slots) rows count their own steps (``index_on_device``
``[batch, 1]``), an admission prefill runs some slots only (the others are not valid in it),
and ``admit`` empties the slots new rows take; a row's ``previous`` is its own previous forward.
"""

import math

import torch

from surgery.signal_board import SignalBoard, SignalSpec
from surgery.decode.slot_forward import pool_step
from surgery.step import Step

NO_THINK = (None, None)


def new_board() -> SignalBoard:
    specs = (SignalSpec("score", "float", "resid_post.0"), SignalSpec("hit", "bool", "resid_post.0"))
    return SignalBoard({spec.name: spec for spec in specs})


def values(tensor) -> list:
    return ["nan" if isinstance(v, float) and math.isnan(v) else v for v in tensor.tolist()]


def decode(step: Step, finished=(False, False)) -> Step:
    return step.next(torch.tensor([3, 4]), torch.tensor(finished), NO_THINK)


def test_a_fixed_batch_reads_this_forward_and_the_one_before():
    board = new_board()
    step = Step.prefill(torch.tensor([[5, 6], [7, 8]]), torch.ones(2, 2, dtype=torch.bool))
    assert values(board.read("score", step)) == ["nan", "nan"]  # nothing published yet
    board.publish("score", torch.tensor([1.0, 2.0]), step)
    assert values(board.read("score", step)) == [1.0, 2.0]
    assert values(board.read("score", step, previous=True)) == ["nan", "nan"]
    step = decode(step)
    assert values(board.read("score", step, previous=True)) == [1.0, 2.0]  # before this forward publishes
    board.publish("score", torch.tensor([3.0, 4.0]), step)
    assert values(board.read("score", step, previous=True)) == [1.0, 2.0]  # and after
    assert values(board.read("score", step)) == [3.0, 4.0]


def test_an_admitted_row_starts_empty_and_the_other_slots_keep_their_signals():
    board = new_board()
    pool = pool_step(Step.prefill(torch.tensor([[5, 6], [7, 8]]), torch.ones(2, 2, dtype=torch.bool)))
    board.publish("score", torch.tensor([1.0, 2.0]), pool)
    board.publish("hit", torch.tensor([True, True]), pool)
    pool = decode(pool)
    board.publish("score", torch.tensor([3.0, 4.0]), pool)
    board.publish("hit", torch.tensor([False, True]), pool)

    # slot 1's row has finished; a new row takes it: an admission prefill of slot 1 only
    rows = torch.tensor([False, True])
    board.admit(rows)
    assert values(board.read("score", pool)) == [3.0, "nan"] and values(board.read("hit", pool)) == [False, False]
    admission = pool_step(Step.prefill(torch.tensor([[0, 0], [9, 9]]), torch.tensor([[0, 0], [1, 1]])), slots=(1,))
    assert values(board.read("score", admission, previous=True))[1] == "nan"  # no previous forward of its own
    board.publish("score", torch.tensor([99.0, 5.0]), admission)  # slot 0 is not valid here
    board.publish("hit", torch.tensor([True, False]), admission)
    assert values(board.read("score", admission)) == [3.0, 5.0]
    assert values(board.read("hit", admission)) == [False, False]
    assert values(board.read("score", admission, previous=True))[1] == "nan"

    # the next decode step: slot 0 at its own step 2, slot 1 at its step 1
    pool = decode(pool.splice(rows, admission))
    assert pool.index_on_device.flatten().tolist() == [2, 1]
    assert values(board.read("score", pool, previous=True)) == [3.0, 5.0]
    board.publish("score", torch.tensor([6.0, 7.0]), pool)
    assert values(board.read("score", pool, previous=True)) == [3.0, 5.0]
    assert values(board.read("score", pool)) == [6.0, 7.0]


def test_a_decode_step_writes_every_row_and_clear_forgets_the_run():
    board = new_board()
    step = Step.prefill(torch.tensor([[5, 6], [7, 8]]), torch.ones(2, 2, dtype=torch.bool))
    board.publish("score", torch.tensor([1.0, 2.0]), step)
    step = decode(step, finished=(True, False))  # a finished row gets what the probe publishes for it
    board.publish("score", torch.tensor([float("nan"), 4.0]), step)
    assert values(board.read("score", step)) == ["nan", 4.0]
    board.clear()
    assert values(board.read("score", step)) == ["nan", "nan"]
