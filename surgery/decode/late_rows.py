"""Prompts that join a running slot pool: a server's requests that arrive while it decodes.

``generate(..., batch_size=N, late_rows=LateRows(take, capacity, bound))`` runs the given prompts
through ``N`` slots (all ``N``, even when fewer prompts are given: the empty ones wait), and
whenever slots are free and no given prompt waits, asks ``take(free)`` for up to ``free`` more
rows. A late row is prefilled and admitted like any waiting prompt, with the next prompt index,
and gets what it gets alone, as every row of a pool does. The run ends once every slot is empty,
no prompt waits and ``take`` returns nothing.

``capacity`` and ``bound`` size the pool once for every row that may come: a late row's budget
must be at most ``capacity`` and its prompt plus budget at most ``bound`` columns (a static cache
allocates ``bound``). Under a trace (``tr.generate(..., stacks=..., late_rows=...)``) each late
row names its ``stack``, a list of blocks already attached to the trace.

Example:
    >>> import surgery
    >>> model = surgery.load()                                                       # doctest: +SKIP
    >>> arriving = [[[1, 2, 3], 8, "late-0"]]
    >>> take = lambda free: [LateRow(*arriving.pop()) for _ in range(min(free, len(arriving)))]
    >>> out = surgery.generate(model, ["Hi"], 8, batch_size=4, late_rows=LateRows(take, 8, 64))  # doctest: +SKIP
    >>> len(out.texts)                                                               # doctest: +SKIP
    2
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["LateRow", "LateRows"]


@dataclass
class LateRow:
    """One prompt joining the pool.

    Attributes:
        prompt: its token ids.
        budget: its most new tokens.
        key: its random stream's name (:mod:`surgery.decode.sampling`).
        stack: under a trace, the attached blocks it carries (None: every attached block, as a
            prompt given without ``stacks``).
    """

    prompt: list[int]
    budget: int
    key: str | int
    stack: Sequence | None = None


@dataclass
class LateRows:
    """Where late rows come from, and the limits every one of them keeps (module docstring)."""

    take: Callable[[int], list[LateRow]]
    capacity: int
    bound: int

    def check(self, row: LateRow, vocab_size: int) -> None:
        """Refuse a row outside the limits the pool was sized for.

        Raises:
            ValueError: naming the limit.
        """
        if not row.prompt or any(not 0 <= t < vocab_size for t in row.prompt):
            raise ValueError(f"a late row needs token ids in 0..{vocab_size - 1}, got {row.prompt[:5]}")
        if isinstance(row.budget, bool) or not isinstance(row.budget, int) or not 0 < row.budget <= self.capacity:
            raise ValueError(f"a late row's budget must be in 1..{self.capacity} (the pool's capacity), got {row.budget!r}")
        if len(row.prompt) + row.budget > self.bound:
            raise ValueError(f"a late row of {len(row.prompt)} prompt tokens and budget {row.budget} needs more than the "
                             f"pool's {self.bound} columns")
