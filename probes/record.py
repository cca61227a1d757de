"""RecordSite: keep a site's value at the positions where a trigger fires.

The minimal probe: it copies only the fired rows' vectors (``[n_fired, width]``), never every
hidden state, and sees the value after the interventions at the same site.

Under continuous batching (``tr.generate(prompts, n, batch_size=N)``, :mod:`surgery.decode.slots`) it
follows rows through their slots: each vector is recorded with the row's own step index
(``Step.index_on_device``, 0 at the row's prefill, not the pool's forward count), a finished
row's vectors are kept under its prompt's index (:meth:`RecordSite.retire`), and the result
lists them in the order a fixed batch of all the prompts records them: by step, then prompt,
then position. So each prompt's vectors equal its run alone, and the whole result equals the
fixed batch's (up to float noise in the values). ``result(rows=[i])`` and ``by_row([i])`` read
prompt ``i`` as soon as it has retired, while other prompts still run.

Example:
    >>> import surgery
    >>> from probes import RecordSite
    >>> model = surgery.load()                                          # doctest: +SKIP
    >>> with surgery.trace(model) as tr:                                # doctest: +SKIP
    ...     rec = tr.add(RecordSite("resid_post.-1", when=surgery.OnTokens("\\n\\n")))
    ...     out = tr.generate(["What is 7 * 8?"], max_new_tokens=32, chat=True)
    >>> rec.result().values.shape                                       # doctest: +SKIP
    torch.Size([3, 576])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from surgery.blocks import Probe, register_block
from surgery.row_entries import retired_rows
from surgery.files.results import SavedResult
from surgery.step import Step
from surgery.triggers import Always, OnText, StepWindow, Trigger

__all__ = ["RecordSite", "RecordSiteConfig", "RecordedStates"]


@dataclass(frozen=True)
class RecordSiteConfig:
    site: str = field(default="resid_post.-1", metadata={"help": "the site to read"})
    when: Trigger = field(default_factory=Always, metadata={"help": "where to record (a surgery trigger)"})


@dataclass
class RecordedStates(SavedResult):
    """Recorded vectors, one per fired (row, position), in the order they were seen: by step,
    then row, then position.

    Attributes:
        rows: the prompt of each vector (its batch row, its index among the run's prompts), ``[n]``.
        positions: position id within its row, ``[n]``.
        steps: the row's own step (0 = its prefill, k = its k-th decode step), ``[n]``.
        values: the site's value there, ``[n, width]`` (on the model's device).
    """

    rows: Int[Tensor, " n"]
    positions: Int[Tensor, " n"]
    steps: Int[Tensor, " n"]
    values: Float[Tensor, "n width"]

    def for_row(self, row: int) -> tuple[Int[Tensor, " m"], Float[Tensor, "m width"]]:
        """(positions, values) of one row."""
        keep = self.rows == row
        return self.positions[keep], self.values[keep]


@register_block("record_site")
class RecordSite(Probe):
    """Record ``site``'s value at the (row, position) pairs where ``when`` fires.

    Not graph-safe (:attr:`~surgery.blocks.Block.graph_safe`): it keeps the selected values by
    boolean indexing in a Python list; with it attached a compiled run decodes eagerly.

    Row lifecycle (continuous batching): what a slot records is kept with the slot's index until
    :meth:`retire` moves it under the prompt's index; :meth:`admit` drops whatever the admitted
    slots still hold (nothing, in the engine's loop: a finished row feeds only padding, which is
    not valid, so no trigger fires there before its slot is retired and reused).

    Args:
        site: any site, e.g. ``"resid_post.-1"`` (negative block index from the end).
        when: a trigger (default: every position).
    """

    config_class = RecordSiteConfig

    def __init__(self, site: str = "resid_post.-1", when: Trigger | None = None):
        self.config = RecordSiteConfig(site=site, when=when if when is not None else Always())
        self._parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # (slots, positions, steps, values)
        self._retired: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}  # prompt -> (positions, steps, values)
        self._batch = 0
        self._pooled = False  # rows pass through slots (admit): result(rows) reads retired rows only
        self._width: int | None = None

    def sites(self) -> tuple[str, ...]:
        return (self.config.site,)

    def bind(self, model) -> None:
        self._width = model.site_width(model.resolve_site(self.config.site))
        self._dtype, self._device = model.dtype, model.device
        self.config.when.bind(model)

    def reset(self, batch_size: int) -> None:
        self._parts = []
        self._retired = {}
        self._batch = batch_size
        self._pooled = False

    def admit(self, rows: Tensor, prompts: list[int]) -> None:
        self._pooled = True
        self._parts = _kept([tuple(t[~rows[slots]] for t in (slots, *rest)) for slots, *rest in self._parts])

    def retire(self, slot: int, row: int) -> None:
        mine = [part[0] == slot for part in self._parts]
        self._retired[row] = [tuple(t[keep] for t in part[1:]) for part, keep in zip(self._parts, mine)]
        self._parts = _kept([tuple(t[~keep] for t in part) for part, keep in zip(self._parts, mine)])

    @classmethod
    def example(cls, model, prompts=(), identity: bool = False) -> RecordSite:
        return cls("resid_post.-1", when=OnText("\n\n") | StepWindow(2, 4))

    def by_row(self, rows: Sequence[int] | None = None) -> list[tuple[Tensor, Tensor]]:
        """Per row, its ``(positions, values)`` (:meth:`RecordedStates.for_row`); ``rows`` as in
        :meth:`result`, the entries in that order."""
        found = self.result(rows)
        return [found.for_row(row) for row in (range(len(self._retired) or self._batch) if rows is None else rows)]

    def observe(self, site: str, value: Tensor, step: Step) -> None:
        fire = self.config.when(step)
        rows, columns = fire.nonzero(as_tuple=True)
        self._parts.append((rows, step.positions[rows, columns], _own_steps(step, fire)[rows, columns],
                            value[rows, columns].clone()))

    def result(self, rows: Sequence[int] | None = None) -> RecordedStates:
        """The vectors of the last run (after a continuous run: of every prompt, by prompt index).

        Args:
            rows: prompt indices (default: every row of the last run); under continuous batching
                a row is readable as soon as it has retired (``tr.generate(..., on_row=...)``),
                before the run ends. Only their vectors are kept, in the same order as in the
                whole result (by step, then row, then position).

        Raises:
            ValueError: under continuous batching, a row of ``rows`` that has not retired yet.
        """
        parts = self._parts
        pooled = bool(self._retired) or (self._pooled and rows is not None)  # mid-run, before any row retired too
        if pooled:
            chosen = sorted(self._retired) if rows is None else sorted(set(rows))
            kept = retired_rows(self._retired, chosen)
            parts = [(torch.full_like(positions, row), positions, steps, values)
                     for row, row_parts in zip(chosen, kept) for positions, steps, values in row_parts]
        elif rows is not None:
            parts = _kept([tuple(t[_among(part[0], rows)] for t in part) for part in parts])
        if not parts:
            empty = torch.zeros(0, dtype=torch.long)
            values = torch.zeros(0, self._width or 0, dtype=getattr(self, "_dtype", None),
                                 device=getattr(self, "_device", None))  # as the model's, once bound
            return RecordedStates(empty, empty, empty, values)
        rows_of, positions, steps, values = (torch.cat(column) for column in zip(*parts))
        if pooled:  # the fixed batch's order: by step, then row, then position (stable sorts)
            order = positions.sort(stable=True).indices
            order = order[rows_of[order].sort(stable=True).indices]
            order = order[steps[order].sort(stable=True).indices]
            rows_of, positions, steps, values = rows_of[order], positions[order], steps[order], values[order]
        return RecordedStates(rows_of, positions, steps, values)


def _among(slots: Tensor, rows: Sequence[int]) -> Tensor:
    """Where ``slots`` holds one of ``rows`` (bool, as ``slots``)."""
    return torch.isin(slots, torch.tensor(list(rows), dtype=slots.dtype, device=slots.device))


def _own_steps(step: Step, fire: Tensor) -> Tensor:
    """Each row's own step index at each position of ``fire`` (``[batch, pos]``): the pool's
    ``step.index`` in a fixed batch, the row's own count under continuous batching."""
    index = step.index_on_device
    if index is None:
        return torch.full_like(fire, step.index, dtype=torch.long)
    if index.ndim == 2:  # [batch, 1] per row, or [1, pos] per position (Step.replay): align to fire
        index = index[:, -fire.shape[1] :]
    return index.expand(fire.shape)


def _kept(parts: list[tuple[Tensor, ...]]) -> list[tuple[Tensor, ...]]:
    """The parts that still hold a vector."""
    return [part for part in parts if len(part[0])]
