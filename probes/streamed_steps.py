"""Reasoning steps pooled while decoding: one running mean per row, one vector per kept step.

What ``ReasoningGraph(steps="streaming")`` (:mod:`probes.reasoning_graph`, the Topology of
Reasoning step vectors) keeps while the model decodes. A step ends at a fed token whose text
ends with ``"\\n"`` (it belongs to the step); the step's vector is the mean of its tokens' states,
kept when ``len(step_text.strip()) > min_chars``. Every hidden state is pooled as it arrives,
never stored.

Per row, :class:`StreamedSteps` holds a running sum ``[d]``, a token count and the character
offsets needed for ``len(text.strip())`` (per vocabulary entry: its length and the offsets of
its first and, one past, last non-whitespace character), all on the device. When a step ends,
the row's mean is written into a buffer ``[batch, capacity, d]`` at the row's step counter (no
host sync), and the counter advances only if the step is long enough; the pooling is one fused op
per token (:func:`surgery.kernels.segment_mean_update`, a Triton kernel on CUDA). The one host
sync is the capacity check: the host keeps an upper bound on the largest step counter (it grows
by one per decode step) and reads the true maximum ``m`` only when that bound reaches the
capacity, then grows the buffer to ``m + max(64, m // 2)`` slots if it has less; so at most one
sync per 64 decode steps (per ``m / 2`` once rows hold ``m`` steps), and the buffer holds at most
``1.5 m + 64`` vectors per row. The prefill is not pooled (only generated tokens are steps).

Under continuous batching (``generate(..., batch_size=N)``, :mod:`surgery.decode.slots`),
:meth:`~StreamedSteps.admit` clears the slots new rows take and :meth:`~StreamedSteps.retire`
keeps a finished row's vectors under its index among the run's prompts, so
:meth:`~StreamedSteps.rows` lists every prompt in order, each as it is alone.

Example:
    >>> import torch
    >>> from surgery.step import Step
    >>> steps = StreamedSteps(["3 + 5 = 8\\n", "So", " 8.", "\\n"], width=1, min_chars=2)
    >>> steps.reset(1)
    >>> step = Step.prefill(torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.bool))
    >>> for token, state in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 6.0), (1, 5.0)]:
    ...     step = step.next(torch.tensor([token]), torch.tensor([False]), (None, None))
    ...     steps.observe(torch.tensor([[[state]]]), step)
    >>> steps.rows()[0].flatten().tolist()   # "3 + 5 = 8\\n", "So 8.\\n"; "So" is too short
    [1.0, 4.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from surgery.row_entries import retired_rows
from surgery.kernels import segment_mean_update
from surgery.step import Step

__all__ = ["StreamedSteps"]

_INITIAL_CAPACITY = 64


class StreamedSteps:
    """Per row, the mean state of each kept step of the generated text, pooled while decoding.

    Args:
        texts: the vocabulary's decoded texts, by token id (``model.vocabulary_texts``).
        width: the width of the pooled states.
        min_chars: a step is kept when ``len(text.strip()) > min_chars``.
        device: where the state lives (the model's device).
    """

    def __init__(self, texts: Sequence[str], width: int, min_chars: int, device: torch.device | str = "cpu"):
        self.width, self.min_chars, self.device = width, min_chars, device
        self._ends_line = torch.tensor([t.endswith("\n") for t in texts], dtype=torch.bool, device=device)
        self._length = torch.tensor([len(t) for t in texts], dtype=torch.long, device=device)
        self._first = torch.tensor([len(t) - len(t.lstrip()) for t in texts], dtype=torch.long, device=device)
        self._last = torch.tensor([len(t.rstrip()) for t in texts], dtype=torch.long, device=device)
        self._has_text = torch.tensor([bool(t.strip()) for t in texts], dtype=torch.bool, device=device)
        self.reset(0)

    def reset(self, batch_size: int) -> None:
        """Forget the last run; ``batch_size`` rows (slots under continuous batching)."""
        zeros = lambda dtype: torch.zeros(batch_size, dtype=dtype, device=self.device)  # noqa: E731
        self._sum = torch.zeros(batch_size, self.width, dtype=torch.float32, device=self.device)
        self._count = zeros(torch.long)
        self._chars = zeros(torch.long)  # characters of the step so far
        self._start = torch.full((batch_size,), -1, dtype=torch.long, device=self.device)  # first non-space
        self._end = zeros(torch.long)  # one past the last non-space
        self._n_steps = zeros(torch.long)
        self.buffer = torch.zeros(batch_size, _INITIAL_CAPACITY, self.width, dtype=torch.float32, device=self.device)
        self._bound = 0  # host-side upper bound on max(self._n_steps)
        self._retired: dict[int, Tensor] = {}
        self._pooled = False  # rows pass through slots (admit): rows(rows) reads retired rows only

    def observe(self, value: Tensor, step: Step) -> None:
        """Pool a decode step's states ``value`` ``[batch, 1, width]``; a prefill is ignored."""
        if step.is_prefill:
            return
        tokens, valid = step.token_ids[:, -1], step.valid[:, -1]
        has_text = self._has_text[tokens] & valid
        self._start = torch.where(has_text & (self._start < 0), self._chars + self._first[tokens], self._start)
        self._end = torch.where(has_text, self._chars + self._last[tokens], self._end)
        self._chars += torch.where(valid, self._length[tokens], 0)
        self._close(value[:, -1], valid, self._ends_line[tokens] & valid)

    def admit(self, rows: Tensor) -> None:
        """New rows take the slots where ``rows`` (bool ``[batch]``) holds: clear their running
        step and their step counter (their old vectors are then past the counter, never read)."""
        self._pooled = True
        for name in ("_sum", "_count", "_chars", "_end", "_n_steps"):
            value = getattr(self, name)
            setattr(self, name, value.masked_fill(rows[:, None] if value.ndim == 2 else rows, 0))
        self._start = self._start.masked_fill(rows, -1)

    def retire(self, slot: int, row: int) -> None:
        """Keep ``slot``'s vectors (its unfinished step too, when long enough) as prompt ``row``'s."""
        with torch.inference_mode(False):  # ordinary tensors, as rows() reads them outside the engine
            self._retired[row] = self._read([slot])[0]

    def rows(self, rows: Sequence[int] | None = None) -> list[Tensor]:
        """Per row, ``[n_steps, width]`` float32 on the device, with the unfinished trailing step
        when it is long enough (in prompt order after a continuous run). Read-only: repeatable,
        and it works outside the engine's inference mode.

        Args:
            rows: prompt indices (default: every row of the last run); under continuous
                batching a row is readable as soon as it has retired, before the run ends.

        Raises:
            ValueError: under continuous batching, a row of ``rows`` that has not retired yet.
        """
        if self._retired or (self._pooled and rows is not None):  # mid-run, before any row retired too
            return retired_rows(self._retired, rows)
        return self._read(range(self._n_steps.shape[0]) if rows is None else rows)

    def _read(self, slots: Sequence[int]) -> list[Tensor]:
        counts = self._n_steps.tolist()
        tails = ((self._count > 0) & self._long_enough()).tolist()
        mean = self._sum / self._count.clamp(min=1)[:, None].float()
        return [torch.cat([self.buffer[slot, : counts[slot]], mean[slot : slot + 1]]) if tails[slot]
                else self.buffer[slot, : counts[slot]].clone() for slot in slots]

    def _long_enough(self) -> Tensor:
        """Rows whose current step has ``len(text.strip()) > min_chars``."""
        return (self._start >= 0) & (self._end - self._start.clamp(min=0) > self.min_chars)

    def _close(self, x: Tensor, valid: Tensor, ended: Tensor) -> None:
        """Pool the new states ``x``; where the step ``ended``, store its mean and start a new one.

        One :func:`~surgery.kernels.segment_mean_update` (a Triton kernel on CUDA): adds ``x``
        into the running sums where ``valid`` (the token that ends a step belongs to it), writes
        the mean of ended rows at their step counter, advances the counter where the step is
        long enough, and clears the sums, in place, with no host sync. The text offsets are
        cleared here.
        """
        self._ensure_capacity()
        keep = ended & self._long_enough()
        segment_mean_update(x, valid, ended, keep, self._sum, self._count, self.buffer, self._n_steps)
        self._bound += 1
        self._chars = torch.where(ended, 0, self._chars)
        self._start = torch.where(ended, -1, self._start)
        self._end = torch.where(ended, 0, self._end)

    def _ensure_capacity(self) -> None:
        capacity = self.buffer.shape[1]
        if self._bound < capacity:
            return
        self._bound = int(self._n_steps.max()) if self._n_steps.numel() else 0  # the one host sync
        # Headroom of max(64, half the steps held) until the next check: few syncs, and the
        # buffer stays within 1.5 x steps + 64 slots.
        target = self._bound + max(_INITIAL_CAPACITY, self._bound // 2)
        if target > capacity:
            grown = self.buffer.new_zeros(self.buffer.shape[0], target, self.buffer.shape[2])
            grown[:, :capacity] = self.buffer
            self.buffer = grown

    def held_bytes(self) -> int:
        """Bytes of device state held now (what the benchmark measures), retired rows' vectors included."""
        tensors = (self._sum, self._count, self._chars, self._start, self._end, self._n_steps, self.buffer,
                   *self._retired.values())
        return sum(t.numel() * t.element_size() for t in tensors)
