"""What one decode step is about to emit, handed to the interventions that edit the token stream.

The engine builds one :class:`TokenChoice` per generated token, after the model's pick and
before the tokens are emitted; :meth:`surgery.blocks.Intervention.choose` states the protocol
blocks follow (read, replace, force, stop, recompute).

Example:
    >>> import torch
    >>> from surgery.step import Step
    >>> step = Step.prefill(torch.tensor([[5, 6], [7, 8]]), torch.ones(2, 2, dtype=torch.bool))
    >>> no = torch.tensor([False, False])
    >>> choice = TokenChoice(0, step, torch.zeros(2, 4), torch.tensor([1, 2]), no, no, no, _eos=torch.tensor([3]))
    >>> choice.replace(torch.tensor([True, False]), torch.tensor([3, 3]))
    >>> choice.chosen.tolist(), choice.stops.tolist(), choice.indices.tolist()
    ([3, 2], [True, False], [0, 0])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from surgery.step import Step

__all__ = ["TokenChoice"]


@dataclass
class TokenChoice:
    """The tokens one decode step is about to emit; interventions may change them.

    The engine builds one per generated token and hands it to each intervention's ``choose``
    in the order they were added (the protocol is in :meth:`Intervention.choose`). Everything is
    a ``[batch]`` tensor on the model's device.

    Attributes:
        index: which generated token this is (0 = the first).
        step: the :class:`Step` whose forward pass produced ``logits``.
        logits: the last position's logits, float32, ``[batch, vocab]``.
        chosen: the tokens about to be emitted.
        stops: rows that would stop on their token (EOS or a stop string).
        finished: rows that had stopped before (they emit padding whatever happens here).
        forced_stop: set by blocks to end rows on this token (stop reason ``"block"``, unless
            the row's own token stops it too: then ``"eos"`` or ``"stop_string"``).
        indices: which generated token this is for each row, ``[batch]``: equal to ``index`` in
            a fixed batch; under continuous batching (``generate(..., batch_size=N)``) each row
            counts its own tokens while ``index`` counts the pool's steps. Per-row budgets read
            ``indices``.
    """

    index: int
    step: Step
    logits: Tensor
    chosen: Tensor
    stops: Tensor
    finished: Tensor
    forced_stop: Tensor
    indices: Tensor | None = None
    _eos: Tensor = field(repr=False, default=None)
    _recompute: Callable | None = field(repr=False, default=None)

    def __post_init__(self) -> None:
        if self.indices is None:
            self.indices = torch.full_like(self.chosen, self.index)

    def replace(self, rows: Tensor, tokens: Tensor, stop: bool | None = None) -> None:
        """Emit ``tokens`` instead for ``rows`` (bool ``[batch]``).

        ``stop=None`` re-derives whether those rows stop (the new token is an EOS);
        ``stop=False``/``True`` says it outright (forced tokens never stop a row).
        """
        rows = rows & ~self.finished
        self.chosen = torch.where(rows, tokens, self.chosen)
        new_stop = torch.isin(tokens, self._eos) if stop is None else torch.full_like(rows, stop)
        self.stops = torch.where(rows, new_stop, self.stops)

    def recompute(self, install: Callable[[], list], from_layer: int | None = None) -> Tensor:
        """Re-run this step's last position with extra hooks; return its new logits ``[batch, vocab]``.

        The KV cache is rolled back by one position first, so the recomputed keys and values
        replace the old ones. ``install`` registers the extra hooks and returns their handles;
        they are removed afterwards. Blocks see the re-run with ``step.is_rerun`` set.
        ``from_layer``: the lowest block whose output can change (blocks below it are not
        touched by the extra hooks); when the block declared it as its
        :attr:`~Intervention.rerun_layer`, only blocks from there up run again, on their
        inputs recorded in the step's forward. Otherwise the whole model re-runs.
        """
        return self._recompute(install, from_layer)
