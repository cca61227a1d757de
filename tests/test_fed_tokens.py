"""FedTokens: per row, the prompt's and the fed tokens' ids; in slots (continuous batching) each
prompt's entry equals its run alone, and admit is what keeps one row's ids out of the next's."""

import torch

from probes.fed_tokens import FedTokens
from surgery.decode.slot_forward import pool_step
from surgery.step import Step


def prefill(prompts: list[list[int]], slots=None, batch=None) -> Step:
    """The left-padded prefill of ``prompts``; with ``slots``, pool-wide over ``batch`` slots with
    only those valid (an admission prefill)."""
    width = max(map(len, prompts))
    ids, mask = torch.zeros(batch or len(prompts), width, dtype=torch.long), torch.zeros(batch or len(prompts), width)
    for row, prompt in zip(slots or range(len(prompts)), prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.tensor(prompt), 1
    step = Step.prefill(ids, mask)
    return pool_step(step, tuple(slots)) if slots else step


def alone(prompt: list[int], generated: list[int]) -> tuple[list[int], list[int] | None]:
    """A one-row run: the prompt, then the generated tokens but the last fed back."""
    tokens = FedTokens()
    tokens.reset(1)
    step = prefill([prompt])
    tokens.observe(step)
    for token in generated[:-1]:
        step = step.next(torch.tensor([token]), torch.tensor([False]), (None, None))
        tokens.observe(step)
    return tokens.rows()[0]


# Three prompts through two slots: prompt 0 stops after 2 tokens, prompt 2 takes its slot and
# stops on its first token (no decode step of its own), prompt 1 runs on.
PROMPTS = [[1, 2], [3, 4, 5], [6]]
GENERATED = [[10, 11], [20, 21, 22, 23, 24], [30]]


def run_in_slots(admit: bool = True) -> FedTokens:
    """What the engine does with two slots (surgery.decode.slots): admit all, prefill, then per step:
    choose, retire the rows that finished, feed, admit waiting rows into freed slots."""
    tokens = FedTokens()
    tokens.reset(2)
    tokens.admit(torch.ones(2, dtype=torch.bool))
    step = pool_step(prefill(PROMPTS[:2]))
    tokens.observe(step)
    slot_row, own, waiting = [0, 1], [0, 0], [2]  # the row in each slot, its tokens chosen so far
    while True:
        chosen = [GENERATED[row][own[slot]] if row is not None else 0 for slot, row in enumerate(slot_row)]
        own = [n + 1 for n in own]
        for slot, row in enumerate(slot_row):
            if row is not None and own[slot] == len(GENERATED[row]):
                tokens.retire(slot, row)
                slot_row[slot] = None
        if all(row is None for row in slot_row) and not waiting:
            return tokens
        if any(row is not None for row in slot_row):
            step = step.next(torch.tensor(chosen), torch.tensor([row is None for row in slot_row]), (None, None))
            tokens.observe(step)
        free = [slot for slot, row in enumerate(slot_row) if row is None][: len(waiting)]
        if free:
            admitted = [waiting.pop(0) for _ in free]
            if admit:
                tokens.admit(torch.tensor([slot in free for slot in range(2)]))
            tokens.observe(prefill([PROMPTS[row] for row in admitted], slots=free, batch=2))
            for slot, row in zip(free, admitted):
                slot_row[slot], own[slot] = row, 0


def test_each_prompt_in_slots_equals_its_run_alone():
    got = run_in_slots().rows()
    assert got == [alone(p, g) for p, g in zip(PROMPTS, GENERATED)]
    assert got == [([1, 2], [10]), ([3, 4, 5], [20, 21, 22, 23]), ([6], None)]


def test_without_admit_a_slot_leaks_its_last_rows_tokens():
    got = run_in_slots(admit=False).rows()
    assert got[2] != alone(PROMPTS[2], GENERATED[2])  # row 2 reads row 0's fed token as its own
    assert got[2] == ([6], [10])


def test_an_admission_prefill_replaces_only_the_admitted_slots_prompt():
    tokens = FedTokens()
    tokens.reset(2)
    tokens.observe(prefill([[1, 2], [3]]))
    tokens.admit(torch.tensor([False, True]))
    tokens.observe(prefill([[7, 8, 9]], slots=[1], batch=2))
    assert tokens.rows() == [([1, 2], None), ([7, 8, 9], None)]


def test_admit_drops_the_steps_no_live_row_was_fed():
    tokens = FedTokens()
    tokens.reset(2)
    step = prefill([[1], [2]])
    tokens.observe(step)
    for _ in range(3):
        step = step.next(torch.tensor([5, 6]), torch.tensor([False, True]), (None, None))
        tokens.observe(step)
    held = tokens.held_bytes()
    tokens.admit(torch.tensor([True, False]))  # slot 0's three fed tokens were the only valid ones
    assert tokens.fed == [] and tokens.held_bytes() < held
