"""ThinkingTokenInsertion: Thinking-Token Test-time Scaling (TTTS) from the MI-peaks paper.

arXiv 2506.02867 §5 (METHODS.md §2 "TTTS"): generate normally; where the model would stop, put
a thinking word (" Wait", " Hmm", ...) in its place and let it keep reasoning for an extra
budget; then force an answer prompt (" Final Answer within \\boxed{}:") and a short answer.

Here a row "would stop" when its next token is an EOS or completes a stop string, when it is
``</think>``, or (``first_budget``) when it has generated that many tokens. At such a point,
while the row has insertions and budget left, the stop token is replaced by the thinking word
(all its tokens, forced in order) and decoding goes on. ``budget`` counts the tokens the model
generates after its first inserted word (the word's own tokens, and those of later insertions,
are not counted: METHODS.md §2); when they run out, or the row would stop with no insertion
left, ``answer_prompt`` is forced (if given) and the row gets ``answer_tokens`` more tokens,
then stops (reason ``"block"``); without an answer prompt a row whose budget ran out stops there.
Rows insert independently; :meth:`insertions` tells where.

Paper-compatible: ``max_insertions=1`` (the released code inserts once) with ``first_budget``
set to the first pass's length. ``max_insertions > 1`` re-inserts each time the model would
stop while budget remains (the natural generalisation). ``budget=0`` changes nothing.

``joins="released"`` asks for the authors' released procedure instead (ChnQ/MI-Peaks
``TTTS_evaluate.py``): three ``generate`` passes joined as text, the word appended after the
whole first output (never at ``</think>``), only the answer pass graded. It cannot run inside
one decode: :func:`interventions.released_ttts.trace_generate` runs it for a trace that holds
such a block (``tr.generate`` refuses it), and :func:`interventions.released_ttts.released_ttts`
runs it directly; that module states every released detail. :meth:`ThinkingTokenInsertion.released`
builds the block with the released settings.

Example:
    >>> tts = ThinkingTokenInsertion(words=(" Wait",), budget=128, answer_prompt=" Final Answer:")
    >>> tts.config.max_insertions, tts.config.answer_tokens
    (1, 16)
    >>> model = surgery.load()                                            # doctest: +SKIP
    >>> with surgery.trace(model, tts) as tr:                             # doctest: +SKIP
    ...     out = tr.generate(["What is 7 * 8?"], max_new_tokens=256, chat=True)
    >>> tts.insertions()                                                  # doctest: +SKIP
    [[23]]
    >>> ThinkingTokenInsertion.released("Wait").config.joins   # a study condition of the released run
    'released'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from surgery.blocks import Intervention, register_block
from surgery.row_entries import per_row, pick_rows, retired_rows

__all__ = ["JOINS", "ThinkingTokenInsertion", "ThinkingTokenInsertionConfig"]

NORMAL, EXTENDED, ANSWERING = 0, 1, 2

#: The ways the word joins the output: forced tokens in one decode (the paper's rule, default),
#: or the released code's three text-joined passes (:mod:`interventions.released_ttts`).
JOINS = ("tokens", "released")


@dataclass(frozen=True)
class ThinkingTokenInsertionConfig:
    words: tuple[str, ...] = field(default=("Wait",), metadata={"help": "thinking words, used in turn"})
    budget: int = field(default=256, metadata={"help": "tokens the model may generate after the first inserted word"})
    max_insertions: int = field(default=1, metadata={"help": "insertions per row"})
    answer_prompt: str | None = field(default=None, metadata={"help": "forced when the budget runs out"})
    answer_tokens: int = field(default=16, metadata={"help": "tokens generated after the answer prompt"})
    first_budget: int | None = field(default=None, metadata={"help": "treat reaching this many tokens as a stop"})
    joins: str = field(default="tokens", metadata={
        "help": '"tokens": force the word where the row would stop, in one decode; "released": the authors\' '
                "three text-joined passes (interventions.released_ttts; first_budget then defaults to max_new_tokens)"})


def _tokens(model, text: str, what: str) -> list[int]:
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids or model.tokenizer.decode(ids) != text:
        raise ValueError(f"ThinkingTokenInsertion cannot encode {what} {text!r} with {model.name}'s tokenizer")
    return ids


@register_block("thinking_token_insertion")
class ThinkingTokenInsertion(Intervention):
    """Replace a row's stop by a thinking word while it has budget, then force the answer.

    Graph-safe (:attr:`~surgery.blocks.Block.graph_safe`): it hooks no site; it acts in the
    token-choice phase, outside the forward, with tensor ops.

    Args:
        words: the thinking words, inserted in turn (each encoded exactly as given: include a
            leading space, " Wait", to write it as a new word).
        budget: tokens the model may generate after the first inserted word, the inserted words
            not counted (>= 0; 0 disables the block).
        max_insertions: insertions per row (>= 0).
        answer_prompt: text forced when the budget runs out, or None.
        answer_tokens: tokens generated after the answer prompt before the row stops (> 0).
        first_budget: if set, a row reaching this many generated tokens counts as stopping
            (``joins="released"``: the first pass's budget, B₀; None uses the run's
            ``max_new_tokens``).
        joins: ``"tokens"`` (default): the rule above, in the decode loop. ``"released"``: the
            released code's procedure, run by :func:`interventions.released_ttts.trace_generate`
            (one word, written as in the released word list, e.g. ``"Wait"``: the join adds the
            space; ``max_insertions`` 1; ``answer_prompt`` required; ``budget`` is the second
            pass's budget B, 0 skipping it).

    Raises:
        ValueError: a setting out of range, or one ``joins="released"`` cannot honour.
    """

    graph_safe = True  # see surgery.blocks.Block.graph_safe
    config_class = ThinkingTokenInsertionConfig

    @classmethod
    def example(cls, model, prompts=(), identity: bool = False) -> ThinkingTokenInsertion:
        # first_budget makes every row insert, whether or not the model ever stops on its own
        return cls(words=(" Wait", " Hmm"), budget=0 if identity else 5, max_insertions=2, answer_prompt=" So",
                   answer_tokens=2, first_budget=4)

    def by_row(self, rows: Sequence[int] | None = None) -> list[list[int]]:
        return self.insertions(rows)

    def __init__(
        self,
        words=("Wait",),
        budget: int = 256,
        max_insertions: int = 1,
        answer_prompt: str | None = None,
        answer_tokens: int = 16,
        first_budget: int | None = None,
        joins: str = "tokens",
    ):
        words = (words,) if isinstance(words, str) else tuple(words)
        if not words or any(not isinstance(w, str) or not w for w in words):
            raise ValueError(f"ThinkingTokenInsertion needs non-empty words, got {words!r}")
        for name, value, low in (("budget", budget, 0), ("max_insertions", max_insertions, 0), ("answer_tokens", answer_tokens, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if first_budget is not None and (isinstance(first_budget, bool) or not isinstance(first_budget, int) or first_budget < 1):
            raise ValueError(f"first_budget must be a positive integer or None, got {first_budget!r}")
        if answer_prompt is not None and (not isinstance(answer_prompt, str) or not answer_prompt):
            raise ValueError(f"answer_prompt must be a non-empty string or None, got {answer_prompt!r}")
        if joins not in JOINS:
            raise ValueError(f"joins must be one of {JOINS}, got {joins!r}")
        if joins == "released":
            if len(words) != 1 or max_insertions != 1 or answer_prompt is None:
                raise ValueError(
                    "joins='released' runs the released code's procedure: one word per run (make one condition per "
                    "word), max_insertions=1 and an answer_prompt (released: ' Final Answer within \\boxed{}:'); got "
                    f"words={words!r}, max_insertions={max_insertions}, answer_prompt={answer_prompt!r}"
                )
        self.config = ThinkingTokenInsertionConfig(words, budget, max_insertions, answer_prompt, answer_tokens,
                                                   first_budget, joins)
        self._records: list[tuple[Tensor, Tensor]] = []
        self._retired: dict[int, list[int]] = {}
        self._released_insertions: list[list[int]] = []
        self._in_passes = False  # set by interventions.released_ttts while it runs the released passes

    @classmethod
    def released(cls, word: str = "Wait", first_budget: int | None = 4096, budget: int = 4096,
                 answer_prompt: str = " Final Answer within \\boxed{}:",
                 answer_tokens: int = 16) -> ThinkingTokenInsertion:
        """The block with the released run's settings (run_TTTS.sh: B₀ = B = 4096; TTTS_evaluate.py:
        the answer prompt and its 16 tokens), ``joins="released"``.

        Example:
            >>> ThinkingTokenInsertion.released("Hmm").config.words
            ('Hmm',)
        """
        return cls(words=(word,), budget=budget, answer_prompt=answer_prompt, answer_tokens=answer_tokens,
                   first_budget=first_budget, joins="released")

    def sites(self) -> tuple[str, ...]:
        return ()

    def bind(self, model) -> None:
        if self.config.joins == "released":  # text joins: nothing to encode ahead
            return
        encoded = [_tokens(model, w, "the word") for w in self.config.words]
        answer = _tokens(model, self.config.answer_prompt, "the answer prompt") if self.config.answer_prompt else []
        width = max(max(map(len, encoded)), len(answer), 1)
        device = model.device
        self._words = torch.full((len(encoded), width), model.pad_token_id, dtype=torch.long, device=device)
        for i, ids in enumerate(encoded):
            self._words[i, : len(ids)] = torch.tensor(ids, device=device)
        self._word_lengths = torch.tensor([len(ids) for ids in encoded], device=device)
        self._answer = torch.full((width,), model.pad_token_id, dtype=torch.long, device=device)
        self._answer[: len(answer)] = torch.tensor(answer, dtype=torch.long, device=device)
        self._answer_length = len(answer)
        self._close = model.think_token_ids[1]
        self._width = width

    def reset(self, batch_size: int) -> None:
        if self.config.joins == "released":
            return
        device = self._words.device
        zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._queue = torch.zeros(batch_size, self._width, dtype=torch.long, device=device)
        self._queue_length, self._queue_position = zeros.clone(), zeros.clone()
        self._inserted, self._extra, self._answer_left, self._phase = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
        self._records = []
        self._retired: dict[int, list[int]] = {}

    def admit(self, rows: Tensor, prompts: list[int]) -> None:
        if self.config.joins == "released":
            return
        for name in ("_queue_length", "_queue_position", "_inserted", "_extra", "_answer_left", "_phase"):
            setattr(self, name, getattr(self, name).masked_fill(rows, 0))
        self._queue = self._queue.masked_fill(rows[:, None], 0)
        # forget the slots' records; drop steps that no longer record anything (a host check,
        # at admissions only)
        self._records = [(index, mask & ~rows) for index, mask in self._records]
        self._records = [(index, mask) for index, mask in self._records if bool(mask.any())]

    def retire(self, slot: int, row: int) -> None:
        if self.config.joins != "released":
            records = [(index[slot : slot + 1], mask[slot : slot + 1]) for index, mask in self._records]
            self._retired[row] = per_row(records)[0] if records else []

    def _force(self, choice, rows: Tensor, tokens: Tensor, lengths) -> None:
        """Emit ``tokens[:, 0]`` now for ``rows`` and queue the rest."""
        self._queue = torch.where(rows[:, None], tokens, self._queue)
        self._queue_length = torch.where(rows, lengths, self._queue_length)
        self._queue_position = torch.where(rows, 1, self._queue_position)
        choice.replace(rows, tokens[:, 0], stop=False)

    def choose(self, choice) -> None:
        config = self.config
        if config.joins == "released":
            if self._in_passes:  # the released passes are plain generations: the block only records
                return
            raise ValueError(
                "ThinkingTokenInsertion(joins='released') runs as three text-joined generate passes, not inside "
                "tr.generate: call interventions.released_ttts.trace_generate(tr, prompts, max_new_tokens, ...) instead"
            )
        active = ~choice.finished
        # 1. keep forcing the words or answer prompt already queued
        pending = active & (self._queue_position < self._queue_length)
        queued = self._queue.gather(1, self._queue_position.clamp(max=self._width - 1)[:, None]).squeeze(1)
        choice.replace(pending, queued, stop=False)
        self._queue_position = self._queue_position + pending.long()
        free = active & ~pending
        # 2. where the row would stop, insert a thinking word while insertions and budget remain
        stop_point = choice.stops.clone()
        if self._close is not None:
            stop_point |= choice.chosen == self._close
        if config.first_budget is not None:  # each row's own token count (continuous batching)
            stop_point |= (self._phase == NORMAL) & (choice.indices >= config.first_budget)
        stop_point &= free
        over = free & (self._phase == EXTENDED) & (self._extra >= config.budget)
        insert = stop_point & ~over & (self._phase <= EXTENDED) & (self._inserted < config.max_insertions)
        if config.budget == 0:
            insert = torch.zeros_like(insert)
        word = self._inserted % len(config.words)
        self._force(choice, insert, self._words[word], self._word_lengths[word])
        self._records.append((choice.indices, insert))
        self._extra = torch.where(insert & (self._phase == NORMAL), 0, self._extra)
        self._inserted = self._inserted + insert.long()
        self._phase = torch.where(insert, EXTENDED, self._phase)
        # 3. out of budget (or stopping with nothing left to insert): the answer, or the end
        done = over | (choice.stops & free & ~insert & (self._phase == EXTENDED))
        if self._answer_length:
            answer = self._answer.expand(len(done), -1)
            self._force(choice, done, answer, torch.full_like(self._queue_length, self._answer_length))
            self._phase = torch.where(done, ANSWERING, self._phase)
            self._answer_left = torch.where(done, config.answer_tokens, self._answer_left)
        # 4. the answer's own budget, counted on the model's tokens after the prompt
        answering = free & ~done & (self._phase == ANSWERING)
        self._answer_left = self._answer_left - answering.long()
        choice.forced_stop = choice.forced_stop | (answering & (self._answer_left <= 0))
        # the extra budget counts the model's own tokens after the word, never the forced word
        self._extra = self._extra + (free & ~insert & (self._phase == EXTENDED)).long()
        if not self._answer_length:  # no answer to force: the budget's last token ends the row
            choice.forced_stop = choice.forced_stop | (active & (self._phase == EXTENDED) & (self._extra >= config.budget))

    def insertions(self, rows: Sequence[int] | None = None) -> list[list[int]]:
        """Per row of the last run (or of ``rows``, :meth:`~surgery.blocks.Block.by_row`), the
        generated-token indices where a thinking word starts (``joins="released"``: the first
        pass's token count, its stop token excluded)."""
        if self.config.joins == "released":
            return pick_rows([list(row) for row in self._released_insertions], rows)
        if self._retired:
            return retired_rows(self._retired, rows)
        return pick_rows(per_row(self._records), rows)
