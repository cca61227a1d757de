"""TTTS as the authors released it: three generate passes joined as text, run with our engine.

arXiv 2506.02867 §5 (METHODS.md §2 "TTTS"). :class:`~interventions.ThinkingTokenInsertion`
holds the paper's rule (the default ``joins="tokens"``: the word's tokens forced in one decode
where the row would stop). The released code (ChnQ/MI-Peaks bcee82c,
``src/applications/TTTS_evaluate.py``, ``batch_TTTS_generation`` L136-215) does this instead,
and :func:`released_ttts` does the same with our engine, every other attached block active in
every pass:

1. the prompt continues for B₀ tokens (``--max_tokens_per_call 4096``, run_TTTS.sh L34); the
   text is stripped: ``first``;
2. the text ``f"{prompt} {first} {word}"`` (L166: the join puts a space on each side; the word
   is written as in the word list, ``"Wait"``) is tokenized again and continues for B tokens
   (``--token_budget 4096``, run_TTTS.sh L12, L35); stripped: ``second``;
3. ``f"{prompt} {first} {word}" + second + " Final Answer within \\boxed{}:"`` (L192: no space
   between the word and ``second``) continues for 16 tokens (L197), and only those are graded
   (L215, L303-311, L347: the text ``.rstrip()``, then ``.strip()``): :attr:`ReleasedTTTSOutput.texts`.

So the word follows the whole first output (answer included), never ``</think>``.
Every pass (L142-153, L169-180, L196-207): greedy (``temperature=0.0``, top_p 1), stopping on
the tokenizer's EOS (vLLM's default; the extra stop ids 151645/151643 only when the model path
contains "qwen2", which "DeepSeek-R1-Distill-Qwen-7B" does not) and on the stop strings
:data:`RELEASED_STOP_STRINGS` (L272, prompt type ``deepseek-math``); each prompt text is
tokenized with special tokens (vLLM's default: the BOS of R1-Distill); the output is decoded with
``skip_special_tokens=False``, the stopping EOS's or stop string's text left out (vLLM's
``include_stop_str_in_output=False``): :func:`released_text`. The prompt is raw text in the
``deepseek-math`` template, not the chat template (run_TTTS.sh passes no
``--apply_chat_template``): :func:`released_prompt`. One run per word (L392-410): the 18
letters-only words of ``data/DeepSeek-R1-Distill-Llama-8B.jsonl``, :data:`RELEASED_TTTS_WORDS`.

Deviations: vLLM decodes in bf16 with its own kernels (a greedy tie may break differently); the
released epoch loop that runs a program when an answer ends in a code fence (L271, L320) is
not reproduced; blocks' per-run records (``by_row``) and probes keep the answer pass only
(:attr:`ReleasedTTTSOutput.block_rows` keeps every pass's).

A study runner reaches it through :func:`trace_generate`, a drop-in for ``tr.generate``.

Example:
    >>> released_prompt("What is 7 * 8?")
    'User: What is 7 * 8?\\nPlease reason step by step, and put your final answer within \\\\boxed{}.\\n\\nAssistant:'
    >>> import surgery
    >>> model = surgery.load()                                                      # doctest: +SKIP
    >>> out = released_ttts(model, [released_prompt("What is 7 * 8?")], "Wait")    # doctest: +SKIP
    >>> out.texts[0], out.first_lengths[0], out.extension_lengths[0]               # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from interventions.thinking_tokens import ThinkingTokenInsertion
from surgery.decode.engine import GenerationOutput
from surgery.model import Model
from surgery.prompts import apply_chat_template
from surgery.decode.trace import Trace, trace

__all__ = [
    "RELEASED_ANSWER_PROMPT",
    "RELEASED_PROMPT_TEMPLATE",
    "RELEASED_STOP_STRINGS",
    "RELEASED_TTTS_WORDS",
    "ReleasedTTTSOutput",
    "released_prompt",
    "released_text",
    "released_ttts",
    "trace_generate",
]

RELEASED_ANSWER_PROMPT = " Final Answer within \\boxed{}:"
"""The answer prompt of the third pass (TTTS_evaluate.py L192)."""
RELEASED_STOP_STRINGS = ("</s>", "<|im_end|>", "<|endoftext|>")
"""The stop strings of every pass for prompt type ``deepseek-math`` (TTTS_evaluate.py L272)."""
RELEASED_TTTS_WORDS = ("So", "Let", "Hmm", "I", "The", "Okay", "That", "First", "Now", "Wait", "But", "Then", "Since",
                       "Therefore", "Maybe", "x", "If", "To")
"""The words the release runs, one run each, in file order (letters-only entries of
``data/DeepSeek-R1-Distill-Llama-8B.jsonl``, TTTS_evaluate.py L392-397)."""
RELEASED_PROMPT_TEMPLATE = (
    "User: {question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.\n\nAssistant:"
)
"""The ``deepseek-math`` prompt template (utils.py L97-102), filled by :func:`released_prompt`."""


def released_prompt(question: str) -> str:
    """The released run's prompt for ``question``: the ``deepseek-math`` template, zero-shot,
    ``.strip(" ")`` as ``construct_prompt`` does (utils.py L203, L240)."""
    if not isinstance(question, str) or not question:
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    return RELEASED_PROMPT_TEMPLATE.format(question=question).strip(" ")


def released_text(tokenizer, token_ids: Sequence[int], stop_reason: str, stop_strings: Sequence[str] = ()) -> str:
    """One pass's text as the release reads it from vLLM (``skip_special_tokens=False``).

    Args:
        tokenizer: the model's tokenizer.
        token_ids: the tokens the engine generated (its stop token included).
        stop_reason: the engine's reason: ``"eos"`` leaves the last token's text out,
            ``"stop_string"`` cuts the text where the first of ``stop_strings`` starts (vLLM
            drops the stop string and what follows); other reasons keep everything.
        stop_strings: the pass's stop strings.

    Returns:
        The text, not stripped.

    Example:
        >>> class Chars:  # a stand-in tokenizer: one character per id
        ...     def decode(self, ids, **options):
        ...         return "".join(map(chr, ids))
        >>> released_text(Chars(), [72, 105, 46, 60, 47, 115, 62], "stop_string", ["</s>"])
        'Hi.'
        >>> released_text(Chars(), [72, 105, 0], "eos")
        'Hi'
    """
    ids = list(token_ids)
    if stop_reason == "eos" and ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if stop_reason == "stop_string":
        found = [text.find(s) for s in stop_strings if s in text]
        text = text[: min(found)] if found else text
    return text


@dataclass
class ReleasedTTTSOutput(GenerationOutput):
    """What :func:`released_ttts` returns, one entry per prompt row.

    The fields of :class:`~surgery.decode.engine.GenerationOutput` (``texts``, ``token_ids``,
    ``lengths``, ``prompt_lengths``, ``stop_reasons``) describe the answer pass, the one the
    release grades; ``texts`` is its text stripped, what the release grades. ``timings`` adds up
    the passes.

    Attributes:
        word: the thinking word.
        first_texts: the first pass's text, stripped (as joined).
        extension_texts: the second pass's text, stripped ("" when ``budget`` is 0).
        answer_texts: the answer pass's text, not stripped.
        budget_prompts: the second pass's prompt text, ``f"{prompt} {first} {word}"``.
        final_prompts: the answer pass's prompt text.
        first_lengths, extension_lengths: tokens each pass generated (its stop token included,
            as ``GenerationOutput.lengths``; 0 for a skipped second pass).
        first_stop_reasons, extension_stop_reasons: why each pass stopped (``"skipped"``).
        passes: the engine's output of each pass: first, second (None when skipped), answer.
        block_rows: after each pass, ``block.by_row()`` of every block of the trace, in order.
    """

    word: str = ""
    first_texts: list[str] = field(default_factory=list)
    extension_texts: list[str] = field(default_factory=list)
    answer_texts: list[str] = field(default_factory=list)
    budget_prompts: list[str] = field(default_factory=list)
    final_prompts: list[str] = field(default_factory=list)
    first_lengths: list[int] = field(default_factory=list)
    extension_lengths: list[int] = field(default_factory=list)
    first_stop_reasons: list[str] = field(default_factory=list)
    extension_stop_reasons: list[str] = field(default_factory=list)
    passes: list = field(default_factory=list)
    block_rows: list = field(default_factory=list)

    @property
    def total_lengths(self) -> list[int]:
        """Tokens generated per row over the three passes."""
        return [a + b + c for a, b, c in zip(self.first_lengths, self.extension_lengths, self.lengths, strict=True)]

    def records(self) -> list[dict]:
        """Per row, the released run's texts, token counts and stop reasons as JSON values (for a
        results store, beside the graded ``texts``)."""
        return [
            {"word": self.word, "first_text": self.first_texts[i], "extension_text": self.extension_texts[i],
             "answer_text": self.answer_texts[i], "first_tokens": self.first_lengths[i],
             "extension_tokens": self.extension_lengths[i], "answer_tokens": self.lengths[i],
             "first_stop_reason": self.first_stop_reasons[i], "extension_stop_reason": self.extension_stop_reasons[i],
             "answer_stop_reason": self.stop_reasons[i]}
            for i in range(len(self.texts))
        ]


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def released_ttts(model_or_trace, prompts, word: str, first_budget: int = 4096, budget: int = 4096,
                  answer_prompt: str = RELEASED_ANSWER_PROMPT, answer_tokens: int = 16, *, blocks: Sequence = (),
                  stop_strings: Sequence[str] = RELEASED_STOP_STRINGS, chat: bool = False,
                  **options) -> ReleasedTTTSOutput:
    """Run the released TTTS procedure (the module docstring states it) on ``prompts``.

    Args:
        model_or_trace: a wrapped :class:`~surgery.Model` (a trace holding ``blocks`` is opened
            for the call) or an active :class:`~surgery.Trace` (its blocks stay attached).
        prompts: the prompt texts (a string or a list): the release's ``question`` is the whole
            prompt, e.g. :func:`released_prompt`'s.
        word: the thinking word as the release writes it (``"Wait"``; the join adds the space).
        first_budget: the first pass's most tokens, B₀ (>= 1; released 4096).
        budget: the second pass's most tokens, B (>= 0; released 4096; 0 skips the pass and
            joins an empty text).
        answer_prompt: appended before the answer pass (released: :data:`RELEASED_ANSWER_PROMPT`).
        answer_tokens: the answer pass's most tokens (>= 1; released 16).
        blocks: blocks to attach when ``model_or_trace`` is a model; active in every pass.
        stop_strings: every pass stops on these (released: :data:`RELEASED_STOP_STRINGS`).
        chat: apply the chat template to the prompts first, then join as text (the release's
            ``--apply_chat_template`` path; off in run_TTTS.sh).
        **options: more options of ``tr.generate`` for every pass (``eos_token_ids``,
            ``do_sample``, ``seed``, ``row_keys``, ``cache``, ``compile``, ``progress``...).

    Returns:
        A :class:`ReleasedTTTSOutput`.

    Raises:
        ValueError: empty or non-text prompts, an empty word, a budget out of range, blocks
            given beside a trace.
        TypeError: ``model_or_trace`` is neither a Model nor a Trace.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or any(not isinstance(p, str) or not p for p in prompts):
        raise ValueError("the released TTTS joins text: prompts must be non-empty strings (not token ids)")
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"word must be a non-empty string such as 'Wait', got {word!r}")
    if not isinstance(answer_prompt, str) or not answer_prompt:
        raise ValueError(f"answer_prompt must be a non-empty string (released: {RELEASED_ANSWER_PROMPT!r}), "
                         f"got {answer_prompt!r}")
    _check_int("first_budget", first_budget, 1)
    _check_int("budget", budget, 0)
    _check_int("answer_tokens", answer_tokens, 1)
    for name in ("max_new_tokens", "stop_strings", "chat"):
        if name in options:
            raise ValueError(f"{name} is set by released_ttts itself, not through **options")
    if isinstance(model_or_trace, Trace):
        if blocks:
            raise ValueError("blocks go with a model; with a trace, attach them to it (tr.add(block)) first")
        return _passes(model_or_trace, prompts, word, first_budget, budget, answer_prompt, answer_tokens,
                       tuple(stop_strings), chat, options)
    if not isinstance(model_or_trace, Model):
        raise TypeError(f"released_ttts needs a surgery Model or an active Trace, got {type(model_or_trace).__name__}")
    with trace(model_or_trace, *blocks) as tr:
        return _passes(tr, prompts, word, first_budget, budget, answer_prompt, answer_tokens, tuple(stop_strings),
                       chat, options)


@contextmanager
def _recording(blocks):
    """Released-mode blocks stay quiet in the passes (they only record)."""
    for block in blocks:
        block._in_passes = True
    try:
        yield
    finally:
        for block in blocks:
            block._in_passes = False


def _released_blocks(tr: Trace) -> list[ThinkingTokenInsertion]:
    return [b for b in tr.blocks if isinstance(b, ThinkingTokenInsertion) and b.config.joins == "released"]


def _passes(tr, prompts, word, first_budget, budget, answer_prompt, answer_tokens, stop_strings, chat, options):
    tokenizer = tr.model.tokenizer
    questions = apply_chat_template(tr.model, prompts) if chat else prompts
    run = dict(options, stop_strings=stop_strings, chat=False)
    block_rows = []

    def generate(texts, n):
        out = tr.generate(texts, n, **run)
        block_rows.append([block.by_row() for block in tr.blocks])
        return out, [released_text(tokenizer, ids, why, stop_strings)
                     for ids, why in zip(out.token_ids, out.stop_reasons, strict=True)]

    recorders = _released_blocks(tr)
    with _recording(recorders):
        first, first_texts = generate(questions, first_budget)
        first_texts = [text.strip() for text in first_texts]
        budget_prompts = [f"{q} {a} {word}" for q, a in zip(questions, first_texts, strict=True)]
        if budget:
            second, second_texts = generate(budget_prompts, budget)
            second_texts = [text.strip() for text in second_texts]
            second_lengths, second_reasons = second.lengths, second.stop_reasons
        else:
            second, second_texts = None, [""] * len(prompts)
            second_lengths, second_reasons = [0] * len(prompts), ["skipped"] * len(prompts)
            block_rows.append(None)
        final_prompts = [q + b + answer_prompt for q, b in zip(budget_prompts, second_texts, strict=True)]
        answer, answer_texts = generate(final_prompts, answer_tokens)
    for block in recorders:  # where the word went: after the first pass's tokens, its stop token excluded
        block._released_insertions = [[n - int(why in ("eos", "stop_string"))]
                                      for n, why in zip(first.lengths, first.stop_reasons, strict=True)]
    passes = [first, second, answer]
    timings = {key: sum(p.timings.get(key, 0.0) for p in passes if p is not None)
               for key in ("prefill_s", "decode_s", "total_s", "new_tokens")}
    timings["tokens_per_s"] = timings["new_tokens"] / timings["total_s"] if timings["total_s"] > 0 else float("nan")
    return ReleasedTTTSOutput(
        texts=[text.strip() for text in answer_texts],  # graded: L311 .rstrip(), then L347 .strip()
        token_ids=answer.token_ids, lengths=answer.lengths,
        prompt_lengths=answer.prompt_lengths, stop_reasons=answer.stop_reasons, timings=timings, word=word,
        first_texts=first_texts, extension_texts=second_texts, answer_texts=answer_texts,
        budget_prompts=budget_prompts, final_prompts=final_prompts, first_lengths=first.lengths,
        extension_lengths=list(second_lengths), first_stop_reasons=first.stop_reasons,
        extension_stop_reasons=list(second_reasons), passes=passes, block_rows=block_rows,
    )


def trace_generate(tr: Trace, prompts, max_new_tokens: int = 64, **options) -> GenerationOutput:
    """``tr.generate(prompts, max_new_tokens, **options)``, or the released TTTS passes when a
    ``ThinkingTokenInsertion(joins="released")`` is attached: the entry point of a study runner.

    A runner calls it exactly where it called ``tr.generate``, with the same arguments. With a
    released block attached it returns a :class:`ReleasedTTTSOutput` (a ``GenerationOutput``
    whose ``texts`` are what the release grades; ``records()`` gives each row's three texts,
    token counts and stop reasons) from :func:`released_ttts` with the block's settings: its
    word, ``first_budget`` (None: ``max_new_tokens``), ``budget``, ``answer_prompt`` and
    ``answer_tokens``, no pass longer than ``max_new_tokens`` (a run's cap, e.g. a smoke run's);
    ``options`` go to every pass, and ``stop_strings``, when not given, are
    :data:`RELEASED_STOP_STRINGS`. The block's ``by_row()`` then gives each row's insertion
    index. For the released run, render each problem with :func:`released_prompt` and
    ``chat=False``.

    Raises:
        ValueError: more than one released block is attached.
    """
    found = _released_blocks(tr)
    if not found:
        return tr.generate(prompts, max_new_tokens, **options)
    if len(found) > 1:
        raise ValueError(f"{len(found)} ThinkingTokenInsertion(joins='released') blocks are attached: one run per "
                         "word, so one such block per trace")
    config = found[0].config
    stop_strings = options.pop("stop_strings", RELEASED_STOP_STRINGS)
    first_budget = min(config.first_budget or max_new_tokens, max_new_tokens)  # no pass exceeds max_new_tokens
    return released_ttts(tr, prompts, config.words[0], first_budget, min(config.budget, max_new_tokens),
                         config.answer_prompt, min(config.answer_tokens, max_new_tokens), stop_strings=stop_strings,
                         **options)
