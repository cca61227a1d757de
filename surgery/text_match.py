"""Matching a string in the generated text as it streams, token by token, on the device.

Tokenizers split the same text in different ways: SmolLM2 writes a blank line as two "\\n"
tokens, R1-Distill-Qwen as one ".\\n\\n" token. :class:`TextMatcher` finds where a string ends
in the text whatever the split. It is the Knuth-Morris-Pratt automaton of the string, run over
whole tokens: ``next_state[s, v]`` is the automaton's state after reading token ``v``'s text
from state ``s``, and ``hit[s, v]`` says whether an occurrence ended inside that token. Both
tables are built once per (model, string); while decoding, advancing every row is one gather.
Occurrences may overlap ("\\n\\n\\n" holds two "\\n\\n").

Example:
    >>> import torch
    >>> matcher = TextMatcher("\\n\\n", ["a", "\\n", ".\\n\\n"], device="cpu")
    >>> states, hits = matcher.scan(torch.zeros(1, dtype=torch.long), torch.tensor([[1, 1, 0, 2]]),
    ...                            torch.ones(1, 4, dtype=torch.bool))
    >>> hits.tolist()
    [[False, True, False, True]]
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Int
from torch import Tensor

__all__ = ["TextKey", "TextMatcher", "text_key", "text_matchers"]

TextKey = tuple[str, bool]
"""A tracked string and whether it is matched with case: ``("\\n\\n", True)``."""


def text_key(pattern: str | TextKey) -> TextKey:
    """Normalise a tracked string to its key: a bare string is matched with case."""
    return (pattern, True) if isinstance(pattern, str) else (pattern[0], bool(pattern[1]))


def text_matchers(model, patterns) -> dict[TextKey, TextMatcher]:
    """The model's matcher of each tracked string in ``patterns`` (strings or keys), once per key.

    What every decode loop builds before its prefill (the engine's, and the nnsight adapter's).
    """
    keys = dict.fromkeys(text_key(p) for p in patterns)
    return {key: model.text_matcher(*key) for key in keys}


def _failure(pattern: str) -> list[int]:
    """KMP failure function: longest proper prefix of pattern[:i+1] that is also its suffix."""
    fail = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return fail


class TextMatcher:
    """The token-level automaton of one string over one vocabulary (see the module docstring).

    Args:
        pattern: the string to find (non-empty).
        texts: the decoded text of every token id.
        device: where the tables live.
        case_sensitive: False matches the lower-cased pattern in lower-cased text.
    """

    def __init__(self, pattern: str, texts: list[str], device: str | torch.device, case_sensitive: bool = True):
        if not pattern:
            raise ValueError("TextMatcher needs a non-empty string")
        if not case_sensitive:
            pattern, texts = pattern.lower(), [text.lower() for text in texts]
        self.pattern = pattern
        fail = _failure(pattern)
        n_states, vocabulary = len(pattern), len(texts)
        next_state = torch.zeros(n_states, vocabulary, dtype=torch.long)
        hit = torch.zeros(n_states, vocabulary, dtype=torch.bool)
        alphabet = set(pattern)
        for token, text in enumerate(texts):
            if not text:
                next_state[:, token] = torch.arange(n_states)  # reading nothing changes nothing
                continue
            if alphabet.isdisjoint(text):
                continue  # a character outside the pattern sends every state back to 0
            for start in range(n_states):
                state, fired = start, False
                for char in text:
                    while state and pattern[state] != char:
                        state = fail[state - 1]
                    if pattern[state] == char:
                        state += 1
                    if state == n_states:
                        fired, state = True, fail[state - 1]
                next_state[start, token] = state
                hit[start, token] = fired
        self.next_state = next_state.to(device)
        self.hit = hit.to(device)

    def completions(self, state: Int[Tensor, "*shape"]) -> Bool[Tensor, "*shape vocab"]:
        """For each state (e.g. per row and position), the tokens that would complete an
        occurrence if read next."""
        return self.hit[state]

    def initial(self, batch: int) -> Int[Tensor, " batch"]:
        """The state of rows that have read nothing yet."""
        return torch.zeros(batch, dtype=torch.long, device=self.next_state.device)

    def scan(
        self, state: Int[Tensor, " batch"], token_ids: Int[Tensor, "batch pos"], valid: Bool[Tensor, "batch pos"]
    ) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
        """Read ``token_ids`` left to right from ``state``; invalid positions are skipped.

        Returns, per position, the state after reading it and whether an occurrence of the
        string ended in that token. One gather per position, vectorised over rows.
        """
        hits = torch.zeros_like(valid)
        states = torch.zeros_like(token_ids)
        for column in range(token_ids.shape[1]):
            tokens, ok = token_ids[:, column], valid[:, column]
            hits[:, column] = self.hit[state, tokens] & ok
            state = torch.where(ok, self.next_state[state, tokens], state)
            states[:, column] = state
        return states, hits
