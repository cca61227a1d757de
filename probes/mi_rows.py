"""The MI probe's per-row state: each row's series of values, and each slot's answer.

:class:`~probes.mi.MIEstimator` computes one value per row every forward and keeps, per row,
those of the forwards that feed the row a valid token (one per generated token):
:class:`RowSeries`, ``[batch, capacity]`` device buffers written in place, with a count per
row, so a compiled decode step can append to them without a host sync, and the running peak
rules (:func:`probes.peaks.fence_so_far`) read the history straight from them. Each row is
scored against its own prompt's answer (its ``Ry`` factors).

Under continuous batching (:mod:`surgery.decode.slots`) a batch row is a slot that prompts pass
through: :meth:`RowSeries.admit` empties the slots new rows take, :meth:`RowSeries.retire`
keeps a finished row's series under its prompt index, and :meth:`RowSeries.rows` then lists
the run's prompts in order; :class:`SlotAnswers` puts each admitted prompt's answer in its slot.

Example:
    >>> import torch
    >>> series = RowSeries(batch=2, capacity=4, device=torch.device("cpu"), growable=False)
    >>> series.append(torch.tensor([1.0, 2.0]), torch.tensor([True, True]), torch.tensor([True, True]))
    >>> series.append(torch.tensor([3.0, 4.0]), torch.tensor([True, True]), torch.tensor([True, False]))
    >>> [v.tolist() for v in series.rows()[0]]
    [[1.0, 3.0], [2.0]]
    >>> series.retire(slot=1, row=0)                      # prompt 0 finished in slot 1
    >>> series.admit(torch.tensor([False, True]))         # prompt 1 takes slot 1
    >>> series.append(torch.tensor([5.0, 6.0]), torch.tensor([True, True]), torch.tensor([False, True]))
    >>> series.retire(slot=1, row=1)
    >>> series.retire(slot=0, row=2)
    >>> [v.tolist() for v in series.rows()[0]]
    [[2.0], [6.0], [1.0, 3.0]]
    >>> [v.tolist() for v in series.rows([2, 0])[0]]   # chosen prompts only, in that order
    [[1.0, 3.0], [2.0]]
    >>> answers = SlotAnswers((torch.tensor([[10.0], [11.0], [12.0]]),), slots=2)  # 3 prompts' answers
    >>> answers.admit(torch.tensor([True, True]), [0, 1])
    >>> answers.admit(torch.tensor([True, False]), [2])   # prompt 2 takes slot 0
    >>> answers.factors[0].flatten().tolist(), answers.admitted
    ([12.0, 11.0], 3)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from surgery.row_entries import retired_rows

__all__ = ["RowSeries", "SlotAnswers"]


class RowSeries:
    """Each row's values, one per valid forward, in ``[batch, capacity]`` device buffers written
    in place (no host sync), with the count per row.

    ``capacity`` is the run's number of forwards when the engine runs it (``Step.capacity``):
    then the buffers never move. A host's own loop (nnsight, a TransformerLens bridge's
    ``generate``) does not say how many forwards come: there the buffers double when full.

    Args:
        batch: rows (slots under continuous batching).
        capacity: values a row may hold (the most tokens a row generates).
        device: where the buffers live.
        growable: double the buffers when a forward would not fit (a host's own loop).
        pooled: the rows pass through slots (continuous batching): :meth:`rows` lists retired
            prompts only. :meth:`admit` sets it too.
    """

    def __init__(self, batch: int, capacity: int, device: torch.device, growable: bool, pooled: bool = False):
        self.values = torch.zeros(batch, capacity, dtype=torch.float64, device=device)
        self.converged = torch.ones(batch, capacity, dtype=torch.bool, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.growable = growable
        self.appends = 0  # forwards seen (counted only when growable): an upper bound of every row's count
        self.retired: dict[int, tuple[Tensor, Tensor]] = {}  # prompt index -> (values, converged), CPU
        self.pooled = pooled  # continuous batching: rows are read once retired
        if device.type == "cuda":  # graph replays write here: the addresses must not move
            for buffer in (self.values, self.converged, self.count):
                torch._dynamo.mark_static_address(buffer)

    def append(self, values: Float[Tensor, " batch"], converged: Bool[Tensor, " batch"],
               valid: Bool[Tensor, " batch"]) -> None:
        """One forward's value per row; only the rows where ``valid`` holds keep theirs."""
        if self.growable:  # a host's own loop (capacity unknown): no compiled step runs here
            if self.appends == self.values.shape[1]:
                self.values = torch.cat([self.values, torch.zeros_like(self.values)], dim=1)
                self.converged = torch.cat([self.converged, torch.ones_like(self.converged)], dim=1)
            self.appends += 1
        # a full row (it used its whole budget) is fed padding, not valid, until its slot is
        # reused: it rewrites its last value with itself
        slot = self.count.clamp(max=self.values.shape[1] - 1)[:, None]
        self.values.scatter_(1, slot, torch.where(valid[:, None], values[:, None], self.values.gather(1, slot)))
        self.converged.scatter_(1, slot, torch.where(valid[:, None], converged[:, None], self.converged.gather(1, slot)))
        self.count.add_(valid.long())

    def admit(self, rows: Bool[Tensor, " batch"]) -> None:
        """New rows take the slots where ``rows`` holds: their series start empty (in place)."""
        self.pooled = True
        self.values.masked_fill_(rows[:, None], 0.0)
        self.converged.masked_fill_(rows[:, None], True)
        self.count.masked_fill_(rows, 0)

    def retire(self, slot: int, row: int) -> None:
        """Keep ``slot``'s series as prompt ``row``'s entry of :meth:`rows` (read to the host)."""
        n = int(self.count[slot])
        # a copy (on a CPU run .cpu() is a view of the buffers the slot's next row overwrites)
        self.retired[row] = (self.values[slot, :n].to("cpu", copy=True), self.converged[slot, :n].to("cpu", copy=True))

    def rows(self, rows: Sequence[int] | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Per row, its values and convergence flags (CPU); after a continuous run, per prompt
        in prompt order (the retired rows).

        Args:
            rows: prompt indices (default: every row of the last run); under continuous
                batching a row is readable as soon as it has retired, before the run ends.

        Raises:
            ValueError: under continuous batching, a row of ``rows`` that has not retired yet.
        """
        if self.retired or (self.pooled and rows is not None):  # mid-run, before any row retired too
            kept = retired_rows(self.retired, rows)
            return [values for values, _ in kept], [converged for _, converged in kept]
        counts = self.count.tolist()
        values, converged = self.values.cpu(), self.converged.cpu()
        chosen = range(len(counts)) if rows is None else rows
        return [values[i, : counts[i]] for i in chosen], [converged[i, : counts[i]] for i in chosen]


class SlotAnswers:
    """Each slot's answer under continuous batching: per-prompt tensors (one row per prompt, in
    prompt order: the MI probe's ``Ry`` factors) gathered into one row per slot, in place.

    Args:
        answers: tensors ``[prompts, ...]`` (e.g. ``(left, right)``).
        slots: the pool's number of slots.
    """

    def __init__(self, answers: tuple[Tensor, ...], slots: int):
        self.answers = answers
        self.factors = tuple(a.new_zeros((slots, *a.shape[1:])) for a in answers)  # what the rows read
        self.admitted = 0  # prompts admitted so far
        if self.factors[0].device.type == "cuda":  # a compiled step reads them: the addresses must not move
            for buffer in self.factors:
                torch._dynamo.mark_static_address(buffer)

    def admit(self, rows: Bool[Tensor, " batch"], prompts: list[int]) -> None:
        """Prompts ``prompts`` (their indices in the run, in slot order) take the slots where
        ``rows`` holds: copy their answers in."""
        if any(prompt >= len(self.answers[0]) for prompt in prompts):
            raise ValueError(f"there are {len(self.answers[0])} answers, and this run admits prompt {max(prompts)}: "
                             "pass one answer per prompt, in prompt order")
        device = self.factors[0].device
        at, index = rows.nonzero().flatten(), torch.tensor(prompts, dtype=torch.long, device=device)
        for buffer, answers in zip(self.factors, self.answers):
            buffer.index_copy_(0, at, answers.index_select(0, index))
        self.admitted += len(prompts)
