"""TokenMask: penalise or forbid words in the logits, as single tokens or as phrases in the text.

SEAL's baseline (arXiv 2504.07986, §4; METHODS.md §1 "Baseline: logit penalty") adds a
constant (-3) to the logits of every vocabulary token whose text contains one of the words
("wait", "alternatively"). That is ``match="token"``, the default for single words.

Phrases ("let me double-check") span several tokens, and so can a word when a tokenizer splits
it. ``match="text"`` follows each row's text as it streams (:mod:`surgery.text_match`) and
penalises exactly the tokens that would *complete* the phrase next: once the text ends in a
strict prefix of it, the token that would finish it is blocked, whatever the split.
``match="auto"`` (default) uses ``"text"`` for words with whitespace and for hard masks
(``penalty=None``: the words must never appear, which only text matching can promise), and
the paper's ``"token"`` rule otherwise. The logits are edited in one pass by
``surgery.kernels.mask_logits`` (Triton on CUDA, torch elsewhere).

Example:
    >>> mask = TokenMask(["wait", "let me double-check"], penalty=None)
    >>> mask.config.words, mask.config.penalty
    (('wait', 'let me double-check'), None)
    >>> model = surgery.load()                                            # doctest: +SKIP
    >>> with surgery.trace(model, mask) as tr:                            # doctest: +SKIP
    ...     out = tr.generate(["Is 7 * 8 = 54?"], max_new_tokens=64, chat=True)
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from surgery.blocks import Intervention, register_block
from surgery.kernels import mask_logits
from surgery.decode.records import StepRecords
from surgery.step import Step
from surgery.triggers import Always, OnText, StepWindow, Trigger

__all__ = ["TokenMask", "TokenMaskConfig"]

MATCH_MODES = ("auto", "token", "text")


@dataclass(frozen=True)
class TokenMaskConfig:
    words: tuple[str, ...] = field(default=(), metadata={"help": "words or phrases to penalise"})
    penalty: float | None = field(default=-3.0, metadata={"help": "added to their logits; None forbids them"})
    case_sensitive: bool = field(default=False, metadata={"help": "match with case"})
    match: str = field(default="auto", metadata={"help": "token: vocabulary entries containing a word (SEAL); "
                                                          "text: tokens completing it in the text; auto: see docs"})
    when: Trigger = field(default_factory=Always, metadata={"help": "where the mask applies (e.g. a StepWindow)"})


@register_block("token_mask")
class TokenMask(Intervention):
    """Add ``penalty`` to (or, with ``penalty=None``, forbid) the tokens that write ``words``.

    Graph-safe (:attr:`~surgery.blocks.Block.graph_safe`): one fused logit edit
    (:func:`~surgery.kernels.mask_logits`), its hits kept in per-run device buffers.

    Args:
        words: words or phrases (case-insensitive by default).
        penalty: a finite number added to the logits, or None for hard suppression.
        case_sensitive: match with case.
        match: ``"token"``, ``"text"`` or ``"auto"`` (see the module docstring).
        when: a trigger limiting where the mask applies, e.g. ``StepWindow(0, 200)``.
    """

    graph_safe = True  # see surgery.blocks.Block.graph_safe
    config_class = TokenMaskConfig

    @classmethod
    def example(cls, model, prompts=(), identity: bool = False) -> TokenMask:
        # single characters (SEAL's vocabulary rule) that hit the top token of any model within a
        # few steps, a phrase for text matching, and a trigger that differs between rows (after
        # line breaks, early on), so a mask leaking across rows shows
        when = OnText("\n") & StepWindow(0, 16)
        return cls([".", "e", "let me"], penalty=0.0 if identity else -5.0, when=when)

    def __init__(
        self,
        words,
        penalty: float | None = -3.0,
        *,
        case_sensitive: bool = False,
        match: str = "auto",
        when: Trigger | None = None,
    ):
        words = (words,) if isinstance(words, str) else tuple(words)
        if not words or any(not isinstance(w, str) or not w.strip() for w in words):
            raise ValueError(f"TokenMask needs non-empty words, got {words!r}")
        if penalty is not None and (isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty)):
            raise ValueError(f"penalty must be a finite number or None (forbid), got {penalty!r}")
        if match not in MATCH_MODES:
            raise ValueError(f"match must be one of {MATCH_MODES}, got {match!r}")
        self.config = TokenMaskConfig(
            words=words,
            penalty=None if penalty is None else float(penalty),
            case_sensitive=case_sensitive,
            match=match,
            when=when if when is not None else Always(),
        )
        self._vocabulary: Tensor | None = None
        self._matchers: dict = {}
        self._fired = StepRecords()

    def _mode(self, word: str) -> str:
        if self.config.match != "auto":
            return self.config.match
        return "text" if self.config.penalty is None or any(c.isspace() for c in word.strip()) else "token"

    def _text_words(self) -> tuple[str, ...]:
        return tuple(w for w in self.config.words if self._mode(w) == "text")

    def sites(self) -> tuple[str, ...]:
        return ("logits",)

    def text_patterns(self) -> tuple[tuple[str, bool], ...]:
        own = tuple((w, self.config.case_sensitive) for w in self._text_words())
        return own + super().text_patterns()

    def reset(self, batch_size: int) -> None:
        self._fired.clear()

    def admit(self, rows: Tensor, prompts: list[int]) -> None:
        self._fired.admit(rows)

    def retire(self, slot: int, row: int) -> None:
        self._fired.retire(slot, row)

    def fired(self, rows: Sequence[int] | None = None) -> list[list[int]]:
        """Per row of the last run (or of ``rows``, :meth:`~surgery.blocks.Block.by_row`), the
        position ids whose top token the mask penalised or forbade (the logits there are those
        of the next token: position ``p`` chooses token ``p + 1``)."""
        return self._fired.per_row(rows)

    def by_row(self, rows: Sequence[int] | None = None) -> list[list[int]]:
        return self.fired(rows)

    def bind(self, model) -> None:
        fold = (lambda s: s) if self.config.case_sensitive else str.lower
        alphabet = set("".join(fold(t) for t in model.vocabulary_texts))
        for word in self.config.words:
            missing = sorted(set(fold(word)) - alphabet)
            if missing:
                raise ValueError(
                    f"TokenMask cannot encode {word!r} with {model.name}'s tokenizer: no vocabulary entry "
                    f"writes {''.join(missing)!r} on its own, so the word can never be matched"
                )
        token_words = tuple(w for w in self.config.words if self._mode(w) == "token")
        vocabulary = torch.zeros(model.vocab_size, dtype=torch.bool, device=model.device)
        if token_words:
            vocabulary |= model.vocabulary_mask(token_words, case_sensitive=self.config.case_sensitive)
        self._vocabulary = vocabulary
        self._matchers = {w: model.text_matcher(w, self.config.case_sensitive) for w in self._text_words()}
        self.config.when.bind(model)

    def edit(self, site: str, value: Tensor, step: Step) -> Tensor:
        completions = None  # the tokens that would complete a phrase, per row and position
        for word, matcher in self._matchers.items():
            hit = matcher.completions(step.text_states[(word, self.config.case_sensitive)])
            completions = hit if completions is None else completions | hit
        # one pass over the logits (Triton on CUDA): penalty or -inf where masked, and whether
        # the mask hit the would-be top token
        edited, top_masked = mask_logits(
            value, self._vocabulary, self.config.penalty, extra_mask=completions, active=self.config.when(step)
        )
        if not step.is_rerun:  # device tensors, no sync
            self._fired.add(step, step.positions, top_masked)
        return edited
