"""Where a block records, per forward pass, where it acted: on the device, in memory fixed per run.

A block that records per step (steering: which positions got the vector; the token mask:
where it hit the top token) keeps ``(values, mask)`` pairs: position ids and a boolean of the
same shape. Appending them to a Python list works, but a list that grows every step cannot sit
inside a compiled or graph-captured decode step (the compiler guards on its length and
recompiles each step). :class:`StepRecords` keeps the prefill's record (several positions,
run eagerly) aside and writes each decode step's one column into ``[batch, capacity]`` buffers
allocated once per run, at a column counter held on the device: the same memory every step,
no host sync, no Python state that changes while decoding. :meth:`per_row` reads them back in
step order, as :func:`surgery.row_entries.per_row` does for a list.

The capacity is the run's number of decode steps, carried by every :class:`~surgery.step.Step`
(``step.capacity``); records of a forward outside the engine's loop (``surgery.run``: capacity
0) are kept like the prefill's.

Under continuous batching (:mod:`surgery.decode.slots`) each row writes at its own column (its own
step index, ``step.index_on_device`` ``[batch, 1]``); :meth:`admit` forgets the records of the
slots that new rows take, and :meth:`retire` moves a finished row's record, read back on the
host, to the rows kept for :meth:`per_row`, which then lists the run's prompts in order.

Example:
    >>> import torch
    >>> from surgery.step import Step
    >>> step = Step.prefill(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.bool), capacity=4)
    >>> records = StepRecords()
    >>> records.add(step, step.positions, torch.tensor([[False, True]]))
    >>> step = step.next(torch.tensor([7]), torch.tensor([False]), (None, None))
    >>> records.add(step, step.positions, torch.tensor([[True]]))
    >>> records.per_row()
    [[1, 2]]
"""

from __future__ import annotations

import torch
from torch import Tensor

from collections.abc import Sequence

from surgery.row_entries import per_row, pick_rows, retired_rows
from surgery.step import Step

__all__ = ["StepRecords"]


class StepRecords:
    """``(values, mask)`` per forward of one run: the prefill's in a list, decode steps' in buffers."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget everything (a block calls this in ``reset``)."""
        self._eager: list[tuple[Tensor, Tensor]] = []
        self._values: Tensor | None = None
        self._mask: Tensor | None = None
        self._count: Tensor | None = None
        self._retired: dict[int, list[int]] = {}

    def _allocate(self, values: Tensor, capacity: int) -> None:
        batch, device = values.shape[0], values.device
        self._values = torch.zeros(batch, capacity, dtype=values.dtype, device=device)
        self._mask = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self._count = torch.zeros(1, dtype=torch.long, device=device)
        if device.type == "cuda":  # graph replays write here: the addresses must not move
            for buffer in (self._values, self._mask, self._count):
                torch._dynamo.mark_static_address(buffer)

    def add(self, step: Step, values: Tensor, mask: Tensor) -> None:
        """Record ``values`` and ``mask`` (``[batch, pos]``, aligned with ``step``'s positions)."""
        if step.is_prefill or step.capacity == 0:
            self._eager.append((values, mask))
            if step.capacity and self._values is None:
                self._allocate(values, step.capacity)
            return
        if self._values is None:  # no prefill record (the block was attached after it)
            self._allocate(values, step.capacity)
        if step.index_on_device is not None and step.index_on_device.ndim == 2:  # each row its own column
            column = (step.index_on_device - 1).clamp(0, step.capacity - 1)
            self._values.scatter_(1, column, values[:, -1:].to(self._values.dtype))
            self._mask.scatter_(1, column, mask[:, -1:])
            self._count.copy_(torch.full_like(self._count, step.capacity))  # read every column back
            return
        self._values.index_copy_(1, self._count, values[:, -1:].to(self._values.dtype))
        self._mask.index_copy_(1, self._count, mask[:, -1:])
        self._count.add_(1)

    def admit(self, rows: Tensor) -> None:
        """Forget the records of the slots where ``rows`` (bool ``[batch]``) holds."""
        keep = ~rows
        self._eager = [(values, mask & (keep[:, None] if mask.ndim == 2 else keep)) for values, mask in self._eager]
        self._eager = [(values, mask) for values, mask in self._eager if bool(mask.any())]
        if self._mask is not None:
            self._mask &= keep[:, None]

    def retire(self, slot: int, row: int) -> None:
        """Keep ``slot``'s records as prompt ``row``'s entry of :meth:`per_row`."""
        self.keep(row, self.slot(slot))

    def slot(self, slot: int) -> list[int]:
        """The values recorded in batch row ``slot`` so far, in step order."""
        rows = self._read()
        return rows[slot] if slot < len(rows) else []  # nothing recorded at all: no rows

    def keep(self, row: int, values: list[int]) -> None:
        """Keep ``values`` as prompt ``row``'s entry of :meth:`per_row` (recorded elsewhere: a
        per-row table records for the blocks it serves, :mod:`surgery.decode.row_tables`)."""
        self._retired[row] = list(values)

    def _read(self) -> list[list[int]]:
        records = list(self._eager)
        if self._values is not None:
            n = int(self._count)
            records.append((self._values[:, :n], self._mask[:, :n]))
        return per_row(records)

    def per_row(self, rows: Sequence[int] | None = None) -> list[list[int]]:
        """Per batch row, the values where the mask was True, in step order (after a continuous
        run: per prompt, in prompt order). ``rows``: only those (a prompt of a continuous run
        as soon as it has retired)."""
        if self._retired:
            return retired_rows(self._retired, rows)
        return pick_rows(self._read(), rows)
