r"""The content of the last ``\boxed{...}`` (or ``\fbox{...}``) in a text, nested braces included.

MATH solutions and many models' completions put the final answer in a box. A regular expression
cannot match balanced braces (``\boxed{\frac{1}{2}}``), so this walks the braces by hand:
escaped braces (``\{`` and ``\}``) do not count, and a box left open (a completion cut off
mid-answer) is passed over for the one before it.

Example:
    >>> from experiments.boxed import last_boxed
    >>> last_boxed(r"First \boxed{3}, then \boxed{\frac{1}{2}}.")
    '\\frac{1}{2}'
    >>> last_boxed(r"\fbox{\{1, 2\}} and no more"), last_boxed("no box here")
    ('\\{1, 2\\}', None)
"""

from __future__ import annotations

import re

__all__ = ["last_boxed"]

_BOX_OPENING = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the ``}`` that closes the group opened just before ``start``, or None if it never closes."""
    depth = 1
    index = start
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2  # an escaped character (\{, \}, \\) opens or closes nothing
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` or ``\\fbox{...}`` in ``text``, stripped.

    Args:
        text: a worked solution or a model's completion.

    Returns:
        What the last closed box holds (its inner braces kept), or None when no box is closed.
    """
    for opening in reversed(list(_BOX_OPENING.finditer(text))):
        end = _closing_brace(text, opening.end())
        if end is not None:
            return text[opening.end() : end].strip()
    return None
