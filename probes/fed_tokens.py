"""The token ids a probe saw fed, per row: the prompt's and the generated tokens fed back.

Probes that read a row's text after the run (``ReasoningGraph(steps="released")`` through
:class:`~probes.released_steps.TextRecorder`, :class:`~probes.thought_classifier.ThoughtClassifier`)
keep, while the model runs, only the ids of what was fed: the prompt's in the prefill, one id per
row per decode step. :class:`FedTokens` keeps them on the device (no host sync per step) and
gives them back per row after the run (:meth:`FedTokens.rows`).

Under continuous batching (``generate(..., batch_size=N)``, :mod:`surgery.decode.slots`) the rows pass
through ``N`` slots: :meth:`~FedTokens.admit` forgets what the slots that new rows take held,
the admission prefill (pool-wide, only the admitted rows valid) replaces only those slots'
prompts, and :meth:`~FedTokens.retire` keeps a finished row's ids under its index among the
run's prompts, so :meth:`~FedTokens.rows` lists every prompt in order, each as it is alone.

Example:
    >>> import torch
    >>> from surgery.step import Step
    >>> tokens = FedTokens()
    >>> tokens.reset(2)
    >>> step = Step.prefill(torch.tensor([[0, 5], [6, 7]]), torch.tensor([[0, 1], [1, 1]]))
    >>> tokens.observe(step)
    >>> step = step.next(torch.tensor([8, 9]), torch.tensor([False, True]), (None, None))
    >>> tokens.observe(step)
    >>> tokens.rows()
    [([5], [8]), ([6, 7], [])]
    >>> tokens.rows([1])
    [([6, 7], [])]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from surgery.row_entries import retired_rows
from surgery.step import Step

__all__ = ["FedTokens"]


class FedTokens:
    """The prompt's and the fed tokens' ids of one run, per row, kept on the device.

    Per slot, its prompt's ids and valid mask from the prefill that admitted it; per decode step,
    the fed ids ``[batch]`` and where they are valid (False at finished rows, and at the token a
    row stopped on, which alone it never feeds).
    """

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, batch_size: int) -> None:
        """Forget the last run."""
        self.prompts: dict[int, tuple[Tensor, Tensor]] = {}  # per slot: prompt ids and valid mask, [pos]
        self.fed: list[tuple[Tensor, Tensor]] = []  # per decode step: the fed ids and their valid mask, [batch]
        self.retired: dict[int, tuple[list[int], list[int] | None]] = {}  # per finished row (continuous batching)
        self.pooled = False  # rows pass through slots (admit): rows(rows) reads retired rows only

    def observe(self, step: Step) -> None:
        """Keep the prompt (a prefill: of the slots it admits) or the fed tokens (a decode step)."""
        if step.is_prefill:
            ids, valid = step.token_ids.clone(), step.valid.clone()
            for slot in range(step.batch_size) if step.slots is None else step.slots:
                self.prompts[slot] = (ids[slot], valid[slot])
        else:
            self.fed.append((step.token_ids[:, -1].clone(), step.valid[:, -1].clone()))

    def admit(self, rows: Tensor) -> None:
        """New rows take the slots where ``rows`` (bool ``[batch]``) holds: forget their tokens.

        Their prompts go (the admission prefill brings the new ones), their fed tokens are marked
        not valid, and the decode steps with no valid token left are dropped (one host sync), so
        memory follows the live rows, not the whole run.
        """
        self.pooled = True
        for slot in rows.nonzero().flatten().tolist():
            self.prompts.pop(slot, None)
        self.fed = [(ids, valid & ~rows) for ids, valid in self.fed]
        if self.fed:
            alive = torch.stack([valid for _, valid in self.fed]).any(dim=1).tolist()
            self.fed = [pair for pair, keep in zip(self.fed, alive) if keep]

    def retire(self, slot: int, row: int) -> None:
        """Keep ``slot``'s ids as prompt ``row``'s entry of :meth:`rows`.

        A row that fed no generated token saw no decode step of its own (it stopped on its first
        token: retired before the next feed, as alone the run ends there), so it gets None.
        """
        prompt, generated = self._read([slot])[0]
        self.retired[row] = (prompt, generated if generated else None)

    def rows(self, rows: Sequence[int] | None = None) -> list[tuple[list[int], list[int] | None]]:
        """Per row, its prompt's ids and the generated ids fed back (in prompt order after a
        continuous run). The second is None where no decode step ran (``tr.run``, or a
        ``tr.generate`` that stopped at the first token), else the valid fed ids.

        Args:
            rows: prompt indices (default: every row of the last run); under continuous
                batching a row is readable as soon as it has retired, before the run ends.

        Raises:
            ValueError: a row of ``rows`` that has not retired yet (continuous batching), or
                that the last (fixed) batch does not have.
        """
        if self.retired or (self.pooled and rows is not None):  # mid-run, before any row retired too
            return retired_rows(self.retired, rows)
        if rows is None:
            return self._read(range(len(self.prompts)))
        missing = [row for row in rows if row not in self.prompts]
        if missing:
            raise ValueError(f"row {missing[0]} is not a row of the last run ({len(self.prompts)} rows)")
        return self._read(rows)

    def _read(self, slots: Sequence[int]) -> list[tuple[list[int], list[int] | None]]:
        """``(prompt ids, fed ids or None)`` of ``slots``, read back on the host."""
        found = []
        fed = fed_valid = None
        if self.fed:
            index = torch.tensor(list(slots), device=self.fed[0][0].device)
            fed, fed_valid = (torch.stack([pair[i] for pair in self.fed], dim=1)[index].cpu() for i in (0, 1))
        for k, slot in enumerate(slots):
            ids, valid = (t.cpu() for t in self.prompts[slot])
            found.append((ids[valid].tolist(), None if fed is None else fed[k][fed_valid[k]].tolist()))
        return found

    def held_bytes(self) -> int:
        """Bytes of device memory the ids take now."""
        pairs = [*self.prompts.values(), *self.fed]
        return sum(t.numel() * t.element_size() for pair in pairs for t in pair)
