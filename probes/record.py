"""RecordSite: keep a site's value at the positions where a trigger fires.

The minimal probe: it copies only the fired rows' vectors (``[n_fired, width]``), never every
hidden state, and sees the value after the interventions at the same site.

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

from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from surgery.blocks import Probe, register_block
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
    """Recorded vectors, one per fired (row, position), in the order they were seen.

    Attributes:
        rows: batch row of each vector, ``[n]``.
        positions: position id within its row, ``[n]``.
        steps: engine step (0 = prefill), ``[n]``.
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

    Args:
        site: any site, e.g. ``"resid_post.-1"`` (negative block index from the end).
        when: a trigger (default: every position).
    """

    config_class = RecordSiteConfig

    def __init__(self, site: str = "resid_post.-1", when: Trigger | None = None):
        self.config = RecordSiteConfig(site=site, when=when if when is not None else Always())
        self._parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._width: int | None = None

    def sites(self) -> tuple[str, ...]:
        return (self.config.site,)

    def bind(self, model) -> None:
        self._width = model.site_width(model.resolve_site(self.config.site))
        self._dtype, self._device = model.dtype, model.device
        self.config.when.bind(model)

    def reset(self, batch_size: int) -> None:
        self._parts = []
        self._batch = batch_size

    @classmethod
    def example(cls, model, prompts=(), identity: bool = False) -> RecordSite:
        return cls("resid_post.-1", when=OnText("\n\n") | StepWindow(2, 4))

    def by_row(self) -> list[tuple[Tensor, Tensor]]:
        found = self.result()
        return [found.for_row(row) for row in range(self._batch)]

    def observe(self, site: str, value: Tensor, step: Step) -> None:
        fire = self.config.when(step)
        rows, columns = fire.nonzero(as_tuple=True)
        self._parts.append(
            (rows, step.positions[rows, columns], torch.full_like(rows, step.index), value[rows, columns].clone())
        )

    def result(self) -> RecordedStates:
        if not self._parts:
            empty = torch.zeros(0, dtype=torch.long)
            return RecordedStates(empty, empty, empty, torch.zeros(0, self._width or 0))
        rows, positions, steps, values = (torch.cat(parts) for parts in zip(*self._parts))
        return RecordedStates(rows, positions, steps, values)
