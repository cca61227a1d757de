"""Triggers: declarative, composable rules for where a block fires.

A trigger turns a :class:`~surgery.step.Step` into a boolean ``[batch, pos]`` mask with tensor
ops only. String triggers are matched once against the text of every vocabulary entry (a
boolean vocabulary mask built when the trigger is bound to a model), so ``OnTokens("\\n\\n")``
fires on ``"\\n\\n"``, ``".\\n\\n"`` and ``"\\n\\n\\n"`` alike, in prefill and in every decode step,
without decoding anything while generating.

Combine with ``&``, ``|`` and ``~``:

    >>> seal = OnTokens("\\n\\n") & InThink()
    >>> seal
    And(left=OnTokens(strings=('\\n\\n',), ids=(), case_sensitive=True), right=InThink())
    >>> Trigger.from_dict(seal.to_dict()) == seal
    True

Calling a bound trigger on a step (``trigger(step)``) gives its mask restricted to valid
positions (never padding, never rows that already finished).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from jaxtyping import Bool
from torch import Tensor

from surgery.step import Step

__all__ = ["Always", "And", "FromPromptEnd", "InThink", "Not", "OnText", "OnTokens", "Or", "SealThinkFlag", "StepWindow",
           "Trigger"]


class Trigger:
    """Base class: ``mask(step)`` gives where the rule holds; ``trigger(step)`` adds validity."""

    kind: ClassVar[str]
    _kinds: ClassVar[dict[str, type[Trigger]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.kind.startswith("_"):  # abstract helpers are not serialisable kinds
            Trigger._kinds[cls.kind] = cls

    def bind(self, model) -> Trigger:
        """Precompute what the rule needs from ``model`` (vocabulary masks). Returns self."""
        return self

    def mask(self, step: Step) -> Bool[Tensor, "batch pos"]:
        raise NotImplementedError

    def text_patterns(self) -> tuple[tuple[str, bool], ...]:
        """``(string, case_sensitive)`` keys the engine must track through the text for this trigger."""
        return ()

    def signal_triggers(self) -> tuple:
        """The :class:`~surgery.signals.OnSignal` rules inside this trigger (the trace resolves
        and checks them)."""
        return ()

    def __call__(self, step: Step) -> Bool[Tensor, "batch pos"]:
        return self.mask(step) & step.valid

    def __and__(self, other: Trigger) -> Trigger:
        return And(self, _as_trigger(other))

    def __or__(self, other: Trigger) -> Trigger:
        return Or(self, _as_trigger(other))

    def __invert__(self) -> Trigger:
        return Not(self)

    def to_dict(self) -> dict:
        """A JSON-serialisable description (``Trigger.from_dict`` reverses it)."""
        out: dict = {"kind": self.kind}
        for f in fields(self):
            if f.init:
                value = getattr(self, f.name)
                out[f.name] = value.to_dict() if isinstance(value, Trigger) else value
        return out

    @staticmethod
    def from_dict(data: dict) -> Trigger:
        data = dict(data)
        kind = data.pop("kind", None)
        if kind not in Trigger._kinds:
            raise ValueError(f"unknown trigger kind {kind!r}: expected one of {sorted(Trigger._kinds)}")
        cls = Trigger._kinds[kind]
        args = {k: Trigger.from_dict(v) if isinstance(v, dict) else v for k, v in data.items()}
        return cls(**args)


def _as_trigger(value) -> Trigger:
    if not isinstance(value, Trigger):
        raise TypeError(f"triggers combine with triggers, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Always(Trigger):
    """Fires at every valid position."""

    kind: ClassVar[str] = "always"

    def mask(self, step: Step) -> Bool[Tensor, "batch pos"]:
        return torch.ones_like(step.valid)


@dataclass(frozen=True)
class OnTokens(Trigger):
    """Fires where the fed token is one of ``ids`` or its text contains one of ``strings``.

    Args:
        strings: substrings matched against each vocabulary entry's decoded text.
        ids: token ids, matched exactly.
        case_sensitive: match ``strings`` with case (default) or without.

    Example:
        >>> OnTokens("\\n\\n").strings
        ('\\n\\n',)
    """

    kind: ClassVar[str] = "tokens"
    strings: tuple[str, ...] = ()
    ids: tuple[int, ...] = ()
    case_sensitive: bool = True
    _vocabulary: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __init__(self, strings: str | tuple[str, ...] | list[str] = (), ids=(), case_sensitive: bool = True):
        strings = (strings,) if isinstance(strings, str) else tuple(strings)
        ids = (ids,) if isinstance(ids, int) else tuple(int(i) for i in ids)
        if not strings and not ids:
            raise ValueError("OnTokens needs at least one string or token id")
        if any(not isinstance(s, str) or not s for s in strings):
            raise ValueError(f"OnTokens strings must be non-empty strings, got {strings!r}")
        object.__setattr__(self, "strings", strings)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "case_sensitive", case_sensitive)
        object.__setattr__(self, "_vocabulary", None)

    def bind(self, model) -> OnTokens:
        if any(not 0 <= i < model.vocab_size for i in self.ids):
            raise ValueError(f"OnTokens ids {self.ids} out of range for a vocabulary of {model.vocab_size}")
        vocabulary = torch.zeros(model.vocab_size, dtype=torch.bool, device=model.device)
        if self.strings:
            vocabulary |= model.vocabulary_mask(self.strings, case_sensitive=self.case_sensitive)
        if self.ids:
            vocabulary[list(self.ids)] = True
        object.__setattr__(self, "_vocabulary", vocabulary)
        return self

    def mask(self, step: Step) -> Bool[Tensor, "batch pos"]:
        if self._vocabulary is None:
            raise RuntimeError("OnTokens is not bound to a model: use it inside surgery.trace(...)")
        return self._vocabulary[step.token_ids]


@dataclass(frozen=True)
class OnText(Trigger):
    """Fires at the fed token where an occurrence of ``text`` ends in the row's text.

    Unlike :class:`OnTokens`, this sees across token boundaries: ``OnText("\\n\\n")`` fires on
    the second of two "\\n" tokens (how SmolLM2 writes a blank line) as well as on one ".\\n\\n"
    token. The engine runs a small automaton per row on the device (one gather per step, see
    :mod:`surgery.text_match`); matching starts at each row's first prompt token, with case
    unless ``case_sensitive=False``. Occurrences may overlap.

    Example:
        >>> OnText("\\n\\n").text_patterns()
        (('\\n\\n', True),)
    """

    kind: ClassVar[str] = "text"
    text: str
    case_sensitive: bool = True

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text:
            raise ValueError(f"OnText needs a non-empty string, got {self.text!r}")

    def text_patterns(self) -> tuple[tuple[str, bool], ...]:
        return ((self.text, self.case_sensitive),)

    def mask(self, step: Step) -> Bool[Tensor, "batch pos"]:
        hits = step.text_hits.get((self.text, self.case_sensitive))
        if hits is None:
            raise RuntimeError(
                f"OnText({self.text!r}) is not tracked in this step: use it inside a block's config "
                "in surgery.trace(...), which tells the engine which strings to follow"
            )
        return hits


@dataclass(frozen=True)
class InThink(Trigger):
    """Fires inside the ``<think>`` … ``</think>`` span (the model's tokenizer must have them)."""

    kind: ClassVar[str] = "in_think"

    def bind(self, model) -> InThink:
        if model.think_token_ids == (None, None):
            raise ValueError(
                f"InThink needs '<think>' and '</think>' tokens, and {model.name}'s vocabulary has "
                "neither: it would never fire. Drop InThink() from the trigger for this model."
            )
        return self

    def mask(self, step: Step) -> Bool[Tensor, "batch pos"]:
        return step.in_think


@dataclass(frozen=True)
class SealThinkFlag(Trigger):
    """Fires where the released SEAL code's think flag is set (:attr:`~surgery.step.Step.seal_think`).

    The flag of VITA-Group/SEAL (METHODS.md section 1, "What the released code does"): after
    the prefill it is set when the row's prompt holds a ``<think>`` anywhere (an earlier turn's
    closed ``<think>…</think>`` included, where :class:`InThink` says outside), then a fed
    ``<think>`` sets it and a fed ``</think>`` clears it. With a prompt that holds no think tag,
    or one whose last tag is an open ``<think>``, the two agree. Use it to reproduce the released
    code (:func:`interventions.seal_trigger` with ``released=True``); :class:`InThink` is the
    paper's span and the default.
    """

    kind: ClassVar[str] = "seal_think_flag"

    def bind(self, model) -> SealThinkFlag:
        if model.think_token_ids[0] is None:
            raise ValueError(
                f"SealThinkFlag needs a '<think>' token, and {model.name}'s vocabulary has none: it would "
                "never fire. Drop it from the trigger for this model."
            )
        return self

    def mask(self, step: Step) -> Bool[Tensor, "batch pos"]:
        return step.seal_think


@dataclass(frozen=True)
class FromPromptEnd(Trigger):
    """Fires at each row's last prompt token and at every token fed after it.

    In the prefill only the last prompt position passes (SEAL, METHODS.md section 1: "in prefill
    only the last prompt position can fire"; the released code steers only there); in every
    decode step the fed token passes. ``OnTokens("\\n\\n") & FromPromptEnd()`` leaves the
    separators inside a prompt alone (a prompt that already holds part of a reasoning trace).

    Example:
        >>> import torch
        >>> prefill = Step.prefill(torch.tensor([[4, 5, 6]]), torch.ones(1, 3, dtype=torch.long))
        >>> FromPromptEnd()(prefill).tolist()
        [[False, False, True]]
    """

    kind: ClassVar[str] = "from_prompt_end"

    def mask(self, step: Step) -> Bool[Tensor, "batch pos"]:
        index = step.index_on_device.expand(step.valid.shape)
        following = torch.cat([index[:, 1:], torch.ones_like(index[:, :1])], dim=1)  # the next position's step
        return (index > 0) | (following > 0)


@dataclass(frozen=True)
class StepWindow(Trigger):
    """Fires in steps ``start <= step.index < stop`` (0 is the prefill; ``stop=None``: no end)."""

    kind: ClassVar[str] = "step_window"
    start: int = 0
    stop: int | None = None

    def __post_init__(self):
        if self.start < 0 or (self.stop is not None and self.stop < self.start):
            raise ValueError(f"StepWindow needs 0 <= start <= stop, got start={self.start}, stop={self.stop}")

    def mask(self, step: Step) -> Bool[Tensor, "batch pos"]:
        index = step.index_on_device  # a device tensor: a compiled step is not specialised on it
        inside = index >= self.start
        if self.stop is not None:
            inside = inside & (index < self.stop)
        return inside.expand(step.valid.shape).clone()


@dataclass(frozen=True)
class _Pair(Trigger):
    """Two triggers combined; subclasses say how."""

    kind: ClassVar[str] = "_pair"
    left: Trigger
    right: Trigger

    def bind(self, model) -> _Pair:
        self.left.bind(model)
        self.right.bind(model)
        return self

    def text_patterns(self) -> tuple[tuple[str, bool], ...]:
        return self.left.text_patterns() + self.right.text_patterns()

    def signal_triggers(self) -> tuple:
        return self.left.signal_triggers() + self.right.signal_triggers()


@dataclass(frozen=True)
class And(_Pair):
    """Fires where both fire (``a & b``)."""

    kind: ClassVar[str] = "and"

    def mask(self, step: Step) -> Bool[Tensor, "batch pos"]:
        return self.left.mask(step) & self.right.mask(step)


@dataclass(frozen=True)
class Or(_Pair):
    """Fires where either fires (``a | b``)."""

    kind: ClassVar[str] = "or"

    def mask(self, step: Step) -> Bool[Tensor, "batch pos"]:
        return self.left.mask(step) | self.right.mask(step)


@dataclass(frozen=True)
class Not(Trigger):
    """Fires where the inner trigger does not (``~a``); still only at valid positions."""

    kind: ClassVar[str] = "not"
    inner: Trigger

    def bind(self, model) -> Not:
        self.inner.bind(model)
        return self

    def text_patterns(self) -> tuple[tuple[str, bool], ...]:
        return self.inner.text_patterns()

    def signal_triggers(self) -> tuple:
        return self.inner.signal_triggers()

    def mask(self, step: Step) -> Bool[Tensor, "batch pos"]:
        return ~self.inner.mask(step)
