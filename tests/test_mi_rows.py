"""The MI probe's per-row state (probes.mi_rows): series that follow rows through slots, and each
slot's answer. The probe itself under continuous batching: tests/test_mi.py."""

import pytest
import torch

from probes.mi_rows import RowSeries, SlotAnswers

CPU = torch.device("cpu")
YES, NO = torch.tensor([True, True]), torch.tensor([False, False])


def append(series, values, valid, converged=YES):
    series.append(torch.tensor(values, dtype=torch.float64), converged, torch.tensor(valid))


def as_lists(series):
    values, converged = series.rows()
    return [v.tolist() for v in values], [c.tolist() for c in converged]


def test_a_row_keeps_the_values_of_its_valid_forwards():
    series = RowSeries(2, 4, CPU, growable=False)
    append(series, [1.0, 2.0], [True, True])
    append(series, [3.0, 4.0], [False, True], converged=torch.tensor([True, False]))
    append(series, [5.0, 6.0], [True, False])
    assert as_lists(series) == ([[1.0, 5.0], [2.0, 4.0]], [[True, True], [True, False]])


def test_retired_rows_come_back_in_prompt_order_and_survive_their_slot_reused():
    series = RowSeries(2, 4, CPU, growable=False)
    append(series, [1.0, 2.0], [True, True])
    series.retire(slot=0, row=0)
    series.admit(torch.tensor([True, False]))  # prompt 2 takes slot 0
    assert series.count.tolist() == [0, 1]
    append(series, [7.0, 3.0], [True, True])
    append(series, [8.0, 0.0], [True, False])  # slot 1's row has finished
    series.retire(slot=1, row=1)
    series.retire(slot=0, row=2)
    assert as_lists(series)[0] == [[1.0], [2.0, 3.0], [7.0, 8.0]]


def test_a_full_row_fed_padding_keeps_its_values():
    """A row that used its whole budget is fed padding (not valid) until its slot is reused."""
    series = RowSeries(2, 2, CPU, growable=False)
    append(series, [1.0, 2.0], [True, True])
    append(series, [3.0, 4.0], [True, True])
    append(series, [9.0, 5.0], [False, False])
    assert as_lists(series)[0] == [[1.0, 3.0], [2.0, 4.0]]


def test_a_growable_series_doubles_when_full():
    series = RowSeries(1, 1, CPU, growable=True)
    for value in (1.0, 2.0, 3.0):
        series.append(torch.tensor([value], dtype=torch.float64), torch.tensor([True]), torch.tensor([True]))
    assert series.values.shape[1] == 4 and as_lists(series)[0] == [[1.0, 2.0, 3.0]]


def test_each_slot_holds_the_answer_of_the_prompt_in_it():
    left, right = torch.arange(3.0)[:, None, None], 10 + torch.arange(3.0)[:, None, None]  # three prompts
    answers = SlotAnswers((left, right), slots=2)
    answers.admit(YES, [0, 1])
    answers.admit(torch.tensor([False, True]), [2])
    assert [f.flatten().tolist() for f in answers.factors] == [[0.0, 2.0], [10.0, 12.0]]
    assert answers.admitted == 3
    with pytest.raises(ValueError, match="there are 3 answers, and this run admits prompt 3"):
        answers.admit(torch.tensor([True, False]), [3])
