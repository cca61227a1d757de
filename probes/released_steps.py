"""Reasoning steps as the released code makes them: the text re-encoded after generation.

Topology of Reasoning (arXiv 2506.05744, §3 "Reasoning graph"; METHODS.md §3 "What the released
code does"). The authors' code (gouki510/Topology_of_Reasoning, commit 5bd287d,
``src/cluster_steps_generated.py``) does not pool the states of the generation: it re-encodes
each generated text and runs one more forward pass. :func:`released_step_vectors` does the
same (``ReasoningGraph(steps="released")`` calls it after generation); the pieces are
:func:`released_lines`, :func:`released_text` and :func:`released_segments`. What it
reproduces, each checked against the released source (the option that turns it off in brackets):

- lines: ``text.strip().split("\\n")``, each line stripped, kept when longer than ``min_chars``
  (5); a sample with no line left to embed (at most one kept line, the last being dropped) is
  skipped: here it gets no vectors, and the released cycle-detection denominator leaves it out
  (:func:`probes.graph_metrics.cycle_detection_ratio` ``min_steps``);
- re-encoding: ``template(question)`` (:data:`RELEASED_TEMPLATE`) glued to the kept lines but
  the last (``drop_last_step=False``), joined by ``"\\n"``; the tokenizer's default encoding
  (BOS where it adds one), no chat template, truncated at 8,192 tokens (``max_length``);
- segments: a token whose decoded text ends with ``"\\n"`` opens the *next* segment (a
  cumulative sum of the newline mask; so with Qwen2's ``".\\n"`` token a line's final period
  goes to the next step); the segments numbered ``len(question.strip().split("\\n"))`` to the
  last are embedded (at most the last). With its template and a one-line question that puts a
  prompt line first, the same vector for every sample up to float rounding
  (``prompt_line=False``: only the reasoning's tokens). Where the question is its CSV's
  (``src/eval.py`` saves the prompt it generated from, whose own template has a blank line, one
  ``".\\n\\n"`` token in Qwen2), the count comes out even: the question glued to the first line;
- a step vector is the mean of its segment's states at ``hidden_states[int(0.9 L)]``.

Deviations: the states are in the model's dtype (the released run loads the model in float16:
load it so to match) and averaged in float32 (the released code sums in float16, and drops
vectors with a NaN, which float32 means do not produce).

Example:
    >>> lines = released_lines("Add them.\\n3 + 5 = 8.\\nThe answer is: 8.")
    >>> released_text("What is 3 + 5?", lines, template="Q: {question}")
    'Q: What is 3 + 5?Add them.\\n3 + 5 = 8.'
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import Tensor

from probes.fed_tokens import FedTokens
from surgery.capture import states_at
from surgery.decode.trace import untraced

__all__ = [
    "RELEASED_TEMPLATE",
    "TextRecorder",
    "check_released_options",
    "prompt_question",
    "released_lines",
    "released_segments",
    "released_step_vectors",
    "released_text",
]

_PLACEHOLDER = "{question}"

RELEASED_TEMPLATE = (
    "Solve the following math problem efficiently and clearly.\n"
    "The last line of your response should be of the following format: 'The answer is: ANSWER.' (without quotes) "
    "where ANSWER is just the final number or expression that solves the problem.\n"
    "{question}"
)
"""The question template the released code re-encodes with (``GSMK_QUERY_TEMPLATE`` of
``src/cluster_steps_generated.py``, stripped as there; ``{question}`` marks the question). Its
``src/eval.py`` generated with another one (a blank line before the question)."""


def released_lines(text: str, min_chars: int = 5) -> list[str]:
    """The lines of a generated text the released code keeps.

    ``text.strip()`` split at ``"\\n"``; each line stripped and kept when it has more than
    ``min_chars`` characters (released: 5).

    Example:
        >>> released_lines("  Let me see.\\n\\nx = 3\\n  So 3 + 5 = 8.  \\nDone\\n")
        ['Let me see.', 'So 3 + 5 = 8.']
    """
    _check_count("min_chars", min_chars, 0)
    return [line.strip() for line in text.strip().split("\n") if len(line.strip()) > min_chars]


def released_text(question: str, lines: Sequence[str], template: str | None = None, drop_last_step: bool = True) -> str:
    """The text the released code re-encodes: ``template(question) + "\\n".join(lines[:-1])``.

    Args:
        question: the question the template wraps (used as it is, not stripped).
        lines: the kept lines (:func:`released_lines`).
        template: ``{question}`` marks where the question goes; None = :data:`RELEASED_TEMPLATE`.
            Nothing separates it from the first line: the released code glues the question's
            last line to the first reasoning line.
        drop_last_step: leave the last line out, as the released code does (it is never
            embedded); False = join all of them.

    Example:
        >>> released_text("What is 3 + 5?", ["Add them.", "3 + 5 = 8.", "So 8."], template="Q: {question}\\n",
        ...               drop_last_step=False)
        'Q: What is 3 + 5?\\nAdd them.\\n3 + 5 = 8.\\nSo 8.'
    """
    return _fill(template, question) + "\n".join(lines[:-1] if drop_last_step else lines)


def released_segments(
    token_ids: Sequence[int], newline_ids: Collection[int], question_lines: int, first_token: int | None = None
) -> list[list[int]]:
    """Positions of each step of one re-encoded text, by the released rule.

    A token in ``newline_ids`` opens the next segment: a position's segment number is the count
    of such tokens up to it, itself included. The released code embeds the segments numbered
    ``min(question_lines, last)`` to ``last`` (the highest number), each as the mean over its
    positions.

    Args:
        token_ids: the re-encoded text's token ids (BOS included when the tokenizer adds one).
        newline_ids: the ids whose decoded text ends with ``"\\n"``.
        question_lines: ``len(question.strip().split("\\n"))``, where the released code starts.
        first_token: None for the released start (``prompt_line=True``); else the position of the
            first reasoning token: only positions from it on, in the segments they fall in
            (``prompt_line=False``).

    Returns:
        Per embedded segment, its positions in order.

    Example:
        >>> ids = [1, 2, 9, 3, 9, 4, 5, 9, 6, 7]   # 9 ends a line: segments 0 0 1 1 2 2 2 3 3 3
        >>> released_segments(ids, {9}, question_lines=2)
        [[4, 5, 6], [7, 8, 9]]
        >>> released_segments(ids, {9}, question_lines=2, first_token=5)
        [[5, 6], [7, 8, 9]]
    """
    _check_count("question_lines", question_lines, 1)
    numbers, count = [], 0
    for token in token_ids:
        count += int(token) in newline_ids
        numbers.append(count)
    if first_token is not None:
        _check_count("first_token", first_token, 0)
    if not numbers or (first_token is not None and first_token >= len(numbers)):
        return []
    if first_token is None:
        start, keep_from = min(question_lines, numbers[-1]), 0
    else:
        start, keep_from = numbers[first_token], first_token
    segments: list[list[int]] = [[] for _ in range(numbers[-1] - start + 1)]
    for position in range(keep_from, len(numbers)):
        if numbers[position] >= start:
            segments[numbers[position] - start].append(position)
    return [segment for segment in segments if segment]


def released_step_vectors(
    model,
    questions: Sequence[str],
    texts: Sequence[str],
    *,
    site: str | None = None,
    min_chars: int = 5,
    prompt_line: bool = True,
    drop_last_step: bool = True,
    max_length: int | None = 8192,
    template: str | None = None,
) -> list[Tensor]:
    """Step vectors as the released code makes them: re-encode each text, one forward, mean per segment.

    Per row: :func:`released_lines`; :func:`released_text`; the tokenizer's default encoding
    (no chat template) truncated at ``max_length``; one forward pass per row (a batch of one,
    as released) read at ``site`` (:func:`surgery.capture.states_at`: the plain model, which
    the interventions of a trace do not edit); the mean over each of :func:`released_segments`.

    Args:
        model: the wrapped model (the one that generated, or any other).
        questions: per row, the question the template wraps.
        texts: per row, the generated text (e.g. ``out.texts``: special tokens skipped, as the
            released ``src/eval.py`` decodes).
        site: where to read; None = ``resid_pre.{int(0.9 * n_layers)}`` (HF
            ``hidden_states[int(0.9 L)]``, the released ``TARGET_LAYER_RATIO=0.9``).
        min_chars: lines are kept when longer than this, stripped (released: 5).
        prompt_line: True (released): start at segment ``len(question.strip().split("\\n"))``,
            with :data:`RELEASED_TEMPLATE` and a one-line question the template's second line.
            False: only the reasoning's tokens, one vector per re-encoded line (needs a fast
            tokenizer: the first reasoning token is found from character offsets).
        drop_last_step: True (released): the last kept line is not re-encoded. False: it is.
        max_length: truncation of the re-encoded text, in tokens (released: 8192, its
            ``--model_max_length``); None: none.
        template: the question template (``{question}`` once); None = :data:`RELEASED_TEMPLATE`.

    Returns:
        Per row, ``[n_steps, d]`` float32 on the model's device; ``[0, d]`` for a row with no
        line to embed. :func:`probes.graph_metrics.analyse` takes the list as it is.

    Example::

        model = surgery.load()
        text = "Add the apples.\\n3 + 5 = 8.\\nThe answer is: 8."
        rows = released_step_vectors(model, ["Tom has 3 apples and buys 5. How many?"], [text])
        rows[0].shape    # [3, 576]: a prompt line, the question glued to line 1, line 2
    """
    if isinstance(questions, str) or isinstance(texts, str):
        raise ValueError("questions and texts are lists of strings, one per row (wrap a single one in a list)")
    if len(questions) != len(texts):
        raise ValueError(f"{len(questions)} questions for {len(texts)} texts: give one question per text")
    check_released_options(prompt_line, drop_last_step, max_length, template)
    _check_count("min_chars", min_chars, 0)
    resolved = model.resolve_site(site if site is not None else f"resid_pre.{int(0.9 * model.n_layers)}")
    if resolved.kind == "logits":
        raise ValueError("released_step_vectors pools hidden states: pick a resid/attn/mlp site, not 'logits'")
    tokenizer = model.tokenizer
    if not prompt_line and not getattr(tokenizer, "is_fast", False):
        raise ValueError("prompt_line=False finds the first reasoning token from character offsets: it needs a fast "
                         "tokenizer (transformers' PreTrainedTokenizerFast); use prompt_line=True with this one")
    newline_ids = {i for i, piece in enumerate(model.vocabulary_texts) if piece.endswith("\n")}
    empty = torch.zeros(0, model.site_width(resolved), device=model.device)
    rows = []
    for question, text in zip(questions, texts):
        lines = released_lines(text, min_chars)
        if not (lines[:-1] if drop_last_step else lines):
            rows.append(empty.clone())
            continue
        encoded = tokenizer(released_text(question, lines, template, drop_last_step), truncation=max_length is not None,
                            max_length=max_length, return_offsets_mapping=not prompt_line)
        ids = list(encoded["input_ids"])
        first = None if prompt_line else _first_token_after(encoded["offset_mapping"], len(_fill(template, question)))
        segments = released_segments(ids, newline_ids, len(question.strip().split("\n")), first)
        if not segments:
            rows.append(empty.clone())
            continue
        with untraced(model):  # also mid-run (a row read as it retires): no block sees this forward
            states = states_at(model, resolved, [ids], [[p for segment in segments for p in segment]]).float()
        rows.append(torch.stack([chunk.mean(0) for chunk in states.split([len(s) for s in segments])]))
    return rows


def check_released_options(prompt_line, drop_last_step, max_length, template, questions=None) -> None:
    """Raise ValueError, saying what is expected, for a bad option of :func:`released_step_vectors`
    (or a bad ``questions`` list of ``ReasoningGraph(steps="released")``)."""
    if questions is not None and (isinstance(questions, str) or not all(isinstance(q, str) for q in questions)):
        raise ValueError(f"questions is a list of strings, one per row, got {questions!r}")
    for name, value in (("prompt_line", prompt_line), ("drop_last_step", drop_last_step)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} is True or False, got {value!r}")
    if max_length is not None:
        _check_count("max_length", max_length, 1)
    if template is not None and (not isinstance(template, str) or template.count(_PLACEHOLDER) != 1):
        raise ValueError(
            f"template must be a string with {_PLACEHOLDER!r} exactly once (where the question goes), got "
            f"{template!r}: e.g. 'Question: {{question}}\\n' (None = the released RELEASED_TEMPLATE)"
        )


def prompt_question(tokenizer, prompt_ids: Sequence[int]) -> str:
    """The question in a prompt: its user turn if chat-templated, else its text.

    When the decoded prompt is the tokenizer's chat template around one user turn (as
    ``generate(..., chat=True)`` makes it), the user turn's text; otherwise the decoded prompt,
    special tokens skipped (so a BOS the tokenizer added goes). (The released ``src/eval.py``
    saved as the question the very prompt it generated from, its template included, without a
    chat template; the embedding script wraps that in :data:`RELEASED_TEMPLATE` again.)

    Raises:
        ValueError: the prompt holds the chat template's turn markers (``<|im_start|>``,
            ``<｜User｜>``...) but is not one user turn (a system prompt, several turns): give
            the questions explicitly then.
    """
    text = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    if getattr(tokenizer, "chat_template", None):
        marker = "\u2063QUESTION\u2063"  # invisible separators: in no real prompt
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                                 add_generation_prompt=True)
        if rendered.count(marker) == 1:
            before, after = rendered.split(marker)
            plain = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token}
            markers = [t for t in tokenizer.get_added_vocab() if t and t not in plain and t in before + after]
            one_turn = text.startswith(before) and text.endswith(after) and len(text) >= len(before) + len(after)
            question = text[len(before) : len(text) - len(after)] if one_turn else text
            found = [m for m in markers if m in question]
            if one_turn and not found:
                return question
            if found:
                raise ValueError(
                    f"a prompt holds the chat template's markers ({', '.join(found)}) but is not one user turn in it "
                    "(a system prompt, several turns?): give the questions explicitly, "
                    "ReasoningGraph(steps='released', questions=[...])"
                )
    return tokenizer.decode(prompt_ids, skip_special_tokens=True)


class TextRecorder(FedTokens):
    """The prompt's and the fed tokens' ids of one run, per row, kept on the device (no host sync).

    What ``ReasoningGraph(steps="released")`` keeps while decoding (a
    :class:`~probes.fed_tokens.FedTokens`, which follows rows through their slots under
    continuous batching). :meth:`inputs` gives back the questions (:func:`prompt_question`,
    unless given) and the generated texts: the fed tokens decoded with special tokens skipped,
    i.e. ``out.texts`` without each row's last token, which is never fed back (an EOS, which the
    text skips anyway, or the token that hit ``max_new_tokens``). For the exact released input,
    call :func:`released_step_vectors` on ``out.texts``.
    """

    def __init__(self, questions: Sequence[str] | None = None):
        self.questions = None if questions is None else list(questions)
        super().__init__()

    def reset(self, batch_size: int) -> None:
        """Forget the last run; ``batch_size`` rows run at once (slots under continuous batching, so
        the run may have more rows: :meth:`inputs` checks the number of questions exactly)."""
        if self.questions is not None and len(self.questions) < batch_size:
            raise ValueError(f"ReasoningGraph was given {len(self.questions)} questions for {batch_size} rows at "
                             "once: give one question per prompt")
        super().reset(batch_size)

    def inputs(self, tokenizer, rows: Sequence[int] | None = None) -> tuple[list[str], list[str]]:
        """``(questions, texts)`` of the last run, one per row.

        Args:
            tokenizer: the model's tokenizer (decodes the fed tokens, and the prompts).
            rows: prompt indices (default: every row of the last run); under continuous
                batching a row is readable as soon as it has retired, before the run ends.
        """
        found = self.rows(rows)
        if not found and rows is None:
            raise RuntimeError("ReasoningGraph has not run: attach it to a trace and generate first")
        if self.questions is not None:
            if rows is None and len(self.questions) != len(found):
                raise ValueError(f"ReasoningGraph was given {len(self.questions)} questions for a run of {len(found)} "
                                 "rows: give one question per prompt")
            beyond = [row for row in rows or () if not 0 <= row < len(self.questions)]
            if beyond:
                raise ValueError(f"ReasoningGraph was given {len(self.questions)} questions, none for row {beyond[0]}: "
                                 "give one question per prompt")
        texts = tokenizer.batch_decode([generated or [] for _, generated in found], skip_special_tokens=True)
        if self.questions is not None:
            return [self.questions[row] for row in (range(len(found)) if rows is None else rows)], texts
        return [prompt_question(tokenizer, prompt) for prompt, _ in found], texts


def _fill(template: str | None, question: str) -> str:
    return (RELEASED_TEMPLATE if template is None else template).replace(_PLACEHOLDER, question)


def _first_token_after(offsets, characters: int) -> int:
    """The first token holding a character at or after ``characters`` (a special token, with an
    empty span, holds none); the number of tokens when there is none (truncated away)."""
    return next((i for i, (start, end) in enumerate(offsets) if start < end and end > characters), len(offsets))


def _check_count(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
