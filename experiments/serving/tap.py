"""The server's own block in every wave: streams each row's text and ends rows early.

:class:`ServerTap` is attached last to every wave's trace and carried by every row, so it sees
each token the moment the engine is about to emit it, after every request's own blocks acted
(token masks, inserted thinking words). Per row (a :class:`RowText`) it

- appends the token and hands the new text to the request's stream (server-sent events);
- stops the row on the token that completes one of the request's ``stop`` strings (each request
  has its own; the engine's ``stop_strings`` are one list per run), the same token on which
  ``surgery.generate(..., stop_strings=...)`` stops it;
- stops the row when its client has gone, so its slot takes the next waiting row.

It reads tokens on the host only while some live row streams or has stop strings: a wave of
plain non-streaming requests runs without a device sync per step.

Example:
    >>> class Letters:  # a tokenizer whose tokens are characters
    ...     def decode(self, ids, skip_special_tokens=True):
    ...         return "".join(map(chr, ids))
    >>> pieces = []
    >>> row = RowText(Letters(), stops=("\\n",), stream=True, on_text=pieces.append)
    >>> [row.add(ord(c)) for c in "Hi!\\n"], row.text, pieces
    ([False, False, False, True], 'Hi!', ['H', 'i', '!'])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from surgery.blocks import Intervention
from surgery.token_choice import TokenChoice

__all__ = ["RowText", "ServerTap"]


class RowText:
    """One row's text as its tokens arrive: what may be streamed yet, and whether a stop string came.

    Args:
        tokenizer: the model's tokenizer.
        stops: the request's stop strings.
        stream: whether the client reads the text as it grows.
        on_text: called with each new piece of streamable text.
        cancelled: returns True once the client has gone.
    """

    def __init__(self, tokenizer, stops: Sequence[str] = (), stream: bool = False,
                 on_text: Callable[[str], None] | None = None, cancelled: Callable[[], bool] = lambda: False):
        self.tokenizer, self.stops, self.stream = tokenizer, tuple(stops), stream
        self.on_text, self.cancelled = on_text, cancelled
        self.tokens: list[int] = []
        self.sent = 0  # characters of the text handed to on_text so far
        self.stopped = False  # a stop string appeared

    @property
    def watched(self) -> bool:
        """Whether the tap must read this row's tokens every step."""
        return self.stream or bool(self.stops)

    @property
    def text(self) -> str:
        """The text so far, cut before the first stop string."""
        return cut_at_stop(self.tokenizer.decode(self.tokens, skip_special_tokens=True), self.stops)

    def add(self, token: int) -> bool:
        """Take the row's next token; True when a stop string now appears (the row must stop)."""
        self.tokens.append(token)
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        text = cut_at_stop(full, self.stops)
        self.stopped = len(text) < len(full)
        if self.stream and self.on_text is not None:
            # hold back what could still become a stop string, and a half-decoded character
            hold = 0 if self.stopped else max((len(s) - 1 for s in self.stops), default=0)
            end = max(self.sent, len(text) - hold)
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
            if end > self.sent:
                self.on_text(text[self.sent : end])
                self.sent = end
        return self.stopped


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string in it.

    Example:
        >>> cut_at_stop("12\\n\\nQ: next", ["Q:", "\\n\\n"])
        '12'
    """
    found = [text.find(s) for s in stops if s in text]
    return text[: min(found)] if found else text


@dataclass(frozen=True)
class ServerTapConfig:
    """No settings: the tap's rows come from the scheduler."""


class ServerTap(Intervention):
    """Streams every row's text and stops rows for stop strings and gone clients (module docstring).

    Args:
        rows: one :class:`RowText` per row of the wave, in the wave's row order.
    """

    name = "server_tap"
    config_class = ServerTapConfig

    def __init__(self, rows: Sequence[RowText]):
        self.config = ServerTapConfig()
        self.rows = list(rows)
        self.slot_rows: list[int | None] = []

    def sites(self) -> tuple[str, ...]:
        return ()

    def reset(self, batch_size: int) -> None:
        self.slot_rows = [None] * batch_size

    def admit(self, rows: Tensor, prompts: list[int]) -> None:
        for slot, row in zip(rows.nonzero().flatten().tolist(), prompts):
            self.slot_rows[slot] = row

    def retire(self, slot: int, row: int) -> None:
        self.slot_rows[slot] = None

    def choose(self, choice: TokenChoice) -> None:
        live = [(slot, self.rows[row]) for slot, row in enumerate(self.slot_rows) if row is not None]
        stop = [slot for slot, row in live if row.cancelled()]
        watched = [(slot, row) for slot, row in live if row.watched and slot not in stop]
        if watched:
            tokens, finished = choice.chosen.tolist(), choice.finished.tolist()
            stop += [slot for slot, row in watched if not finished[slot] and row.add(tokens[slot])]
        if stop:
            rows = torch.zeros_like(choice.forced_stop)
            rows[stop] = True
            choice.forced_stop = choice.forced_stop | rows
