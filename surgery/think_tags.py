"""The tags around a reasoning span: ``<think>`` opens it, ``</think>`` closes it.

The one definition, in a module of its own so that the model (which looks up their token ids,
:attr:`surgery.model.Model.think_token_ids`) and SEAL's thoughts (:mod:`surgery.thoughts`,
which split a text at them) both read it without importing each other.

Example:
    >>> text = "<think>2 + 2 = 4</think>4"
    >>> text[text.find(THINK_OPEN) + len(THINK_OPEN) : text.find(THINK_CLOSE)]
    '2 + 2 = 4'
"""

from __future__ import annotations

__all__ = ["THINK_CLOSE", "THINK_OPEN"]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
