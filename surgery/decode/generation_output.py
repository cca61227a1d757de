"""What a generation returns, and the hand-off of each token choice to the blocks.

Shared by the fixed-batch loop (:mod:`surgery.decode.engine`) and continuous batching
(:mod:`surgery.decode.slots`), so both return the same :class:`GenerationOutput`.

Example:
    >>> out = GenerationOutput(texts=["4"], token_ids=[[19]], lengths=[1], prompt_lengths=[3], stop_reasons=["length"])
    >>> out.lengths[0], out.stop_reasons[0]
    (1, 'length')
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from surgery.token_choice import TokenChoice

__all__ = ["FinishedRow", "GenerationOutput", "offer_choice"]


@dataclass(frozen=True)
class FinishedRow:
    """One prompt's generation, handed to ``generate(..., on_row=...)`` the moment it is final
    (under continuous batching: when the row leaves its slot, other rows still running).

    Attributes:
        row: the prompt's index in the run.
        text, token_ids, prompt_length, stop_reason: as its entries of :class:`GenerationOutput`.
        seconds: wall time from the row's admission into its slot (its prefill included) to its
            end, shared with the rows beside it; None after a fixed batch (the batch's time).

    Example:
        >>> GenerationOutput(texts=["4"], token_ids=[[19]], lengths=[1], prompt_lengths=[3],
        ...                  stop_reasons=["eos"]).row(0).stop_reason
        'eos'
    """

    row: int
    text: str
    token_ids: list[int]
    prompt_length: int
    stop_reason: str
    seconds: float | None = None


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
            ended the row, e.g. thinking-token insertion after its answer budget, on a token
            that would not have stopped it; see :mod:`surgery.decode.stopping`).
        timings: seconds for ``prefill_s``, ``decode_s``, ``total_s``, plus ``new_tokens`` and
            ``tokens_per_s`` (new tokens over total time).
    """

    texts: list[str]
    token_ids: list[list[int]]
    lengths: list[int]
    prompt_lengths: list[int]
    stop_reasons: list[str]
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def finished(cls, tokenizer, token_ids: list[list[int]], prompt_lengths: list[int], stop_reasons: list[str],
                 start: float, prefill_s: float, **timings: float) -> GenerationOutput:
        """The output of a run that began at ``start`` (``time.perf_counter()``) and ends now:
        texts decoded, lengths and timings derived; ``timings`` adds entries (e.g. ``steps``).
        Shared by the fixed-batch loop and the slot pool."""
        total_s = time.perf_counter() - start
        new_tokens = sum(map(len, token_ids))
        return cls(
            texts=tokenizer.batch_decode(token_ids, skip_special_tokens=True),
            token_ids=token_ids,
            lengths=[len(t) for t in token_ids],
            prompt_lengths=prompt_lengths,
            stop_reasons=stop_reasons,
            timings={
                "prefill_s": prefill_s,
                "decode_s": total_s - prefill_s,
                "total_s": total_s,
                "new_tokens": float(new_tokens),
                "tokens_per_s": new_tokens / total_s if total_s > 0 else float("nan"),
                **timings,
            },
        )

    def row(self, i: int) -> FinishedRow:
        """Row ``i`` as one :class:`FinishedRow`."""
        return FinishedRow(i, self.texts[i], list(self.token_ids[i]), self.prompt_lengths[i], self.stop_reasons[i])


def offer_choice(on_choose: Callable[[TokenChoice], None], choice: TokenChoice, pad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hand ``choice`` to the blocks; return what they left: tokens, own stops, forced stops."""
    on_choose(choice)
    finished = choice.finished
    return torch.where(finished, pad, choice.chosen), choice.stops & ~finished, choice.forced_stop & ~finished
