"""Many settings at the cost of one: blocks of one kind at one site served from a per-row table.

Under a stack per row (:mod:`surgery.decode.row_stacks`) each request may bring its own steering
vector or alpha. Run one by one, 64 distinct vectors at a site would be 64 masked adds (and 64
trigger evaluations and record writes) per forward pass. A :class:`RowTable` serves them all with
one: the blocks' :meth:`~surgery.blocks.Intervention.table_row` parameters sit in a ``[batch, ...]``
table on the device, row ``i`` holding those of the block slot ``i``'s prompt carries; one
:meth:`~surgery.blocks.Intervention.table_edit` call edits every row with its own, and where it
fired is recorded once, then handed to each block for the prompts it carries
(:meth:`~surgery.blocks.Intervention.keep_fired`).

Blocks join a table (:func:`find_tables`) when they

- return equal, non-None :meth:`~surgery.blocks.Intervention.table_key` (kind, site, trigger:
  what the one operation shares);
- follow each other at their site in the order the trace applies them (no other intervention
  at that site between them, so every row still sees its edits in its own stack's order);
- are never carried by the same prompt (each row reads one row of parameters, as it would
  run alone: a prompt carrying two would add their vectors in a different order of rounding).

So each row gets exactly what it gets alone under its own stack (tested bit for bit). The table
and the carrier mask are edited in place when rows are admitted, so a compiled step holds them
as device buffers: new vectors or alphas never recompile it.

Example:
    >>> import torch
    >>> from interventions import ResidualAdd
    >>> a = ResidualAdd(torch.ones(4), site="resid_pre.1", alpha=2.0)
    >>> b = ResidualAdd(torch.ones(4), site="resid_pre.1", alpha=-1.0)
    >>> [table.members == [a, b] for table in find_tables([a, b], [[a], [b], []])]
    [True]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from surgery.blocks import Intervention
from surgery.decode.records import StepRecords
from surgery.step import Step

__all__ = ["RowTable", "find_tables"]


class RowTable:
    """One operation for ``members`` (blocks with one table key), each row with its own parameters.

    Args:
        members: the blocks, in the order they were attached.
        carried: per prompt, the member it carries (or None).
        batch: the number of slots.
    """

    def __init__(self, members: Sequence[Intervention], carried: Sequence[Intervention | None], batch: int):
        self.members = list(members)
        self.lead = self.members[0]  # whose table_edit runs: every member's is the same operation
        self.carried = list(carried)
        first = self.lead.table_row()
        self.table = torch.zeros(batch, *first.shape, dtype=first.dtype, device=first.device)
        self.carrier = torch.zeros(batch, dtype=torch.bool, device=first.device)
        self.records = StepRecords()
        self._rows = {id(member): member.table_row() for member in self.members}
        if first.device.type == "cuda":  # graph replays read these: their addresses must not move
            for buffer in (self.table, self.carrier):
                torch._dynamo.mark_static_address(buffer)

    def admit(self, slots: list[int], rows: list[int]) -> None:
        """Prompts ``rows`` take ``slots``: their parameters go into the table, in place."""
        admitted = torch.zeros_like(self.carrier)
        for slot, row in zip(slots, rows):
            member = self.carried[row]
            if member is None:
                self.table[slot].zero_()
            else:
                self.table[slot].copy_(self._rows[id(member)])
            self.carrier[slot] = member is not None
            admitted[slot] = True
        self.records.admit(admitted)

    def edit(self, site: str, value: Tensor, step: Step, seen: Step) -> Tensor:
        """The members' edit of ``value``, every carrying row with its own parameters, in one
        operation; ``seen`` is ``step`` restricted to the carrying rows."""
        edited, fire = self.lead.table_edit(site, value, seen, self.table)
        if not step.is_rerun:  # a recomputed position was already recorded
            self.records.add(seen, seen.positions, fire)
        return torch.where(self.carrier.view(-1, *([1] * (value.ndim - 1))), edited, value)

    def retire(self, slot: int, row: int) -> None:
        """Prompt ``row`` left ``slot``: where the table fired on it goes to the member it carries."""
        self._hand_over(row, self.records.slot(slot))

    def finish(self, n_rows: int) -> None:
        """After a run without slots (row ``i`` is prompt ``i``): hand every row's record over."""
        recorded = self.records.per_row()  # empty when no forward ran
        for row in range(n_rows):
            self._hand_over(row, recorded[row] if row < len(recorded) else [])

    def _hand_over(self, row: int, positions: list[int]) -> None:
        for member in self.members:
            member.keep_fired(row, positions if member is self.carried[row] else [])


def find_tables(blocks: Sequence, stacks: Sequence[Sequence], batch: int = 1, sites: dict | None = None) -> list[RowTable]:
    """The tables for a run where prompt ``i`` carries ``stacks[i]``: runs of blocks with one
    :meth:`~surgery.blocks.Intervention.table_key`, consecutive at their site, no two carried by one
    prompt (the module docstring). A block alone stays on its own. ``sites``: ``id(block)`` -> its
    resolved sites (the trace's, so ``resid_pre.-1`` and ``resid_pre.3`` are one site when they
    are); default: each block's :meth:`~surgery.blocks.Block.sites` as written."""
    carriers = {id(block): {i for i, stack in enumerate(stacks) if any(b is block for b in stack)} for block in blocks}
    runs: dict[str, list] = {}  # site -> the open run there: [key, members, prompts carrying one]
    closed: list[list] = []
    for block in blocks:
        if not isinstance(block, Intervention):
            continue
        where = block.sites() if sites is None else sites[id(block)]
        key = block.table_key() if len(where) == 1 else None
        for site in where:
            run = runs.get(site)
            joins = run is not None and key is not None and run[0] == key and not run[2] & carriers[id(block)]
            if joins:
                run[1].append(block)
                run[2] |= carriers[id(block)]
                continue
            if run is not None:
                closed.append(run)
            runs[site] = [key, [block], set(carriers[id(block)])] if key is not None else None
    closed.extend(run for run in runs.values() if run is not None)
    tables = []
    for key, members, _ in closed:
        if key is None or len(members) < 2:
            continue
        carried = [next((m for m in members if any(b is m for b in stack)), None) for stack in stacks]
        tables.append(RowTable(members, carried, batch))
    return tables
