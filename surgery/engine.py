"""The decode engine: prefill, then one token at a time with the KV cache.

The toolkit owns this loop (rather than calling ``model.generate``) because interventions need
control that ``generate`` does not give: per-row triggers on the fed token, forcing tokens,
re-running layers for one position. With nothing attached, its greedy tokens equal
``model.generate``'s exactly: it feeds the model the same inputs (left padding, position ids
from the attention mask, no mask at all when nothing is padded, a ``DynamicCache``, the last
position's logits only, pad tokens for finished rows).

Example:
    >>> import surgery
    >>> model = surgery.load()                                           # doctest: +SKIP
    >>> out = surgery.generate(model, ["What is 7 * 8?"], max_new_tokens=32, chat=True)  # doctest: +SKIP
    >>> out.texts[0], out.lengths[0], out.stop_reasons[0]               # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import DynamicCache

from surgery.blocks import TokenChoice
from surgery.model import Model
from surgery.prompts import Prompts, check_context, encode_prompts
from surgery.step import Step
from surgery.text_match import text_key

__all__ = ["GenerationOutput", "generate", "run"]

STOP_REASONS = ("length", "eos", "stop_string", "block")


@dataclass
class GenerationOutput:
    """What ``generate`` returns, one entry per prompt row (prompt tokens excluded).

    Attributes:
        texts: the generated text, special tokens skipped.
        token_ids: the generated token ids, including the token that stopped the row (EOS, or
            the one that completed a stop string), as ``model.generate`` returns them.
        lengths: ``len(token_ids[i])``.
        prompt_lengths: number of prompt tokens per row (padding excluded).
        stop_reasons: ``"eos"``, ``"stop_string"``, ``"length"``, or ``"block"`` (a block
            ended the row, e.g. thinking-token insertion after its answer budget).
        timings: seconds for ``prefill_s``, ``decode_s``, ``total_s``, plus ``new_tokens`` and
            ``tokens_per_s`` (new tokens over total time).
    """

    texts: list[str]
    token_ids: list[list[int]]
    lengths: list[int]
    prompt_lengths: list[int]
    stop_reasons: list[str]
    timings: dict[str, float] = field(default_factory=dict)


def _matchers(model: Model, text_patterns) -> dict:
    keys = dict.fromkeys(text_key(p) for p in text_patterns)
    return {key: model.text_matcher(*key) for key in keys}


def _forward_options(module) -> dict:
    options = {"use_cache": True, "return_dict": True}
    if "logits_to_keep" in inspect.signature(module.forward).parameters:
        options["logits_to_keep"] = 1
    return options


def _sample(logits: Tensor, temperature: float, top_p: float, generator) -> Tensor:
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def _stop_string_hits(
    tokenizer, history: list[list[int]], candidates: list[int], stop_strings: Sequence[str], live: list[bool]
) -> list[bool]:
    """Rows whose candidate token completes one of ``stop_strings`` (decoding only a short tail)."""
    window = max(len(s) for s in stop_strings)
    hits = []
    for row, candidate, alive in zip(history, candidates, live):
        if not alive:
            hits.append(False)
            continue
        tail = row[-window:] + [candidate]
        now, before = tokenizer.decode(tail), tokenizer.decode(tail[:-1])
        hits.append(any(s in now and s not in before for s in stop_strings))
    return hits


def _validate(max_new_tokens, do_sample, temperature, top_p, stop_strings) -> None:
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
    max_new_tokens: int = 64,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_strings: Sequence[str] = (),
    eos_token_ids: Sequence[int] | None = None,
    chat: bool = False,
    progress: bool | None = None,
    on_step: Callable[[Step | None], None] | None = None,
    on_choose: Callable[[TokenChoice], None] | None = None,
    text_patterns: Sequence = (),
) -> GenerationOutput:
    """Generate from a batch of prompts with the toolkit's decode loop.

    Args:
        model: the wrapped model.
        prompts: a string, a list of strings, or a list of token-id lists; rows may differ in
            length (they are left-padded).
        max_new_tokens: most tokens to generate per row (> 0).
        do_sample: sample instead of taking the argmax (greedy, the default).
        temperature: softmax temperature when sampling.
        top_p: nucleus sampling mass (1.0 keeps every token).
        seed: seeds the sampler's own generator (same batch + seed = same tokens).
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

    Returns:
        A :class:`GenerationOutput`.
    """
    _validate(max_new_tokens, do_sample, temperature, top_p, stop_strings)
    input_ids, attention_mask = encode_prompts(model, prompts, chat=chat)
    check_context(model, attention_mask, max_new_tokens)
    device, module, tokenizer = model.device, model.module, model.tokenizer
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch = input_ids.shape[0]
    eos = torch.tensor(model.eos_token_ids if eos_token_ids is None else list(eos_token_ids), dtype=torch.long, device=device)
    pad = torch.tensor(model.pad_token_id, device=device)
    think_ids = model.think_token_ids
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if progress is None:
        progress = sys.stderr.isatty() and max_new_tokens * batch >= 512
    # How often the loop asks the device whether every row is done: each ask is a host sync.
    check_every = 1 if device.type == "cpu" else 8

    options = _forward_options(module)
    cache = DynamicCache(config=module.config)
    matchers = _matchers(model, text_patterns)
    step = Step.prefill(input_ids, attention_mask, think_ids, matchers)
    # model.generate drops an all-ones mask (the model then builds a plain causal mask)
    mask = None if bool(attention_mask.all()) else attention_mask
    generated = torch.full((batch, max_new_tokens), model.pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    kept = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)
    reason = torch.zeros(batch, dtype=torch.long, device=device)  # index into STOP_REASONS
    history: list[list[int]] = [[] for _ in range(batch)]
    steps_run = 0

    def recompute(install) -> Tensor:
        """Roll the cache back one position and re-run the current step's last position."""
        cache.crop(-1)
        handles = install()
        last = step.tail(1)
        try:
            if on_step is not None:
                on_step(dataclasses.replace(last, is_rerun=True))
            rerun = module(
                input_ids=last.token_ids, attention_mask=mask, position_ids=last.positions, past_key_values=cache, **options
            )
        finally:
            for handle in handles:
                handle.remove()
            if on_step is not None:
                on_step(step)
        return rerun.logits[:, -1].to(dtype=torch.float32, copy=True)

    bar = tqdm(total=max_new_tokens, desc=f"generating ({batch} rows)", unit="tok", disable=not progress, leave=False)
    start = time.perf_counter()
    prefill_s = 0.0
    try:
        with torch.inference_mode():
            if on_step is not None:
                on_step(step)
            output = module(input_ids=input_ids, attention_mask=mask, position_ids=step.positions, past_key_values=cache, **options)
            for k in range(max_new_tokens):
                logits = output.logits[:, -1].to(dtype=torch.float32, copy=True)
                if k == 0:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # once, so the prefill time is real
                    prefill_s = time.perf_counter() - start
                chosen = _sample(logits, temperature, top_p, generator) if do_sample else logits.argmax(dim=-1)
                chosen = torch.where(finished, pad, chosen)
                stops = torch.isin(chosen, eos) & ~finished
                if stop_strings:
                    candidates, live = chosen.tolist(), (~finished).tolist()
                    hits = _stop_string_hits(tokenizer, history, candidates, stop_strings, live)
                    stops = stops | torch.tensor(hits, device=device)
                forced = torch.zeros_like(finished)
                if on_choose is not None:
                    choice = TokenChoice(k, step, logits, chosen, stops, finished, forced, eos, recompute)
                    on_choose(choice)
                    chosen = torch.where(finished, pad, choice.chosen)
                    forced = choice.forced_stop & ~finished
                    stops = (choice.stops | forced) & ~finished
                if stop_strings:
                    for row, token in zip(history, chosen.tolist()):
                        row.append(token)
                generated[:, k] = chosen
                steps_run = k + 1
                cause = torch.where(forced, 3, torch.where(torch.isin(chosen, eos), 1, 2))
                reason = torch.where(stops, cause, reason)
                kept = torch.where(stops, k + 1, kept)
                was_finished, finished = finished, finished | stops
                bar.update(1)
                if k + 1 == max_new_tokens or ((k + 1) % check_every == 0 and bool(finished.all())):
                    break
                step = step.next(chosen, was_finished, think_ids, matchers)
                if on_step is not None:
                    on_step(step)
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                output = module(
                    input_ids=chosen[:, None], attention_mask=mask, position_ids=step.positions, past_key_values=cache, **options
                )
    finally:
        bar.close()
        if on_step is not None:
            on_step(None)
    kept = torch.minimum(kept, torch.tensor(steps_run, device=device))
    lengths = kept.tolist()
    rows = generated[:, :steps_run].tolist()
    token_ids = [row[:n] for row, n in zip(rows, lengths)]
    total_s = time.perf_counter() - start
    new_tokens = sum(lengths)
    return GenerationOutput(
        texts=tokenizer.batch_decode(token_ids, skip_special_tokens=True),
        token_ids=token_ids,
        lengths=lengths,
        prompt_lengths=attention_mask.sum(dim=1).tolist(),
        stop_reasons=[STOP_REASONS[r] for r in reason.tolist()],
        timings={
            "prefill_s": prefill_s,
            "decode_s": total_s - prefill_s,
            "total_s": total_s,
            "new_tokens": float(new_tokens),
            "tokens_per_s": new_tokens / total_s if total_s > 0 else float("nan"),
        },
    )


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
    matchers = _matchers(model, text_patterns)
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
