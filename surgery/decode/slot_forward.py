"""The model calls of a slot pool: one cache of ``batch`` slots, rows admitted into it mid-run.

:class:`SlotForward` is :class:`~surgery.decode.forward.Forward` (prefill, one fed token per step,
re-runs) for continuous batching (:mod:`surgery.decode.slots`). On top of it:

- :meth:`~SlotForward.admit` prefills new rows on a cache of their own, then copies their keys
  and values into the slots they take (:func:`surgery.decode.slot_cache.place`), ending at the pool's
  current column, with the slot's attention mask hiding every column before; the pool's
  :class:`~surgery.step.Step` continues from each admitted row's last prompt position
  (:meth:`Step.splice <surgery.step.Step.splice>`), so the row's next step feeds its first
  token at its own position ``len(prompt)``, as it would alone;
- :meth:`~SlotForward.make_room` drops the leading columns no live row needs
  (:func:`surgery.decode.slot_cache.shift_columns`): a static cache once the pool reaches its
  bound, a dynamic one as soon as the oldest live row's columns start later, so the cache stays
  at ``batch x bound`` however many rows pass through (a dynamic one at what its live rows span).

The attention mask is always explicit here (rows differ in where they start). With a static
cache it is one ``[batch, bound]`` tensor edited in place: admitting a row or compacting changes
no shape and no address, so a compiled decode step never recompiles.

Example::

    forward = SlotForward(model, first_step, mask, on_step=None, cache="dynamic", bound=96)
    logits = forward.prefill(ids)                            # the first batch, [batch, vocab]
    logits = forward.feed(chosen, finished, think_ids, matchers)
    new_logits = forward.admit([2], [[5, 6, 7]], think_ids, matchers)   # row into slot 2
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from surgery.decode.forward import Forward
from surgery.decode.kv_cache import new_cache
from surgery.model import Model
from surgery.decode.slot_cache import place, shift_columns
from surgery.step import Step

__all__ = ["SlotForward", "pool_step"]


def pool_step(step: Step, slots: tuple[int, ...] | None = None) -> Step:
    """``step`` with each row counting its own steps (``index_on_device`` ``[batch, 1]``, 0 at the
    prefill) and, for an admission prefill, the slots its rows take."""
    index = torch.zeros(step.batch_size, 1, dtype=torch.long, device=step.token_ids.device)
    return dataclasses.replace(step, index_on_device=index, slots=slots)


class SlotForward(Forward):
    """:class:`~surgery.decode.forward.Forward` over a pool of slots; see the module docstring.

    Args:
        model, step, on_step, cache, rerun_from, compile_options: as for ``Forward``.
        attention_mask: the first rows' mask, ``[batch, width]``.
        bound: the most columns the cache holds (a static cache's size): at least the longest
            prompt plus its budget of new tokens.
    """

    def __init__(
        self,
        model: Model,
        step: Step,
        attention_mask: Tensor,
        on_step: Callable[[Step | None], None] | None,
        cache: str,
        bound: int,
        rerun_from: int | None = None,
        compile_options: dict | None = None,
    ):
        width = attention_mask.shape[1]
        super().__init__(model, step, attention_mask, on_step, cache, bound - width, rerun_from, compile_options)
        self.kind, self.bound, self.config = cache, bound, model.module.config
        mask = attention_mask.long()
        self.mask = torch.cat([mask, mask.new_ones(len(mask), bound - width)], dim=1) if self.static else mask
        self.columns = width  # columns written so far (kept on the host: no sync to ask)
        self.starts: list[int | None] = [width - n for n in attention_mask.sum(dim=1).tolist()]

    def feed(self, chosen: Tensor, finished: Tensor, think_ids, matchers) -> Tensor:
        if self.columns >= self.bound:
            raise RuntimeError(f"the pool's cache is full ({self.bound} columns): call make_room first")
        self.columns += 1
        return super().feed(chosen, finished, think_ids, matchers)

    def retire(self, slot: int) -> None:
        """The row in ``slot`` is done: its columns no longer need keeping."""
        self.starts[slot] = None

    def make_room(self) -> None:
        """Before a feed: drop the leading columns that no live row attends to. A static cache
        does it at the bound (a copy of the cache each time); a dynamic one whenever there are
        any (re-slicing copies nothing), so each step's attention and cache append run over the
        columns the live rows need and no more."""
        if self.static and self.columns < self.bound:
            return
        live = [start for start in self.starts if start is not None]
        drop = min(live) if live else self.columns - 1
        if drop > 0:
            self._shift(drop)
        elif self.columns >= self.bound:
            raise RuntimeError(f"a row spans the whole cache of {self.bound} columns: raise the bound")

    def _shift(self, by: int) -> None:
        shift_columns(self.cache, by)
        mask = self.mask
        if by > 0:
            moved = torch.cat([mask[:, by:], mask.new_ones(len(mask), by)], dim=1)
        else:
            moved = torch.cat([mask.new_zeros(len(mask), -by), mask], dim=1)
            moved = moved[:, : self.bound] if self.static else moved
        if self.static:
            self.mask.copy_(moved)  # in place: a compiled step keeps its address
        else:
            self.mask = moved[:, : self.columns - by]
        self.columns -= by
        self.starts = [None if start is None else start - by for start in self.starts]

    def admit(self, slots: list[int], prompts: list[list[int]], think_ids, matchers, pad_id: int) -> Tensor:
        """Prefill ``prompts`` (token ids, one per slot in ``slots``) and put them in those slots;
        return their last positions' logits, float32 ``[len(slots), vocab]``."""
        batch, device = self.mask.shape[0], self.mask.device
        width = max(map(len, prompts))
        ids = torch.full((batch, width), pad_id, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for slot, prompt in zip(slots, prompts):
            ids[slot, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[slot, width - len(prompt) :] = 1
        ids, mask, index = ids.to(device), mask.to(device), torch.tensor(slots, device=device)
        step = pool_step(Step.prefill(ids, mask, think_ids, matchers, capacity=self.step.capacity), tuple(slots))
        own_ids, own_mask = ids.index_select(0, index), mask.index_select(0, index)
        cache = new_cache(self.kind, self.config, self.bound)
        if self.static:
            attention = torch.cat([own_mask, own_mask.new_ones(len(slots), self.bound - width)], dim=1)
        else:
            attention = None if bool(own_mask.all()) else own_mask
        self._announce(step)
        output = self.module(
            input_ids=own_ids, attention_mask=attention, position_ids=step.positions.index_select(0, index),
            **{self.cache_keyword: cache}, **self.options,
        )
        logits = output.logits[:, -1].to(dtype=torch.float32, copy=True)
        if self.columns < width:
            self._shift(self.columns - width)
        rows = torch.zeros(batch, dtype=torch.bool, device=device)
        rows[index] = True
        for row, (slot, prompt) in enumerate(zip(slots, prompts)):
            place(self.cache, cache, slot, row, len(prompt))
            self.mask[slot] = 0
            self.mask[slot, self.columns - len(prompt) : None if self.static else self.columns] = 1
            self.starts[slot] = self.columns - len(prompt)
        self.step = self.step.splice(rows, step)
        if self.inputs is not None:
            self.inputs.forget()  # the recorded inputs are the admitted rows': re-run fully once
        self._announce(self.step)
        return logits
