"""What a generation returns, and the hand-off of each token choice to the blocks.

Shared by the fixed-batch loop (:mod:`surgery.decode.engine`) and continuous batching
(:mod:`surgery.decode.slots`), so both return the same :class:`GenerationOutput`.

Example:
    >>> out = GenerationOutput(texts=["4"], token_ids=[[19]], lengths=[1], prompt_lengths=[3], stop_reasons=["length"])
    >>> out.lengths[0], out.stop_reasons[0]
    (1, 'length')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from surgery.token_choice import TokenChoice

__all__ = ["GenerationOutput", "offer_choice"]


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


def offer_choice(on_choose: Callable[[TokenChoice], None], choice: TokenChoice, pad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hand ``choice`` to the blocks; return what they left: tokens, own stops, forced stops."""
    on_choose(choice)
    finished = choice.finished
    return torch.where(finished, pad, choice.chosen), choice.stops & ~finished, choice.forced_stop & ~finished
