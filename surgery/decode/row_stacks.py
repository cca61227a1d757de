"""A stack of blocks per row: one run mixing rows under different stacks (a study's conditions).

``tr.generate(prompts, ..., stacks=[...])`` gives each prompt the list of attached blocks it
carries; the trace then keeps, per block, which rows carry it (:class:`RowStacks`: a bool
``[batch]`` on the device, set as rows are admitted into slots), and a block acts only on those:

- it is called with the step restricted to its rows (:meth:`RowStacks.step_for`: ``valid`` False
  and ``finished`` True elsewhere), so its triggers fire and its records grow only there;
- what an intervention returns replaces the value only on its rows (``torch.where`` on the
  device), so a row that does not carry it keeps its value bit for bit;
- in :meth:`~surgery.blocks.Intervention.choose` the rows it does not carry look finished, so
  it neither replaces their tokens nor stops them (:meth:`RowStacks.choose`).

A row therefore gets exactly what it gets alone under its own stack, whatever the other rows
carry. The masks are edited in place, so a compiled step keeps them as device buffers. Blocks of
one kind at one site with different parameters (a steering vector per request) are served by one
operation over a per-row table (:mod:`surgery.decode.row_tables`).

Example:
    >>> import torch
    >>> steer, mask = object(), object()
    >>> stacks = RowStacks([steer, mask], [[steer], [], [steer, mask]], batch=2, device="cpu")
    >>> stacks.admit([0, 1], [0, 2])
    >>> stacks.mask(steer).tolist(), stacks.mask(mask).tolist()
    ([True, True], [False, True])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from surgery.decode.row_tables import find_tables
from surgery.step import Step

__all__ = ["RowStacks"]


class RowStacks:
    """Which rows carry which block, for a run where rows carry different stacks.

    Args:
        blocks: every attached block (any hashable handle; the trace uses the blocks).
        stacks: one list per prompt, of the blocks that prompt carries.
        batch: the number of slots.
        device: where the masks live (the model's device).
        sites: ``id(block)`` -> its resolved sites (the trace's), for :func:`~surgery.decode.row_tables.find_tables`.

    Raises:
        ValueError: ``stacks`` does not have one entry per prompt, or names an unattached block.
    """

    def __init__(self, blocks: Sequence[Hashable], stacks: Sequence[Sequence[Hashable]], batch: int, device,
                 sites: dict | None = None):
        known = {id(block) for block in blocks}
        for i, stack in enumerate(stacks):
            stray = [block for block in stack if id(block) not in known]
            if stray:
                raise ValueError(f"stacks[{i}] holds {stray[0]!r}, which is not attached to this trace: add it first")
        self.stacks = [{id(block) for block in stack} for stack in stacks]
        self.blocks = list(blocks)
        self.carriers = {id(block): torch.zeros(batch, dtype=torch.bool, device=device) for block in self.blocks}
        self._restricted: dict[int, tuple[Step, Step]] = {}  # id(block) -> (step, as it sees it)
        self.tables = find_tables(self.blocks, stacks, batch, sites)
        self._table_of = {id(member): table for table in self.tables for member in table.members}

    def extend(self, stacks: Sequence[Sequence[Hashable]]) -> None:
        """Prompts that join a running pool (:mod:`surgery.decode.late_rows`) carry ``stacks``.

        Raises:
            ValueError: a stack names an unattached block, or two blocks served by one table.
        """
        known = {id(block) for block in self.blocks}
        for stack in stacks:
            ids = {id(block) for block in stack}
            if not ids <= known:
                raise ValueError("a late row's stack holds a block not attached to this trace: attach it first")
            for table in self.tables:
                carried = [member for member in table.members if id(member) in ids]
                if len(carried) > 1:
                    raise ValueError("a late row's stack carries two blocks served by one per-row table")
                table.carried.append(carried[0] if carried else None)
            self.stacks.append(ids)

    def taking(self, take):
        """``take`` (a :class:`~surgery.decode.late_rows.LateRows`'s) that also records each late
        row's stack here (a row without one carries every attached block)."""

        def take_and_record(free: int):
            rows = take(free)
            self.extend([self.blocks if row.stack is None else row.stack for row in rows])
            return rows

        return take_and_record

    def admit(self, slots: list[int], rows: list[int]) -> None:
        """Prompts ``rows`` take ``slots``: each block's mask says whether they carry it."""
        for block in self.blocks:
            carrier = self.carriers[id(block)]  # edited in place: a compiled step holds it
            for slot, row in zip(slots, rows):
                carrier[slot] = id(block) in self.stacks[row]
        for table in self.tables:
            table.admit(slots, rows)

    def edit(self, block, site: str, value: Tensor, step: Step) -> Tensor:
        """Intervention ``block``'s edit of ``value``, on its rows only. A block served by a
        per-row table (:mod:`surgery.decode.row_tables`): the whole table's edit at its first
        member, nothing at the others."""
        table = self._table_of.get(id(block))
        if table is not None:
            if block is not table.lead:
                return value
            return table.edit(site, value, step, self.step_for(table, step, table.carrier))
        edited = block.edit(site, value, self.step_for(block, step))
        return torch.where(self.mask(block).view(-1, *([1] * (value.ndim - 1))), edited, value)

    def retire(self, slot: int, row: int) -> None:
        """Prompt ``row`` left ``slot``: the tables hand its records to the blocks it carries
        (after the blocks' own :meth:`~surgery.blocks.Block.retire`)."""
        for table in self.tables:
            table.retire(slot, row)

    def finish(self, n_rows: int) -> None:
        """After a run without slots: the tables hand every row's records over."""
        for table in self.tables:
            table.finish(n_rows)

    def mask(self, block) -> Tensor:
        """The rows that carry ``block``, bool ``[batch]``."""
        return self.carriers[id(block)]

    def step_for(self, block, step: Step, rows: Tensor | None = None) -> Step:
        """``step`` as ``block`` sees it: its rows (or ``rows``) only (valid False, finished True
        elsewhere)."""
        seen = self._restricted.get(id(block))
        if seen is None or seen[0] is not step:  # one restriction per block and step
            rows = self.mask(block) if rows is None else rows
            seen = self._restricted[id(block)] = (step, _restrict(step, rows))
        return seen[1]

    def choose(self, block, choice) -> None:
        """Hand ``choice`` to ``block`` with the rows it does not carry looking finished."""
        carrier = self.mask(block)
        finished, forced = choice.finished, choice.forced_stop
        choice.finished = finished | ~carrier
        try:
            block.choose(choice)
        finally:
            choice.finished = finished
            choice.forced_stop = torch.where(carrier, choice.forced_stop, forced)


def _restrict(step: Step, rows: Tensor) -> Step:
    return dataclasses.replace(step, valid=step.valid & rows[:, None], finished=step.finished | ~rows)
