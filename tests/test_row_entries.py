"""surgery/row_entries.py: a block's per-step records as one list per row, and rows read by index."""

import pytest
import torch

from surgery.row_entries import per_row, pick_rows, retired_rows


def test_per_row_lists_each_rows_values_in_record_order():
    records = [(torch.tensor([[0, 1, 2], [0, 1, 2]]), torch.tensor([[False, True, True], [True, False, False]])),
               (7, torch.tensor([True, False])), (torch.tensor([8, 9]), torch.tensor([[False], [True]]))]
    assert per_row(records) == [[1, 2, 7], [0, 9]]
    assert per_row([]) == []


def test_retired_rows_in_prompt_order_or_as_asked_and_a_running_row_is_named():
    retired = {2: "c", 0: "a", 1: "b"}  # kept in the order the rows finished
    assert retired_rows(retired) == ["a", "b", "c"]
    assert retired_rows(retired, [2, 0]) == ["c", "a"]
    with pytest.raises(ValueError, match="row 5 has not finished yet"):
        retired_rows(retired, [1, 5])


def test_pick_rows_selects_rows_of_a_finished_batch():
    assert pick_rows(["a", "b", "c"]) == ["a", "b", "c"] and pick_rows(["a", "b", "c"], [1]) == ["b"]
