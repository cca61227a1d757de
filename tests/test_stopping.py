"""Stop reasons: EOS, stop strings, a block's forced stop, and which one a row reports."""

from dataclasses import dataclass

import torch
from conftest import PROMPTS

import surgery
from surgery.blocks import Intervention, TokenChoice
from surgery.decode.stopping import StopTracker


@dataclass(frozen=True)
class StopAtConfig:
    index: int


class StopAt(Intervention):
    """Sets ``forced_stop`` on every row at generated token ``index``."""

    def __init__(self, index: int):
        self.config = StopAtConfig(index)

    def sites(self):
        return ()

    def choose(self, choice: TokenChoice) -> None:
        if choice.index == self.config.index:
            choice.forced_stop = torch.ones_like(choice.forced_stop)


def test_a_forced_stop_on_a_rows_own_eos_reports_eos(tiny):
    eos = surgery.generate(tiny, PROMPTS, 16).token_ids[1][3]
    plain = surgery.generate(tiny, PROMPTS, 16, eos_token_ids=[eos])
    assert plain.stop_reasons[1] == "eos"
    k = plain.lengths[1] - 1  # row 1's EOS is generated token k: the block stops every row there
    with surgery.trace(tiny, StopAt(k)) as tr:
        out = tr.generate(PROMPTS, 16, eos_token_ids=[eos])
    assert out.stop_reasons[1] == "eos" and out.token_ids[1] == plain.token_ids[1]
    for row in range(len(PROMPTS)):
        if plain.lengths[row] <= k + 1:  # stopped on its own by then (row 1, at least)
            assert out.stop_reasons[row] == plain.stop_reasons[row]
            assert out.token_ids[row] == plain.token_ids[row]
        else:
            assert out.stop_reasons[row] == "block"
            assert out.token_ids[row] == plain.token_ids[row][: k + 1]
    assert "block" in out.stop_reasons


def test_own_reason_wins_over_a_forced_stop(tokenizer):
    eos = torch.tensor([tokenizer.eos_token_id])
    tracker = StopTracker(tokenizer, eos, ["\n\n"], batch=4, max_new_tokens=5)
    tom, blank, has = (tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in ("Tom", "\n\n", " has"))
    chosen = torch.tensor([tom, tokenizer.eos_token_id, blank, has])
    own = tracker.own(chosen, torch.zeros(4, dtype=torch.bool))
    assert own.tolist() == [False, True, True, False]
    forced = torch.tensor([True, True, True, False])
    assert tracker.record(0, chosen, own, forced).tolist() == [True, True, True, False]
    assert tracker.reasons() == ["block", "eos", "stop_string", "length"]
    assert tracker.kept.tolist() == [1, 1, 1, 5]


def test_stop_strings_span_tokens_and_finished_rows_stay_put(tokenizer):
    tracker = StopTracker(tokenizer, torch.tensor([tokenizer.eos_token_id]), ["\n\n"], batch=2, max_new_tokens=4)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    chosen = torch.tensor([newline, newline])
    none = torch.zeros(2, dtype=torch.bool)
    assert tracker.record(0, chosen, tracker.own(chosen, none), none).tolist() == [False, False]
    finished = torch.tensor([False, True])  # row 1 is done: a second newline does not count
    assert tracker.own(chosen, finished).tolist() == [True, False]
