"""A block's entries per row: from per-step records, and after a continuous run per prompt.

Blocks record where they acted per forward pass as ``(values, mask)`` device tensors and turn
them into one list per row only when asked (:func:`per_row`: no host sync while decoding).
Under continuous batching (:mod:`surgery.decode.slots`) each prompt's entry is kept when it
retires from its slot, in a dict from prompt index to entry (:func:`retired_rows`); after a
fixed batch, :func:`pick_rows` selects rows of the finished run. Both take ``rows``: the entries
of chosen prompts (:meth:`surgery.blocks.Block.by_row`), readable the moment they retire.

Example:
    >>> import torch
    >>> per_row([(torch.tensor([[3, 4]]), torch.tensor([[True, False]]))])
    [[3]]
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = ["per_row", "pick_rows", "retired_rows"]


def retired_rows(retired: dict, rows: Sequence[int] | None = None) -> list:
    """Entries of ``retired`` (prompt index -> entry, kept as each prompt retired from its slot)
    for ``rows``, in that order; default: every prompt of the finished run.

    Raises:
        ValueError: a row that has not retired (it is still running, or was never admitted).

    Example:
        >>> retired_rows({1: "b", 0: "a"}), retired_rows({1: "b"}, [1])
        (['a', 'b'], ['b'])
    """
    if rows is None:
        return [retired[row] for row in range(len(retired))]
    missing = [row for row in rows if row not in retired]
    if missing:
        raise ValueError(f"row {missing[0]} has not finished yet: read a row once it has retired (on_row)")
    return [retired[row] for row in rows]


def pick_rows(entries: list, rows: Sequence[int] | None = None) -> list:
    """``entries`` (one per row of a finished batch) for ``rows``, in that order (None: all).

    Example:
        >>> pick_rows(["a", "b", "c"], [2, 0])
        ['c', 'a']
    """
    return list(entries) if rows is None else [entries[row] for row in rows]


def per_row(records: list[tuple[Tensor | int, Tensor]]) -> list[list[int]]:
    """Turn what a block recorded per step into one list per batch row.

    Each record is ``(values, mask)``: ``mask`` is bool ``[batch]`` or ``[batch, pos]`` (where the
    block acted) and ``values`` a tensor of the same shape (e.g. position ids) or one int for
    the whole step. Returns, per row, the values where the mask is True, in record order.
    Blocks keep device tensors while decoding and convert only here (no sync per step).

    Example:
        >>> import torch
        >>> per_row([(torch.tensor([[0, 1], [0, 1]]), torch.tensor([[True, False], [True, True]])),
        ...          (5, torch.tensor([False, True]))])
        [[0], [0, 1, 5]]
    """
    if not records:
        return []
    rows: list[list[int]] = [[] for _ in range(records[0][1].shape[0])]
    for values, mask in records:
        mask2d = mask if mask.ndim == 2 else mask[:, None]
        for row, column in mask2d.nonzero().tolist():
            if isinstance(values, Tensor):
                rows[row].append(int(values[row, column] if values.ndim == 2 else values[row]))
            else:
                rows[row].append(int(values))
    return rows
