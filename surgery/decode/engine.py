"""The decode engine: prefill, then one token at a time with the KV cache.

The toolkit owns this loop (rather than calling ``model.generate``) because interventions need
control that ``generate`` does not give: per-row triggers on the fed token, forcing tokens,
re-running layers for one position. With nothing attached, its greedy tokens equal
``model.generate``'s exactly: it feeds the model the same inputs (left padding, position ids
from the attention mask, no mask at all when nothing is padded, a ``DynamicCache``, the last
position's logits only, pad tokens for finished rows).

:func:`generate` reads prefill, loop, output. Per generated token the loop picks (the argmax, or
a sample with one random stream per row: :mod:`surgery.decode.sampling`), asks
:class:`~surgery.decode.stopping.StopTracker` which rows their token stops, offers the choice to the
token-editing blocks (a :class:`~surgery.blocks.TokenChoice`), records the stops and feeds the
tokens back (:class:`~surgery.decode.forward.Forward`, which owns the KV cache and the re-runs). It waits on the device only
every ``check_every`` steps, to ask whether every row is done, and every step when stop strings
need the text (and, when sampling, at each draw: ``torch.multinomial`` checks its input).
Prompts are encoded by :mod:`surgery.prompts`.

Example:
    >>> import surgery
    >>> model = surgery.load()                                           # doctest: +SKIP
    >>> out = surgery.generate(model, ["What is 7 * 8?"], max_new_tokens=32, chat=True)  # doctest: +SKIP
    >>> out.texts[0], out.lengths[0], out.stop_reasons[0]               # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from surgery.blocks import TokenChoice
from surgery.decode.forward import Forward, compile_options
from surgery.decode.generation_output import FinishedRow, GenerationOutput, offer_choice
from surgery.decode.kv_cache import check_kind
from surgery.decode.late_rows import LateRows
from surgery.model import Model
from surgery.prompts import Prompts, check_context, encode_prompts
from surgery.decode.sampling import RowKey, RowSampler, row_keys_for
from surgery.decode.slots import generate_continuous
from surgery.step import Step
from surgery.decode.stopping import StopTracker
from surgery.text_match import text_matchers

__all__ = ["GenerationOutput", "generate", "run"]


def _output(tokenizer, generated: Tensor, stops: StopTracker, attention_mask: Tensor, start: float, prefill_s: float) -> GenerationOutput:
    """Cut each row after its stop and decode it; ``generated`` holds the steps that ran."""
    kept = torch.minimum(stops.kept, torch.tensor(generated.shape[1], device=generated.device))
    lengths = kept.tolist()
    token_ids = [row[:n] for row, n in zip(generated.tolist(), lengths)]
    return GenerationOutput.finished(tokenizer, token_ids, attention_mask.sum(dim=1).tolist(), stops.reasons(),
                                     start, prefill_s)


def _validate(max_new_tokens, do_sample, temperature, top_p, stop_strings, cache) -> None:
    check_kind(cache)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(stop_strings, str) or any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError(f"stop_strings must be a list of non-empty strings, got {stop_strings!r}")


def generate(
    model: Model,
    prompts: Prompts,
    max_new_tokens: int | Sequence[int] = 64,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    row_keys: Sequence[RowKey] | None = None,
    stop_strings: Sequence[str] = (),
    eos_token_ids: Sequence[int] | None = None,
    chat: bool = False,
    progress: bool | None = None,
    on_step: Callable[[Step | None], None] | None = None,
    on_choose: Callable[[TokenChoice], None] | None = None,
    text_patterns: Sequence = (),
    cache: str = "dynamic",
    rerun_from: int | None = None,
    compile: bool | dict = False,
    batch_size: int | None = None,
    on_admit: Callable | None = None,
    on_retire: Callable | None = None,
    on_row: Callable[[FinishedRow], None] | None = None,
    shared_keys: bool = False,
    late_rows: LateRows | None = None,
) -> GenerationOutput:
    """Generate from a batch of prompts with the toolkit's decode loop.

    Args:
        model: the wrapped model.
        prompts: a string, a list of strings, or a list of token-id lists; rows may differ in
            length (they are left-padded).
        max_new_tokens: most tokens to generate per row (> 0), or one budget per prompt (a
            list: the prompts then run as one pool of slots, :mod:`surgery.decode.slots`).
        do_sample: sample instead of taking the argmax (greedy, the default).
        temperature: softmax temperature when sampling.
        top_p: nucleus sampling mass (1.0 keeps every token).
        seed: when sampling, each row draws from its own random stream, seeded from (seed,
            its row key), so a row samples the same tokens alone or anywhere in any batch
            (:mod:`surgery.decode.sampling`). None draws the seed from torch's global CPU generator
            (``torch.manual_seed`` makes the run repeatable).
        row_keys: one string or int per row, unique, naming the row's random stream; default:
            the row's prompt tokens plus which copy of that prompt it is in the batch (so
            copies differ, and a prompt's first copy samples the same wherever it runs).
            Ignored when greedy.
        stop_strings: a row stops once its generated text contains one of these.
        eos_token_ids: ids that stop a row; default: the model's EOS ids.
        chat: apply the chat template (see :func:`surgery.prompts.encode_prompts`).
        progress: show a progress bar; default: when stderr is a terminal and the run is long.
        on_step: called with each :class:`Step` just before its forward pass, and with None at
            the end (the trace uses it to route hooks).
        on_choose: called with each :class:`TokenChoice` before its tokens are emitted (the
            trace hands it to the interventions that edit the token stream).
        text_patterns: strings (or ``(string, case_sensitive)`` keys) whose occurrences in each
            row's text every step reports in ``Step.text_hits`` (the trace passes those its
            blocks' triggers need).
        cache: ``"dynamic"`` (a cache that grows each step, as ``model.generate``) or
            ``"static"`` (allocated once for prompt plus ``max_new_tokens``: the same memory every
            step, what graph capture needs); greedy tokens are the same (tested), logits may
            differ in the last bits (attention runs over the whole static length, masked).
        rerun_from: the lowest block a :meth:`TokenChoice.recompute` may restart at (the trace
            passes the lowest :attr:`~surgery.blocks.Intervention.rerun_layer` of its blocks):
            the engine then records those blocks' inputs each step, so a recompute runs only
            the blocks from there up. None: a recompute re-runs the whole model.
        compile: run each decode step through ``torch.compile`` (needs ``cache="static"``):
            True uses ``mode="reduce-overhead"`` on CUDA (the step replays as a CUDA graph) and
            the default mode elsewhere, both with ``fullgraph=True``; a dict gives
            ``torch.compile``'s options outright (``{"backend": "eager", "fullgraph": True}``
            checks on a CPU that a stack traces into one graph; its key ``"regions": False``
            turns off compiling the decoder blocks once for all layers,
            :mod:`surgery.decode.block_regions`). The prefill and re-runs stay eager. Only
            blocks that are :attr:`~surgery.blocks.Block.graph_safe` may be attached
            (:meth:`surgery.Trace.generate` decodes eagerly, with a warning, when one is not);
            greedy tokens equal the eager path's (tested on CPU).
        batch_size: continuous batching (:mod:`surgery.decode.slots`): run the prompts through this
            many slots, each finished row's slot taken by the next waiting prompt; every
            prompt's tokens and records equal its run alone. None (the default): one batch of
            every prompt, as before.
        shared_keys: allow equal ``row_keys`` (with ``batch_size``): rows with equal keys draw the
            same random stream (one problem under several conditions of a study, each row
            sampling what its condition's own batch samples).
        on_admit, on_retire: with ``batch_size``, the row lifecycle the trace passes to its
            blocks (:meth:`~surgery.blocks.Block.admit`, :meth:`~surgery.blocks.Block.retire`).
        late_rows: with ``batch_size``, prompts that join the pool while it runs (a server's
            requests arriving meanwhile): :mod:`surgery.decode.late_rows`.
        on_row: called with each prompt's :class:`FinishedRow` once it is final: with
            ``batch_size``, the moment the row leaves its slot (after ``on_retire``), other rows
            still running, so a caller can save it at once; without, for every row at the end.

    Returns:
        A :class:`GenerationOutput`.
    """
    if batch_size is None and not isinstance(max_new_tokens, int):
        batch_size = 1 if isinstance(prompts, str) else len(prompts)  # one budget per prompt: one pool
    if late_rows is not None and batch_size is None:
        raise ValueError("late_rows join a slot pool: give batch_size (the number of slots)")
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer (the number of slots), got {batch_size!r}")
        _validate(1, do_sample, temperature, top_p, stop_strings, cache)
        return generate_continuous(
            model, prompts, max_new_tokens, batch_size, do_sample=do_sample, temperature=temperature, top_p=top_p,
            seed=seed, row_keys=row_keys, stop_strings=stop_strings, eos_token_ids=eos_token_ids, chat=chat,
            progress=progress, on_step=on_step, on_choose=on_choose, text_patterns=text_patterns, cache=cache,
            rerun_from=rerun_from, compile=compile, on_admit=on_admit, on_retire=on_retire, on_row=on_row,
            shared_keys=shared_keys, late_rows=late_rows,
        )
    if shared_keys:
        raise ValueError("shared_keys (equal row keys) works with batch_size (continuous batching) only")
    _validate(max_new_tokens, do_sample, temperature, top_p, stop_strings, cache)
    input_ids, attention_mask = encode_prompts(model, prompts, chat=chat)
    check_context(model, attention_mask, max_new_tokens)
    keys = row_keys_for(input_ids, attention_mask, row_keys)  # on the CPU, before the move
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch = input_ids.shape[0]
    eos = torch.tensor(model.eos_token_ids if eos_token_ids is None else list(eos_token_ids), dtype=torch.long, device=device)
    pad = torch.tensor(model.pad_token_id, device=device)
    think_ids, matchers = model.think_token_ids, text_matchers(model, text_patterns)
    sampler = RowSampler(seed, keys, temperature, top_p) if do_sample else None
    if progress is None:
        progress = sys.stderr.isatty() and max_new_tokens * batch >= 512
    # How often the loop asks the device whether every row is done: each ask is a host sync.
    check_every = 1 if device.type == "cpu" else 8

    first_step = Step.prefill(input_ids, attention_mask, think_ids, matchers, capacity=max_new_tokens)
    options = compile_options(compile, cache, device)
    forward = Forward(model, first_step, attention_mask, on_step, cache, max_new_tokens, rerun_from, options)
    stops = StopTracker(model.tokenizer, eos, stop_strings, batch, max_new_tokens)
    generated = torch.full((batch, max_new_tokens), model.pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    steps_run = 0
    bar = tqdm(total=max_new_tokens, desc=f"generating ({batch} rows)", unit="tok", disable=not progress, leave=False)
    start = time.perf_counter()
    prefill_s = 0.0
    try:
        with torch.inference_mode():
            logits = forward.prefill(input_ids)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # once, so the prefill time is real
            prefill_s = time.perf_counter() - start
            for k in range(max_new_tokens):
                chosen = sampler.sample(logits) if sampler is not None else logits.argmax(dim=-1)
                chosen = torch.where(finished, pad, chosen)
                own, forced = stops.own(chosen, finished), torch.zeros_like(finished)
                if on_choose is not None:
                    choice = TokenChoice(k, forward.step, logits, chosen, own, finished, forced,
                                         _eos=eos, _recompute=forward.recompute)
                    chosen, own, forced = offer_choice(on_choose, choice, pad)
                generated[:, k] = chosen
                steps_run = k + 1
                finished = finished | stops.record(k, chosen, own, forced)
                bar.update(1)
                if k + 1 == max_new_tokens or ((k + 1) % check_every == 0 and bool(finished.all())):
                    break
                logits = forward.feed(chosen, finished, think_ids, matchers)
    finally:
        bar.close()
        forward.close()
        if on_step is not None:
            on_step(None)
    out = _output(model.tokenizer, generated[:, :steps_run], stops, attention_mask, start, prefill_s)
    if on_row is not None:
        for row in range(batch):
            on_row(out.row(row))
    return out


def run(
    model: Model,
    prompts: Prompts,
    *,
    chat: bool = False,
    on_step: Callable[[Step | None], None] | None = None,
    text_patterns: Sequence = (),
) -> Tensor:
    """One forward pass over the prompts, no generation: logits ``[batch, pos, vocab]``.

    Rows are left-padded (the logits at padding positions are meaningless); the row's last
    position is always ``[:, -1]``.

    Example::

        logits = surgery.run(model, ["2 + 2 ="])
        model.tokenizer.decode(logits[0, -1].argmax())
    """
    input_ids, attention_mask = encode_prompts(model, prompts, chat=chat)
    check_context(model, attention_mask)
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    matchers = text_matchers(model, text_patterns)
    step = Step.prefill(input_ids, attention_mask, model.think_token_ids, matchers)
    mask = None if bool(attention_mask.all()) else attention_mask
    try:
        with torch.inference_mode():
            if on_step is not None:
                on_step(step)
            output = model.module(
                input_ids=input_ids, attention_mask=mask, position_ids=step.positions, use_cache=False, return_dict=True
            )
    finally:
        if on_step is not None:
            on_step(None)
    return output.logits
