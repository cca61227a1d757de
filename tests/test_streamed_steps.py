"""StreamedSteps: step vectors pooled while decoding equal the means of the kept lines; in slots
(continuous batching) each row's equal its run alone, and admit is what keeps one row's running
step and step counter out of the next's. (Through the probe: tests/test_reasoning_graph.py.)"""

import torch
from tolerance import assert_close

from probes.streamed_steps import StreamedSteps
from surgery.step import Step

# ids 0-3 end a line (1 and 2 too short to keep with min_chars=2); the others do not.
TEXTS = ["abcdef\n", " x\n", "\n", "  hello world \n", "abc", " ", "de", "\t"]


def rows_of(seed: int, lengths: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row, its fed tokens and their states ``[n, 3]``."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(len(TEXTS), (n,), generator=generator), torch.randn(n, 3, generator=generator))
            for n in lengths]


def expected_steps(tokens: torch.Tensor, states: torch.Tensor, min_chars: int = 2) -> torch.Tensor:
    """The released rule on strings: cut after each line end, keep the long enough steps' means."""
    pieces, current = [], []
    for k, token in enumerate(tokens.tolist()):
        current.append(k)
        if TEXTS[token].endswith("\n"):
            pieces.append(current)
            current = []
    pieces += [current] if current else []
    kept = [p for p in pieces if len("".join(TEXTS[tokens[k]] for k in p).strip()) > min_chars]
    return torch.stack([states[p].mean(0) for p in kept]) if kept else torch.zeros(0, 3)


def feed(steps: StreamedSteps, step: Step, tokens: list[int], states: torch.Tensor, finished: list[bool]) -> Step:
    step = step.next(torch.tensor(tokens), torch.tensor(finished), (None, None))
    steps.observe(states[:, None], step)
    return step


def run_in_slots(rows, n_slots: int, admit: bool = True) -> StreamedSteps:
    """Feed ``rows`` through ``n_slots`` slots as the engine does: a finished row is retired, and
    the next waiting row takes its slot (admit, then an admission prefill, which is not pooled)."""
    steps = StreamedSteps(TEXTS, width=3, min_chars=2)
    steps.reset(n_slots)
    steps.admit(torch.ones(n_slots, dtype=torch.bool))
    step = Step.prefill(torch.zeros(n_slots, 2, dtype=torch.long), torch.ones(n_slots, 2))
    steps.observe(torch.randn(n_slots, 2, 3), step)
    slot_row, own, waiting = list(range(n_slots)), [0] * n_slots, list(range(n_slots, len(rows)))
    with torch.inference_mode():  # as the engine runs; rows() is read outside it
        while any(row is not None for row in slot_row):
            tokens, states = [0] * n_slots, torch.zeros(n_slots, 3)
            for slot, row in enumerate(slot_row):
                if row is not None:
                    tokens[slot], states[slot] = int(rows[row][0][own[slot]]), rows[row][1][own[slot]]
            step = feed(steps, step, tokens, states, [row is None for row in slot_row])
            own = [n + 1 for n in own]
            for slot, row in enumerate(slot_row):
                if row is not None and own[slot] == len(rows[row][0]):
                    steps.retire(slot, row)
                    slot_row[slot] = waiting.pop(0) if waiting else None
                    own[slot] = 0
                    if slot_row[slot] is not None and admit:
                        steps.admit(torch.tensor([s == slot for s in range(n_slots)]))
    return steps


def test_rows_in_slots_equal_their_steps_alone():
    rows = rows_of(0, [40, 90, 25, 70, 60])
    got = run_in_slots(rows, 2).rows()
    assert len(got) == len(rows)
    for row, (tokens, states) in enumerate(rows):
        assert_close(got[row], expected_steps(tokens, states), path=f"row {row}")
    assert sum(len(v) for v in got) > 40  # real steps were compared
    assert not any(v.is_inference() for v in got)  # retired inside the engine's inference mode, usable outside


def test_without_admit_a_slot_leaks_its_last_rows_steps():
    rows = rows_of(0, [40, 90, 25, 70, 60])
    got = run_in_slots(rows, 2, admit=False).rows()
    assert len(got[2]) != len(expected_steps(*rows[2]))  # the step counter went on from row 0's


def test_a_fixed_batch_after_a_run_in_slots_is_as_before():
    rows = rows_of(1, [30, 30])
    steps = run_in_slots(rows_of(2, [20, 50, 10]), 2)
    steps.reset(2)
    step = Step.prefill(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    for k in range(30):
        step = feed(steps, step, [int(rows[0][0][k]), int(rows[1][0][k])], torch.stack([rows[0][1][k], rows[1][1][k]]),
                    [False, False])
    got = steps.rows()
    for row in range(2):
        assert_close(got[row], expected_steps(*rows[row]))
