"""Continuous batching: more prompts than slots, each finished row's slot taken by the next prompt.

``surgery.generate(model, prompts, max_new_tokens, batch_size=N)`` (and ``tr.generate``) with
more prompts than ``N`` runs them through ``N`` slots: the first ``N`` are prefilled together;
whenever rows stop, their results are kept and the next waiting prompts are prefilled (on a cache
of their own) and take the free slots, with their own positions, think flags, text matcher
states, stop tracking, random stream and step counter (:class:`~surgery.decode.slot_forward.SlotForward`
keeps the KV cache at ``N`` slots of bounded length). Results come back per prompt, in prompt
order. ``max_new_tokens`` may be one budget per prompt. Prompts may also join while it runs
(``late_rows``: a server's requests arriving meanwhile, :mod:`surgery.decode.late_rows`).

Exact per row: a prompt gets the tokens, stop reason and block records it gets alone (up to the
float noise of a padded batch, as in a fixed batch). The blocks follow rows through the row
lifecycle of the block protocol (:meth:`~surgery.blocks.Block.admit` before a row's prefill,
:meth:`~surgery.blocks.Block.retire` when it finishes); the trace passes them in ``on_admit`` and
``on_retire``. Under continuous batching each row counts its own steps (``Step.index_on_device``
is ``[batch, 1]``, :attr:`TokenChoice.indices <surgery.blocks.TokenChoice.indices>` per row).

Example:
    >>> import surgery
    >>> model = surgery.load()                                                     # doctest: +SKIP
    >>> out = surgery.generate(model, ["2+2=", "Name a colour.", "Hi"], [8, 32, 16], batch_size=2)  # doctest: +SKIP
    >>> out.lengths, out.stop_reasons                                              # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from surgery.decode.forward import compile_options
from surgery.decode.generation_output import FinishedRow, GenerationOutput, offer_choice
from surgery.decode.late_rows import LateRows
from surgery.model import Model
from surgery.prompts import encode_prompts
from surgery.decode.sampling import RowSampler, row_keys_for
from surgery.decode.slot_forward import SlotForward, pool_step
from surgery.step import Step
from surgery.decode.stopping import STOP_REASONS, StopTracker
from surgery.text_match import text_matchers
from surgery.token_choice import TokenChoice

__all__ = ["budgets_for", "generate_continuous"]


def budgets_for(max_new_tokens, n_prompts: int) -> list[int]:
    """One budget per prompt from an int or a list (checked: positive integers, one per prompt)."""
    budgets = [max_new_tokens] * n_prompts if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != n_prompts:
        raise ValueError(f"max_new_tokens needs one budget per prompt ({n_prompts}), got {len(budgets)}")
    bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, int) or b <= 0]
    if bad:
        raise ValueError(f"max_new_tokens must be positive integers, got {bad[:3]}")
    return budgets


def _check_fits(model: Model, lengths: list[int], budgets: list[int]) -> None:
    context = model.max_context
    worst = max(range(len(lengths)), key=lambda i: lengths[i] + budgets[i])
    if context is not None and lengths[worst] + budgets[worst] > context:
        raise ValueError(
            f"prompt {worst} has {lengths[worst]} tokens; with max_new_tokens={budgets[worst]} that needs "
            f"{lengths[worst] + budgets[worst]}, more than the model's context of {context} positions"
        )


def generate_continuous(
    model: Model,
    prompts,
    max_new_tokens,
    batch_size: int,
    *,
    do_sample: bool,
    temperature: float,
    top_p: float,
    seed: int | None,
    row_keys: Sequence | None,
    stop_strings: Sequence[str],
    eos_token_ids: Sequence[int] | None,
    chat: bool,
    progress: bool | None,
    on_step: Callable[[Step | None], None] | None,
    on_choose: Callable[[TokenChoice], None] | None,
    text_patterns: Sequence,
    cache: str,
    rerun_from: int | None,
    compile: bool | dict,
    on_admit: Callable[[list[int], list[int]], None] | None = None,
    shared_keys: bool = False,
    on_retire: Callable[[int, int], None] | None = None,
    on_row: Callable[[FinishedRow], None] | None = None,
    late_rows: LateRows | None = None,
):
    """The continuous-batching loop; arguments as :func:`surgery.decode.engine.generate` (which calls it
    when ``batch_size`` is given), plus ``on_admit(slots, rows)`` (prompts ``rows`` are about to take ``slots``) and
    ``on_retire(slot, row)``, then ``on_row`` with the row's :class:`FinishedRow`; ``late_rows``: prompts that
    join while it runs (:mod:`surgery.decode.late_rows`)."""
    input_ids, attention_mask = encode_prompts(model, prompts, chat=chat)
    keys = row_keys_for(input_ids, attention_mask, row_keys, unique=not shared_keys)
    lengths = attention_mask.sum(dim=1).tolist()
    rows = [ids[len(ids) - n :] for ids, n in zip(input_ids.tolist(), lengths)]
    budgets = budgets_for(max_new_tokens, len(rows))
    _check_fits(model, lengths, budgets)
    device, n_slots, capacity = model.device, min(batch_size, len(rows)), max(budgets)
    bound = max(n + b for n, b in zip(lengths, budgets))
    if late_rows is not None:  # every slot from the start; sized for any row that may come
        if model.max_context is not None and late_rows.bound > model.max_context:
            raise ValueError(f"late_rows.bound is {late_rows.bound} columns, more than the model's context of "
                             f"{model.max_context}: lower it")
        n_slots, capacity, bound = batch_size, max(capacity, late_rows.capacity), max(bound, late_rows.bound)
    n_first = min(n_slots, len(rows))
    empty = list(range(n_first, n_slots))  # slots that start without a row (late rows take them)
    eos = torch.tensor(model.eos_token_ids if eos_token_ids is None else list(eos_token_ids), dtype=torch.long, device=device)
    pad = torch.tensor(model.pad_token_id, device=device)
    think_ids, matchers = model.think_token_ids, text_matchers(model, text_patterns)
    if progress is None:
        progress = sys.stderr.isatty() and sum(budgets) >= 512

    first = encode_prompts(model, [rows[r] for r in range(n_first)] + [[model.pad_token_id]] * len(empty))
    first_ids, first_mask = first[0].to(device), first[1].to(device)
    step = pool_step(Step.prefill(first_ids, first_mask, think_ids, matchers, capacity=capacity))
    options = compile_options(compile, cache, device)
    if options is not None:
        # one shape for the whole pool: compile it for that shape, never with symbolic shapes
        # (dynamo's answer to a second cache length in one process, 1.5x slower on SmolLM2 here)
        options.setdefault("dynamic", False)
    forward = SlotForward(model, step, first_mask, on_step, cache, bound, rerun_from, options)
    stops = StopTracker(model.tokenizer, eos, stop_strings, n_slots, capacity)
    stops.admit(list(range(n_slots)), budgets[:n_first] + [1] * len(empty))
    empty_keys = [f"empty-slot:{slot}" for slot in empty]
    sampler = RowSampler(seed, keys[:n_first] + empty_keys, temperature, top_p) if do_sample else None
    slot_row: list[int | None] = [*range(n_first), *[None] * len(empty)]
    waiting = deque(range(n_first, len(rows)))
    budget = torch.tensor(budgets[:n_first] + [1] * len(empty), dtype=torch.long, device=device)
    row_index = torch.zeros(n_slots, dtype=torch.long, device=device)
    finished = torch.tensor([slot in empty for slot in range(n_slots)], dtype=torch.bool, device=device)
    generated = torch.full((n_slots, capacity), model.pad_token_id, dtype=torch.long, device=device)
    results: dict[int, tuple[list[int], str]] = {}
    bar = tqdm(total=len(rows), desc=f"generating ({n_slots} slots)", unit="row", disable=not progress, leave=False)
    start, prefill_s, step_count = time.perf_counter(), 0.0, 0
    admitted_at = [start] * n_slots  # when each slot's row was admitted (FinishedRow.seconds)
    try:
        with torch.inference_mode():
            if on_admit is not None:
                on_admit(list(range(n_first)), list(range(n_first)))
            logits = forward.prefill(first_ids)
            for slot in empty:
                forward.retire(slot)
            prefill_s = time.perf_counter() - start
            while True:
                chosen = sampler.sample(logits) if sampler is not None else logits.argmax(dim=-1)
                chosen = torch.where(finished, pad, chosen)
                own, forced = stops.own(chosen, finished), torch.zeros_like(finished)
                if on_choose is not None:
                    choice = TokenChoice(step_count, forward.step, logits, chosen, own, finished, forced, row_index,
                                         _eos=eos, _recompute=forward.recompute)
                    chosen, own, forced = offer_choice(on_choose, choice, pad)
                generated.scatter_(1, row_index.clamp(max=capacity - 1)[:, None], chosen[:, None])
                finished = finished | stops.record(row_index, chosen, own, forced)
                row_index = row_index + 1
                finished = finished | (row_index >= budget)  # the budget's last token: "length"
                step_count += 1
                done = [s for s, f in enumerate(finished.tolist()) if f and slot_row[s] is not None]
                if done:
                    kept, reasons = stops.kept[done].tolist(), stops.reason[done].tolist()
                    tokens = generated[done].tolist()
                    for s, n, reason, row_tokens in zip(done, kept, reasons, tokens):
                        row = slot_row[s]
                        results[row] = (row_tokens[:n], STOP_REASONS[reason])
                        if on_retire is not None:
                            on_retire(s, row)
                        forward.retire(s)
                        slot_row[s] = None
                        if on_row is not None:
                            text = model.tokenizer.decode(results[row][0], skip_special_tokens=True)
                            on_row(FinishedRow(row, text, results[row][0], lengths[row], results[row][1],
                                               time.perf_counter() - admitted_at[s]))
                    bar.update(len(done))
                if late_rows is not None:
                    _take_late(late_rows, sum(r is None for r in slot_row) - len(waiting), model.vocab_size, rows,
                               lengths, budgets, keys, waiting, bar)
                if all(r is None for r in slot_row) and not waiting:
                    break
                if any(r is not None for r in slot_row):
                    forward.make_room()
                    logits = forward.feed(chosen, finished, think_ids, matchers)
                free = [s for s, r in enumerate(slot_row) if r is None][: len(waiting)]
                if free:
                    admitted = [waiting.popleft() for _ in free]
                    began = time.perf_counter()
                    for s in free:
                        admitted_at[s] = began
                    index = torch.tensor(free, device=device)
                    admit_rows = torch.zeros(n_slots, dtype=torch.bool, device=device)
                    admit_rows[index] = True
                    if on_admit is not None:
                        on_admit(free, admitted)
                    new_logits = forward.admit(free, [rows[r] for r in admitted], think_ids, matchers, model.pad_token_id)
                    logits = logits.index_copy(0, index, new_logits)
                    for s, r in zip(free, admitted):
                        slot_row[s] = r
                        if sampler is not None:
                            sampler.admit(s, keys[r])
                    stops.admit(free, [budgets[r] for r in admitted])
                    budget = budget.index_copy(0, index, torch.tensor([budgets[r] for r in admitted], device=device))
                    row_index = row_index.masked_fill(admit_rows, 0)
                    finished = finished & ~admit_rows
                    prefill_s += time.perf_counter() - began
    finally:
        bar.close()
        forward.close()
        if on_step is not None:
            on_step(None)
    return GenerationOutput.finished(model.tokenizer, [results[r][0] for r in range(len(rows))], lengths,
                                     [results[r][1] for r in range(len(rows))], start, prefill_s,
                                     steps=float(step_count))


def _take_late(late_rows: LateRows, wanted: int, vocab_size: int, rows: list, lengths: list, budgets: list, keys: list,
               waiting: deque, bar) -> None:
    """Up to ``wanted`` late rows join the waiting prompts, with the next prompt indices."""
    if wanted <= 0:
        return
    for late in late_rows.take(wanted)[:wanted]:
        late_rows.check(late, vocab_size)
        rows.append(list(late.prompt))
        lengths.append(len(late.prompt))
        budgets.append(late.budget)
        keys.append(late.key)
        waiting.append(len(rows) - 1)
        bar.total += 1
