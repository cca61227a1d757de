"""SEAL's thoughts: splitting a reasoning trace at blank lines and labelling each piece by keywords.

SEAL (Chen et al., "SEAL: Steerable Reasoning Calibration of Large Language Models for Free",
arXiv 2504.07986, "Thoughts" and "Thought classes" as summarised in METHODS.md section 1) cuts
the reasoning span of a trace into *thoughts* at the separators "\\n\\n" and sorts each thought
into one of three classes by keyword rules: reflection ("Wait, let me check ..."), transition
("Alternatively, ...") and execution (everything else). The steering vector is the mean state
at execution separators minus the mean state at reflection and transition separators. This
module does the text side only: no model, no tokenizer, pure Python.

Rules:
    * The reasoning span is the text after the first ``<think>`` up to the first ``</think>``
      after it, or to the end of the text when that ``</think>`` is missing. A second
      ``<think>`` inside the span is plain text.
    * With no ``<think>`` at all (models without think tokens, e.g. SmolLM2, or a completion
      whose ``<think>`` sat in the prompt), the span starts at the beginning of the text; it
      still ends at the first ``</think>`` if there is one, so the answer after it is not cut
      into thoughts.
    * A separator is a maximal run of two or more newlines inside the span. Thought j is the
      text after separator j up to separator j+1 (or to the end of the span). Text before the
      first separator is not a thought; a thought that is empty once stripped is skipped.
    * Classes, checked in this order on the thought lower-cased and stripped: ``reflection``
      (starts with one of :data:`REFLECTION_PREFIXES` or contains one of
      :data:`REFLECTION_KEYWORDS`), ``transition`` (same with the ``TRANSITION_`` tuples),
      else ``execution``. Prefixes are plain string prefixes: "waiting" starts with "wait".

Deviations:
    * The released SEAL code misspells "think differently", so that keyword never matches
      there; here it is spelled correctly and does match.
    * SEAL finds separators token by token (any token whose text holds "\\n\\n"). On text,
      "\\n\\n\\n" holds two overlapping "\\n\\n"; here a maximal run of newlines counts as ONE
      separator, which begins where the run begins (:attr:`Thought.separator_start`).

Example:
    >>> trace = "<think>Okay.\\n\\nWait, 2 + 2 = 4?\\n\\nSo 4.\\n\\n\\nAlternatively, count.</think>\\n\\n4"
    >>> [(t.index, t.label) for t in split_thoughts(trace)]
    [(0, 'reflection'), (1, 'execution'), (2, 'transition')]
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

import torch

from surgery.think_tags import THINK_CLOSE, THINK_OPEN

__all__ = [
    "EMPTY_THOUGHTS",
    "REFLECTION_KEYWORDS",
    "REFLECTION_PREFIXES",
    "THOUGHT_CLASSES",
    "TRANSITION_KEYWORDS",
    "TRANSITION_PREFIXES",
    "Thought",
    "classify_thought",
    "completion_prefix",
    "split_thoughts",
    "thought_positions",
    "thought_states",
    "trigger_positions",
]

THOUGHT_CLASSES = ("execution", "reflection", "transition")
"""The three labels :func:`classify_thought` returns, sorted."""

REFLECTION_PREFIXES = ("wait",)
"""A thought starting with one of these (lower-cased, stripped) is a reflection."""

REFLECTION_KEYWORDS = (
    "verify",
    "make sure",
    "hold on",
    "think again",
    "'s correct",
    "'s incorrect",
    "let me check",
    "seems right",
)
"""A thought containing one of these (lower-cased) is a reflection."""

TRANSITION_PREFIXES = ("alternatively",)
"""A thought starting with one of these (lower-cased, stripped) is a transition, unless a reflection."""

TRANSITION_KEYWORDS = (
    "think differently",
    "another way",
    "another approach",
    "another method",
    "another solution",
    "another strategy",
    "another technique",
)
"""A thought containing one of these (lower-cased) is a transition, unless a reflection.

"think differently" is misspelled in the released SEAL code and never matches there.
"""

_SEPARATOR = re.compile(r"\n{2,}")


def classify_thought(text: str) -> str:
    """SEAL's class of one thought, by keywords (see the module docstring).

    Reflection is checked before transition, so a thought with keywords of both is a
    reflection; a thought with neither (an empty one included) is an execution.

    Args:
        text: the thought's text; case and surrounding whitespace do not matter.

    Returns:
        One of :data:`THOUGHT_CLASSES`: ``"reflection"``, ``"transition"`` or ``"execution"``.

    Example:
        >>> classify_thought("  WAIT, that is off by one.")
        'reflection'
        >>> classify_thought("Let's try another approach: let me check the base case.")
        'reflection'
        >>> classify_thought("Alternatively, use the formula.")
        'transition'
        >>> classify_thought("So 3 + 5 = 8.")
        'execution'
    """
    lowered = text.lower().strip()
    if lowered.startswith(REFLECTION_PREFIXES) or any(k in lowered for k in REFLECTION_KEYWORDS):
        return "reflection"
    if lowered.startswith(TRANSITION_PREFIXES) or any(k in lowered for k in TRANSITION_KEYWORDS):
        return "transition"
    return "execution"


@dataclass(frozen=True)
class Thought:
    """One labelled thought of a trace, with its place in the original text.

    Attributes:
        index: position among the thoughts :func:`split_thoughts` returned (0, 1, 2, ...;
            skipped empty thoughts take no index).
        label: its class, one of :data:`THOUGHT_CLASSES`.
        text: the thought as it stands in the trace, not stripped: ``trace[start:end]``.
        start: offset in the original text of the thought's first character (just after its
            opening separator run).
        end: offset just past its last character (where the next separator run, the
            ``</think>`` or the end of the text begins).
        separator_start: offset where the newline run that opens the thought begins: the
            "\\n\\n" whose state SEAL takes as the thought's representative.
    """

    index: int
    label: str
    text: str
    start: int
    end: int
    separator_start: int


def _reasoning_span(text: str) -> tuple[int, int]:
    """``(begin, end)`` offsets of the reasoning span in ``text`` (see the module docstring)."""
    opened = text.find(THINK_OPEN)
    begin = 0 if opened < 0 else opened + len(THINK_OPEN)
    closed = text.find(THINK_CLOSE, begin)
    return begin, len(text) if closed < 0 else closed


def split_thoughts(text: str) -> list[Thought]:
    """Cut the reasoning span of a trace into SEAL thoughts and label each one.

    The span runs from just after the first ``<think>`` (or from the beginning when there is
    none, e.g. SmolLM2, which has no think tokens) to the first ``</think>`` after that (or to
    the end). Each maximal run of two or more newlines inside the span opens a thought that
    ends where the next run (or the span) ends. Text before the first run is not a thought;
    thoughts that are blank once stripped are skipped.

    Args:
        text: a whole trace (prompt and completion, or completion alone).

    Returns:
        The non-empty thoughts in order, with offsets into ``text`` itself (not into the span);
        empty when the span holds no separator.

    Example:
        >>> trace = "<think>Let me see.\\n\\nFirst 7 * 8 = 56.\\n\\nWait, is that right?</think>\\n\\nDone."
        >>> for thought in split_thoughts(trace):
        ...     print(thought.index, thought.label, repr(thought.text), thought.separator_start)
        0 execution 'First 7 * 8 = 56.' 18
        1 reflection 'Wait, is that right?' 37
        >>> split_thoughts("No blank line here.")
        []
    """
    begin, end = _reasoning_span(text)
    runs = list(_SEPARATOR.finditer(text, begin, end))
    thoughts: list[Thought] = []
    for j, run in enumerate(runs):
        start = run.end()
        stop = runs[j + 1].start() if j + 1 < len(runs) else end
        body = text[start:stop]
        if not body.strip():
            continue
        thoughts.append(
            Thought(
                index=len(thoughts),
                label=classify_thought(body),
                text=body,
                start=start,
                end=stop,
                separator_start=run.start(),
            )
        )
    return thoughts


def completion_prefix(model, prompt_ids: list[int]) -> str:
    """``"<think>"`` when the prompt ends inside a think span (the last of ``<think>`` /
    ``</think>`` in it decides), else ``""``: how a completion after that prompt is read."""
    open_id, close_id = model.think_token_ids
    inside = False
    for token in prompt_ids:
        inside = True if token == open_id else False if token == close_id else inside
    return THINK_OPEN if open_id is not None and inside else ""


EMPTY_THOUGHTS = ("skip", "execution")
"""What extraction does with an empty thought (a separator right after a separator): ``"skip"``
(the paper's text: no thought is empty) or ``"execution"`` (the released SEAL code counts it as
an "other", i.e. execution, thought)."""


def trigger_positions(model, prompt_ids: list[int], completion_ids: list[int], when) -> list[int]:
    """Where ``when`` fired while ``completion_ids`` were generated after ``prompt_ids``.

    The trace is replayed as the steps that made it (:meth:`surgery.step.Step.replay`: the
    prefill, then one decode step per completion token), so the answer is the decode-time one:
    the same vocabulary masks, think flags, text automata and step windows. Positions count
    prompt and completion together (0 is the first prompt token).

    Raises:
        ValueError: the trigger reads a probe's live signal (:class:`~surgery.signals.OnSignal`),
            which a finished trace cannot replay.
    """
    from surgery.step import Step
    from surgery.text_match import text_matchers

    if when.signal_triggers():
        raise ValueError("a trigger that reads a probe's signal (OnSignal) cannot be replayed over a finished trace: "
                         "pass the trigger without it (e.g. seal_trigger_for(model))")
    when.bind(model)
    device = model.device
    step = Step.replay(torch.tensor(prompt_ids, dtype=torch.long, device=device),
                       torch.tensor(completion_ids, dtype=torch.long, device=device),
                       model.think_token_ids, text_matchers(model, when.text_patterns()))
    return when(step)[0].nonzero().flatten().tolist()


def thought_positions(
    model, prompt_ids: list[int], completion_ids: list[int], when=None, empty_thoughts: str = "skip"
) -> list[tuple[int, str]]:
    """``(position, label)`` of each SEAL thought of a completion, positions in prompt + completion.

    Two rules for where a thought opens:

    - ``when`` given (a trigger, e.g. the steering vector's own): at every position where that
      trigger fires when the trace is replayed (:func:`trigger_positions`). This is what
      :meth:`interventions.SteeringVector.from_thoughts` uses, so the states a vector is built
      from are read exactly where that vector is added while decoding, on every tokenizer
      (one "\\n\\n" token, two "\\n" tokens, a blank line that begins in the prompt).
      Thought ``j`` is the text after separator ``j`` up to the next separator (cut at
      ``</think>``); ``empty_thoughts`` (:data:`EMPTY_THOUGHTS`) says what an empty one is.
    - ``when=None``: the text rule of :func:`split_thoughts` on the completion: the token that
      completes each maximal newline run's second "\\n" (empty thoughts skipped). When the
      prompt ends inside ``<think>`` (a reasoning chat template), the completion is read as
      inside the think span.

    The text is rebuilt from the tokens' own texts, so character offsets map onto tokens exactly.
    """
    if empty_thoughts not in EMPTY_THOUGHTS:
        raise ValueError(f"empty_thoughts must be one of {EMPTY_THOUGHTS}, got {empty_thoughts!r}")
    texts = model.vocabulary_texts
    if when is not None:
        row = list(prompt_ids) + list(completion_ids)
        separators = trigger_positions(model, list(prompt_ids), list(completion_ids), when)
        positions = []
        for j, separator in enumerate(separators):
            stop = separators[j + 1] if j + 1 < len(separators) else len(row)
            opening = texts[row[separator]].rsplit("\n", 1)[-1]  # what the separator token holds after its newlines
            body = (opening + "".join(texts[t] for t in row[separator + 1 : stop])).split(THINK_CLOSE)[0]
            if body.strip():
                positions.append((separator, classify_thought(body)))
            elif empty_thoughts == "execution":
                positions.append((separator, "execution"))
        return positions
    prefix = completion_prefix(model, prompt_ids)
    ends, total = [], len(prefix)
    for token in completion_ids:
        total += len(texts[token])
        ends.append(total)  # ends[i]: offset just past token i
    text = prefix + "".join(texts[t] for t in completion_ids)
    positions = []
    for thought in split_thoughts(text):
        second_newline = thought.separator_start + 1
        token = bisect.bisect_right(ends, second_newline)
        positions.append((len(prompt_ids) + token, thought.label))
    return positions


def thought_states(model, traces, site, *, chat: bool = False, batch_size: int = 8, progress: bool | None = None,
                   when=None, empty_thoughts: str = "skip"):
    """Every thought of ``traces`` with its state: ``(states [n, d_model], labels)``.

    Each ``(prompt, completion)`` trace (completion as text or as the generated token ids) is
    cut into thoughts (:func:`thought_positions`), and ``site``'s value is read at each
    thought's opening separator by one forward pass over prompt + completion
    (:func:`surgery.capture.states_at`), ``batch_size`` traces at a time. What SEAL's vector
    averages and what a linear thought probe is fit on.

    Args:
        model: the wrapped model.
        traces: ``(prompt, completion)`` pairs.
        site: a site (``"resid_pre.20"`` or a resolved :class:`~surgery.sites.Site`).
        chat: wrap prompts in the chat template (as they were when the traces were made).
        batch_size: traces per forward pass.
        progress: a progress bar (default: when there are several batches).
        when: read the states where this trigger fires on each trace (:func:`thought_positions`);
            None: the text rule of :func:`split_thoughts`.
        empty_thoughts: ``"skip"`` or ``"execution"`` (:data:`EMPTY_THOUGHTS`; with ``when`` only).

    Returns:
        States in the model's dtype, on its device, and one label per state
        (:data:`THOUGHT_CLASSES`).
    """
    from tqdm.auto import tqdm

    from surgery.capture import states_at
    from surgery.prompts import encode_prompts

    traces = list(traces)
    resolved = model.resolve_site(site)
    batches = range(0, len(traces), batch_size)
    show = len(batches) > 1 if progress is None else progress
    states, labels = [], []
    for start in tqdm(batches, desc="reading thought states", disable=not show, leave=False):
        rows, positions = [], []
        for prompt, completion in traces[start : start + batch_size]:
            prompt_ids, attention = encode_prompts(model, [prompt], chat=chat)
            prompt_row = prompt_ids[0][attention[0].bool()].tolist()
            completion_row = (model.tokenizer(completion, add_special_tokens=False)["input_ids"]
                              if isinstance(completion, str) else [int(token) for token in completion])
            found = thought_positions(model, prompt_row, completion_row, when, empty_thoughts)
            rows.append(prompt_row + completion_row)
            positions.append([p for p, _ in found])
            labels.extend(label for _, label in found)
        states.append(states_at(model, resolved, rows, positions))
    if not states:
        return torch.zeros(0, model.d_model, dtype=model.dtype, device=model.device), labels
    return torch.cat(states), labels
