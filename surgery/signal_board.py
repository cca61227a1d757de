"""Where a probe keeps its signals: per-row device values, this forward's and the previous one.

A probe that publishes signals (:mod:`surgery.signals`) names each with a :class:`SignalSpec` and
writes one value per row every forward into a :class:`SignalBoard`; :class:`~surgery.signals.OnSignal`
reads them. The board holds, per signal, the current value of each row, the value of the row's
forward before it, and the step index (the row's own) at which the current value was published:
device buffers allocated at the first publish of a run and written in place afterwards, so a
compiled decode step can hold them and no read waits on the host.

Per row, not per batch: under continuous batching (:mod:`surgery.decode.slots`) rows come and go
through slots and count their own steps (``Step.index_on_device`` ``[batch, 1]``). A prefill
writes only the rows that run in it (those with a valid position: the admission prefill of a
slot pool leaves the other slots' signals as they were), ``previous`` is each row's own previous
forward, and :meth:`SignalBoard.admit` forgets the slots that new rows take. A fixed batch (a
0-d ``index_on_device``) is the case where every row's index is the same.

Example:
    >>> import torch
    >>> from surgery.step import Step
    >>> step = Step.prefill(torch.tensor([[5, 6], [7, 8]]), torch.ones(2, 2, dtype=torch.bool))
    >>> board = SignalBoard({"score": SignalSpec("score", "float", "resid_post.0")})
    >>> board.publish("score", torch.tensor([0.5, 2.0]), step)
    >>> board.read("score", step).tolist(), board.read("score", step, previous=True).isnan().tolist()
    ([0.5, 2.0], [True, True])
    >>> board.admit(torch.tensor([False, True]))  # a new row takes slot 1
    >>> board.read("score", step).tolist()[1]
    nan
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from surgery.step import Step

__all__ = ["SIGNAL_KINDS", "SignalBoard", "SignalSpec"]

SIGNAL_KINDS = ("bool", "float", "class")


@dataclass(frozen=True)
class SignalSpec:
    """One signal a probe publishes.

    Attributes:
        name: what readers call it (``OnSignal(probe, name)``).
        kind: ``"bool"`` (False before the first value), ``"float"`` (NaN before) or
            ``"class"`` (an index into ``classes``; -1 where there is no class this step).
        site: the canonical site whose forward hook computes it.
        classes: the class names of a ``"class"`` signal, in index order.
        other_names: names a reader may compare with that this probe never outputs (a thought
            probe fit without transition thoughts): they match nothing.
    """

    name: str
    kind: str
    site: str
    classes: tuple[str, ...] = ()
    other_names: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in SIGNAL_KINDS:
            raise ValueError(f"signal kind must be one of {SIGNAL_KINDS}, got {self.kind!r}")

    @property
    def dtype(self) -> torch.dtype:
        return {"bool": torch.bool, "float": torch.float64, "class": torch.long}[self.kind]

    @property
    def empty(self) -> float | bool | int:  # the value before anything is published
        return {"bool": False, "float": float("nan"), "class": -1}[self.kind]


def _row_indices(step: Step) -> Int[Tensor, " batch"]:
    """Each row's own step index in ``step`` (the index of the forward that emits the row's
    next token): ``index_on_device`` per row (``[batch, 1]`` under continuous batching), or the
    batch's one index (0-d) for every row.

    Example:
        >>> import torch
        >>> step = Step.prefill(torch.tensor([[5], [6]]), torch.ones(2, 1, dtype=torch.bool))
        >>> _row_indices(step).tolist()
        [0, 0]
    """
    index = step.index_on_device
    return index.expand(step.batch_size) if index.ndim == 0 else index[:, -1]


class SignalBoard:
    """A probe's signals for one run: current and previous value per row, on the device.

    The buffers are allocated at the first :meth:`publish` of a run (the prefill, which runs
    eagerly) and written in place afterwards; ``published_at`` holds, per row, the row's step
    index of its last value, so :meth:`read` with ``previous=True`` picks the right buffer for
    each row without asking the host.
    """

    def __init__(self, specs: dict[str, SignalSpec]):
        self.specs = dict(specs)
        self.clear()

    def clear(self) -> None:
        """Forget the last run (a probe calls this in ``reset``)."""
        self._current: dict[str, Tensor] = {}
        self._previous: dict[str, Tensor] = {}
        self._published_at: dict[str, Tensor] = {}

    def _allocate(self, name: str, batch: int, device: torch.device) -> None:
        spec = self.specs[name]  # below: graph replays write these buffers, their addresses must not move
        self._current[name] = torch.full((batch,), spec.empty, dtype=spec.dtype, device=device)
        self._previous[name] = self._current[name].clone()
        self._published_at[name] = torch.full((batch,), -1, dtype=torch.long, device=device)
        if device.type == "cuda":
            for buffer in (self._current[name], self._previous[name], self._published_at[name]):
                torch._dynamo.mark_static_address(buffer)

    def admit(self, rows: Bool[Tensor, " batch"]) -> None:
        """New rows take the slots where ``rows`` holds: their signals are as before anything was
        published (empty, no previous value); other slots keep theirs (a probe calls this in its
        :meth:`~surgery.blocks.Block.admit`)."""
        for name, current in self._current.items():
            empty = self.specs[name].empty
            current.masked_fill_(rows, empty)
            self._previous[name].masked_fill_(rows, empty)
            self._published_at[name].masked_fill_(rows, -1)

    def publish(self, name: str, value: Tensor, step: Step) -> None:
        """This forward's value of signal ``name``, one per row (``[batch]``).

        A decode step writes every row (a finished row gets whatever the probe publishes for
        it); a prefill writes only the rows with a valid position, so the slots an admission
        prefill does not run keep their values.
        """
        if name not in self._current:
            self._allocate(name, value.shape[0], value.device)
        current, previous, published_at = self._current[name], self._previous[name], self._published_at[name]
        value, index = value.to(self.specs[name].dtype), _row_indices(step)
        if step.is_prefill:  # eager: one more where per buffer costs nothing here
            rows = step.valid.any(dim=1)
            previous.copy_(torch.where(rows, current, previous))
            current.copy_(torch.where(rows, value, current))
            published_at.copy_(torch.where(rows, index, published_at))
            return
        previous.copy_(current)
        current.copy_(value)
        published_at.copy_(index)

    def read(self, name: str, step: Step, previous: bool = False) -> Tensor:
        """Signal ``name`` per row (``[batch]``) as a reader at ``step`` sees it.

        ``previous=False``: the latest value (the trace made sure it is this forward's).
        ``previous=True``: each row's value of its forward before ``step``'s, whether or not the
        probe has published in ``step`` yet (empty in the row's prefill).
        """
        if name not in self._current:  # nothing published in this run yet
            spec = self.specs[name]
            return torch.full((step.batch_size,), spec.empty, dtype=spec.dtype, device=step.token_ids.device)
        if not previous:
            return self._current[name]
        published_now = self._published_at[name] == _row_indices(step)
        return torch.where(published_now, self._previous[name], self._current[name])
