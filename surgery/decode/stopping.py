"""When generated rows stop, and why: an EOS id, a stop string, or a block.

The decode engine asks a :class:`StopTracker` twice per generated token: :meth:`~StopTracker.own`
before the blocks see the token choice (the rows whose own token stops them), and
:meth:`~StopTracker.record` once the tokens are final (the rows that stop, a block's forced
stops included, with their reason and length). The reasons, :data:`STOP_REASONS`:

- ``"eos"``: the row's token is one of the EOS ids;
- ``"stop_string"``: the row's token completes one of the stop strings in its text;
- ``"block"``: a block's ``forced_stop`` ended the row and its own token would not have (when
  both hold, the row reports its own reason);
- ``"length"``: the row never stopped before ``max_new_tokens``.

Everything stays on the device except stop strings, which need the text: with stop strings the
tracker reads the chosen tokens on the host every step (decoding only a short tail per row).

Example::

    tracker = StopTracker(tokenizer, eos, stop_strings, batch=2, max_new_tokens=16)
    own = tracker.own(chosen, finished)
    finished = finished | tracker.record(k, chosen, own, forced)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["STOP_REASONS", "StopTracker"]

#: Why a row stopped; ``StopTracker.reason`` holds indices into this tuple.
STOP_REASONS = ("length", "eos", "stop_string", "block")
_EOS, _STOP_STRING, _BLOCK = 1, 2, 3


class StopTracker:
    """Per-row stop reasons and lengths over one generation.

    Args:
        tokenizer: decodes the tail of each row for stop strings.
        eos: the ids that stop a row, a ``[n]`` long tensor on the device.
        stop_strings: a row stops on the token that completes one of these (may be empty).
        batch: number of rows.
        max_new_tokens: the length of a row that never stops.

    Attributes:
        reason: ``[batch]`` indices into :data:`STOP_REASONS` (0, ``"length"``, until a row stops).
        kept: ``[batch]`` tokens kept per row: up to and including the one that stopped it.
    """

    def __init__(self, tokenizer, eos: Tensor, stop_strings: Sequence[str], batch: int, max_new_tokens: int):
        self.tokenizer = tokenizer
        self.eos = eos
        self.stop_strings = tuple(stop_strings)
        self.reason = torch.zeros(batch, dtype=torch.long, device=eos.device)
        self.kept = torch.full((batch,), max_new_tokens, dtype=torch.long, device=eos.device)
        # the tokens generated so far per row, kept on the host only when stop strings need them
        self._history: list[list[int]] = [[] for _ in range(batch)]

    def own(self, chosen: Tensor, finished: Tensor) -> Tensor:
        """Rows (bool ``[batch]``) that the token ``chosen`` stops, finished rows excluded."""
        stops = torch.isin(chosen, self.eos) & ~finished
        if self.stop_strings:
            hits = self._completes_stop_string(chosen.tolist(), (~finished).tolist())
            stops = stops | torch.tensor(hits, device=chosen.device)
        return stops

    def record(self, index: int | Tensor, chosen: Tensor, own: Tensor, forced: Tensor) -> Tensor:
        """Log the final tokens of generated token ``index``; return the rows that stop on it.

        Args:
            index: which generated token this is (0 = the first): an int, or one per row
                (``[batch]``) under continuous batching.
            chosen: the tokens emitted, ``[batch]``.
            own: rows whose own token stops them (from :meth:`own`, as the blocks left it).
            forced: rows a block stopped (``TokenChoice.forced_stop``).
        """
        if self.stop_strings:
            for row, token in zip(self._history, chosen.tolist()):
                row.append(token)
        stops = own | forced
        # a row's own reason wins: "block" only where the block's forced stop is the sole cause
        cause = torch.where(own, torch.where(torch.isin(chosen, self.eos), _EOS, _STOP_STRING), _BLOCK)
        self.reason = torch.where(stops, cause, self.reason)
        self.kept = torch.where(stops, index + 1, self.kept)
        return stops

    def admit(self, slots: list[int], budgets: list[int]) -> None:
        """New rows take ``slots`` (continuous batching): no reason yet, ``budgets`` tokens kept
        unless they stop, an empty history."""
        index = torch.tensor(slots, dtype=torch.long, device=self.reason.device)
        self.reason.index_fill_(0, index, 0)
        self.kept.index_copy_(0, index, torch.tensor(budgets, dtype=torch.long, device=self.kept.device))
        for slot in slots:
            self._history[slot] = []

    def reasons(self) -> list[str]:
        """The stop reason of every row, as strings."""
        return [STOP_REASONS[r] for r in self.reason.tolist()]

    def _completes_stop_string(self, candidates: list[int], live: list[bool]) -> list[bool]:
        window = max(len(s) for s in self.stop_strings)
        hits = []
        for row, candidate, alive in zip(self._history, candidates, live):
            if not alive:
                hits.append(False)
                continue
            tail = row[-window:] + [candidate]
            now, before = self.tokenizer.decode(tail), self.tokenizer.decode(tail[:-1])
            hits.append(any(s in now and s not in before for s in self.stop_strings))
        return hits
