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

__all__ = ["Always", "And", "InThink", "Not", "OnSignal", "OnText", "OnTokens", "Or", "StepWindow", "Trigger"]


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

    def signal_triggers(self) -> tuple[OnSignal, ...]:
        """The :class:`OnSignal` rules inside this trigger (the trace resolves and checks them)."""
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


_COMPARISONS = {
    "true": None,
    ">": torch.gt,
    ">=": torch.ge,
    "<": torch.lt,
    "<=": torch.le,
    "==": torch.eq,
    "!=": torch.ne,
    "in": None,
}


@dataclass(frozen=True)
class OnSignal(Trigger):
    """Fires where a probe's signal, published in the same run, passes a comparison.

    Closed loop: an intervention fires where a probe measures something, while decoding
    (:mod:`surgery.signals`). A signal is one value per row for the step's last position (the
    one that emits the next token); other positions of a prefill never fire.

    Args:
        source: the probe (an attached :class:`~surgery.blocks.Probe`), or its registry name
            (``"mi_estimator"``), or name and site when several are attached
            (``"thought_classifier@resid_pre.20"``); a config file holds the name.
        signal: the signal's name (the probe's :meth:`~surgery.blocks.Probe.signals`).
        op: ``"true"`` (a bool signal is True; the default), ``">"``, ``">="``, ``"<"``,
            ``"<="``, ``"=="``, ``"!="`` (against ``value``), or ``"in"`` (``value`` is a list).
            Class signals compare by class name: ``OnSignal(tc, "predicted", "in",
            ["reflection", "transition"])``.
        value: what ``op`` compares with.
        previous: read the value the probe published in the previous forward (needed when
            the probe sits at or after the reader's site in the forward).

    Comparisons build the same rule: ``OnSignal(mi, "value") > 0.5`` is
    ``OnSignal(mi, "value", ">", 0.5)``; ``.isin([...])`` is ``"in"``.

    Example:
        >>> rule = OnSignal("mi_estimator", "value") > 0.5
        >>> rule.op, rule.value, Trigger.from_dict(rule.to_dict()) == rule
        ('>', 0.5, True)
        >>> OnSignal("thought_classifier", "predicted").isin(["reflection"]).value
        ('reflection',)
    """

    kind: ClassVar[str] = "signal"
    source: object = None
    signal: str = ""
    op: str = "true"
    value: object = None
    previous: bool = False
    _resolved: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __init__(self, source, signal: str, op: str = "true", value=None, previous: bool = False):
        from surgery.blocks import Probe

        if not isinstance(source, (str, Probe)) or (isinstance(source, str) and not source):
            raise TypeError(f"OnSignal's source is a probe or its registry name, got {source!r}")
        if not isinstance(signal, str) or not signal:
            raise ValueError(f"OnSignal needs the signal's name, got {signal!r}")
        if op not in _COMPARISONS:
            raise ValueError(f"OnSignal op must be one of {list(_COMPARISONS)}, got {op!r}")
        if op == "in":
            if isinstance(value, (str, int, float)) or value is None:
                raise ValueError(f'op "in" needs a list of values, got {value!r}')
            value = tuple(value)
        elif op == "true":
            if value is not None:
                raise ValueError(f'op "true" tests a bool signal and takes no value, got {value!r}')
        elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"op {op!r} compares with a number (or a class name), got {value!r}")
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "signal", signal)
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "previous", bool(previous))
        object.__setattr__(self, "_resolved", None)

    def _compare(self, op: str, value) -> OnSignal:
        return OnSignal(self.source, self.signal, op, value, self.previous)

    def __gt__(self, value) -> OnSignal:
        return self._compare(">", value)

    def __ge__(self, value) -> OnSignal:
        return self._compare(">=", value)

    def __lt__(self, value) -> OnSignal:
        return self._compare("<", value)

    def __le__(self, value) -> OnSignal:
        return self._compare("<=", value)

    def isin(self, values) -> OnSignal:
        """The rule that fires where the signal is one of ``values``."""
        return self._compare("in", values)

    @property
    def reference(self) -> str:
        """How a config names the source: ``name`` or ``name@site``."""
        return self.source if isinstance(self.source, str) else _reference(self.source)

    def to_dict(self) -> dict:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {"kind": self.kind, "source": self.reference, "signal": self.signal, "op": self.op, "value": value,
                "previous": self.previous}

    def signal_triggers(self) -> tuple[OnSignal, ...]:
        return (self,)

    def resolve(self, blocks, n_layers: int) -> tuple:
        """Find the source among ``blocks`` and check the signal and comparison; returns
        ``(probe, spec)``. The trace calls it on entry (:func:`surgery.signals.check_signal_reads`)."""
        from surgery.blocks import Probe

        probes = [block for block in blocks if isinstance(block, Probe)]
        if isinstance(self.source, Probe):
            found = [probe for probe in probes if probe is self.source]
            if not found:
                raise ValueError(
                    f"OnSignal reads {self.reference}'s signal {self.signal!r}, but that probe is not attached to this "
                    "trace: attach it too (surgery.trace(model, reader, probe))"
                )
        else:
            name, _, site = self.source.partition("@")
            found = [probe for probe in probes if probe.name == name
                     and (not site or _same_site(site, getattr(probe.config, "site", None), n_layers))]
            attached = ", ".join(_reference(p) for p in probes) or "none"
            if not found:
                raise ValueError(f"OnSignal reads a probe {self.source!r}, and no such probe is attached "
                                 f"(probes attached: {attached}): attach it to the same trace")
            if len(found) > 1:
                raise ValueError(f"OnSignal's source {self.source!r} matches {len(found)} attached probes ({attached}): "
                                 'name the site too, e.g. "thought_classifier@resid_pre.20"')
        probe = found[0]
        specs = probe.signals()
        spec = specs.get(self.signal)
        if spec is None:
            published = ", ".join(map(repr, specs)) or "none"
            raise ValueError(f"{type(probe).__name__} publishes no signal {self.signal!r} (it publishes: {published})"
                             + (f"; {probe.signal_hint()}" if probe.signal_hint() else ""))
        threshold = self._threshold(spec)
        object.__setattr__(self, "_resolved", (probe, spec, threshold))
        return probe, spec

    def _threshold(self, spec):
        """The comparison's value as the signal's dtype (class names become indices)."""
        if self.op == "true":
            if spec.kind != "bool":
                raise ValueError(f"signal {spec.name!r} is a {spec.kind} signal: compare it (op '>', 'in', ...)")
            return None
        if spec.kind == "bool":
            raise ValueError(f"signal {spec.name!r} is a bool signal: use op 'true' (or ~OnSignal(...))")
        values = self.value if self.op == "in" else (self.value,)
        if spec.kind == "class":
            unknown = [v for v in values if v not in spec.classes and not (isinstance(v, int) and 0 <= v < len(spec.classes))]
            if unknown:
                raise ValueError(f"signal {spec.name!r} has the classes {list(spec.classes)}: {unknown} is not one")
            values = tuple(spec.classes.index(v) if isinstance(v, str) else v for v in values)
        elif any(isinstance(v, str) for v in values):
            raise ValueError(f"signal {spec.name!r} is a number: compare it with numbers, got {self.value!r}")
        return values if self.op == "in" else values[0]

    def mask(self, step: Step) -> Bool[Tensor, "batch pos"]:
        if self._resolved is None:
            raise RuntimeError("OnSignal is not resolved: use it in a block inside surgery.trace(...), beside its probe")
        probe, spec, threshold = self._resolved
        value = probe.signal_board.read(spec.name, step, self.previous)
        if self.op == "true":
            hit = value
        elif self.op == "in":
            hit = torch.zeros_like(value, dtype=torch.bool)
            for v in threshold:
                hit = hit | (value == v)
        else:
            hit = _COMPARISONS[self.op](value, threshold)
        out = torch.zeros_like(step.valid)
        out[:, -1] = hit
        return out


def _reference(probe) -> str:
    """``name@site`` of a probe (``name`` for one without a site)."""
    site = getattr(probe.config, "site", None)
    return f"{probe.name}@{site}" if site else probe.name


def _same_site(written: str, other: str | None, n_layers: int) -> bool:
    from surgery.sites import Site

    if other is None:
        return False
    try:
        return Site.parse(written).resolve(n_layers) == Site.parse(other).resolve(n_layers)
    except ValueError:
        return False


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

    def signal_triggers(self) -> tuple[OnSignal, ...]:
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

    def signal_triggers(self) -> tuple[OnSignal, ...]:
        return self.inner.signal_triggers()

    def mask(self, step: Step) -> Bool[Tensor, "batch pos"]:
        return ~self.inner.mask(step)
