r"""Grading a completion against a reference answer with math-verify, not hand-written regexes.

:func:`grade` finds the model's final answer, in this order of preference:

1. the last ``\boxed{...}`` (or ``\fbox{...}``), read as LaTeX (:func:`~experiments.boxed.last_boxed`);
2. the rest of the line after the last ``####`` (GSM8K's own marker);
3. an answer phrase ("the final answer is ...", "answer: ...") found by math-verify's anchored patterns;
4. the last number or expression in the text (math-verify's unanchored patterns).

Both sides are parsed by ``math_verify.parse`` into SymPy and compared by ``math_verify.verify``,
so ``1,000`` equals ``1000``, ``$18`` and ``18 cm`` equal ``18``, ``\frac{1}{2}`` equals ``0.5``.
The reference is read as the content of a box (``\boxed{<reference>}``), which suits GSM8K's
numbers and MATH's LaTeX alike. Plain words after a number at the end of a box
(``\boxed{18 dollars}``) are read as units, as ``\text{ dollars}`` would be; an answer that is
no number or expression (``\boxed{???}``) is compared as text, and the reason says so.
math-verify's answer phrases read past an ``=`` on the same line ("answer: x = 5" gives 5), so
"The answer is 18. Check: 3 + 4 = 7" gives 7; a box or ``####`` avoids that.

math-verify bounds each parse and comparison with ``signal.alarm``, which works only in the
main thread. :func:`grade` passes a 5 s limit there and ``None`` (no limit) in any other thread
(a thread pool, a threaded Ray actor), where math-verify would otherwise raise; math-verify
logs once that the limit is off. Off the main thread a pathological answer (a huge power tower)
is therefore not cut short: the caller's own time limit is the guard there.

Example:
    >>> from experiments.grading import grade
    >>> grade(r"So she makes 9 * 2 = 18 dollars. \boxed{18}", "18").correct
    True
    >>> g = grade("The answer is 0.5", r"\frac{1}{2}")
    >>> g.correct, g.predicted, g.reason
    (True, '0.5', "'0.5' (from an answer phrase) equals the reference '\\\\frac{1}{2}'")
    >>> grade("I do not know.", "7").predicted is None
    True
"""

from __future__ import annotations

import re
import threading
from dataclasses import asdict, dataclass

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from experiments.boxed import last_boxed

__all__ = ["Grade", "extract_answer", "grade"]

_TIMEOUT_S = 5  # math-verify's default, per parse and per comparison (main thread only)
_LATEX_AND_EXPRESSIONS = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
_ANSWER_PHRASES = (
    LatexExtractionConfig(try_extract_without_anchor=False, boxed_match_priority=-1),
    ExprExtractionConfig(try_extract_without_anchor=False),
)
_ANYWHERE = (LatexExtractionConfig(boxed_match_priority=-1), ExprExtractionConfig())
# plain words after a number at the end of a box (\boxed{18 dollars}), read as \text{} units; single
# letters stay (\boxed{2 x} is a product)
_WORDS_AFTER_A_NUMBER = re.compile(r"(?<=\d)(\s+[A-Za-z]{2,}(?:\s+[A-Za-z]+)*)\s*$")
_NO_ANSWER = "no answer found: no \\boxed{}, no '####', no answer phrase and no number in the completion"


@dataclass(frozen=True)
class Grade:
    """How one completion fared against its reference.

    Attributes:
        correct: whether the predicted answer equals the reference (math-verify's ``verify``).
        predicted: the model's final answer as found in the completion, or None if it gave none.
        reference: the reference answer, as given.
        reason: where the answer came from and why it counts as right or wrong, for people.
    """

    correct: bool
    predicted: str | None
    reference: str
    reason: str

    def to_dict(self) -> dict:
        """The four fields as a JSON-ready dict (``Grade(**d)`` reads it back)."""
        return asdict(self)


def _timeout_s() -> int | None:
    """The limit math-verify may enforce here: signal.alarm exists only in the main thread."""
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse(text: str, configs: tuple) -> list:
    return parse(text, extraction_config=list(configs), parsing_timeout=_timeout_s())


def _read(completion: str) -> tuple[list, str | None, str]:
    """math-verify's parse of the final answer, the answer as text, and where it was found."""
    boxed = last_boxed(completion)
    if boxed:
        latex = _WORDS_AFTER_A_NUMBER.sub(r"\\text{\1}", boxed)  # 18 dollars: LaTeX would multiply the letters
        return _parse(f"\\boxed{{{latex}}}", _LATEX_AND_EXPRESSIONS), boxed, "the last \\boxed{}"
    _, marker, after = completion.rpartition("####")
    if marker and after.strip():
        parsed, where = _parse(after.strip().splitlines()[0], _LATEX_AND_EXPRESSIONS), "the line after '####'"
    elif phrase := _parse(completion, _ANSWER_PHRASES):
        parsed, where = phrase, "an answer phrase"
    else:
        parsed, where = _parse(completion, _ANYWHERE), "the last number in the text"
    # math-verify puts the matched text after the parsed values (its first_match fallback)
    return parsed, parsed[-1] if parsed and isinstance(parsed[-1], str) else None, where


def extract_answer(completion: str) -> tuple[str | None, str]:
    r"""The model's final answer as text, and where it was found (see the module for the order).

    Args:
        completion: the model's output.

    Returns:
        ``(answer, where)``; ``answer`` is None when the completion holds no answer at all.

    Example:
        >>> extract_answer(r"I get \boxed{\frac{1}{2}}")
        ('\\frac{1}{2}', 'the last \\boxed{}')
    """
    _, answer, where = _read(completion)
    return answer, where


def grade(completion: str, reference: str) -> Grade:
    """Grade a completion against the reference answer.

    Args:
        completion: the model's output (the whole text; the final answer is found in it).
        reference: the reference final answer, e.g. ``Problem.answer`` (``"72"``, ``"\\frac{1}{2}"``).

    Returns:
        A :class:`Grade`; ``predicted`` is None and ``correct`` False when no answer is found.
        Works in any thread (see the module on time limits).
    """
    parsed, predicted, where = _read(completion)
    if predicted is None:
        return Grade(correct=False, predicted=None, reference=reference, reason=_NO_ANSWER)
    gold = _parse(f"\\boxed{{{reference}}}", _LATEX_AND_EXPRESSIONS)
    correct = bool(parsed) and verify(gold, parsed, timeout_seconds=_timeout_s())
    # only the matched text came back: no number or expression, so verify compares the text
    source = where if any(not isinstance(value, str) for value in parsed) else f"{where}; read as text only"
    verdict = "equals" if correct else "differs from"
    return Grade(correct, predicted, reference, f"{predicted!r} (from {source}) {verdict} the reference {reference!r}")
