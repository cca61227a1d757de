"""Probe signals: per-row device values a probe publishes every forward, for triggers to read.

A probe may publish signals: after it is bound, :meth:`~surgery.blocks.Probe.signals` names them
(:class:`SignalSpec`: the site where it computes them, their kind, the class names of a class
signal), and each forward it writes one value per row into a :class:`SignalBoard`: the value
for the row's last position, the one that emits the next token (the MI of the emitting state,
the thought probe's class at a separator). Values stay on the device, in buffers allocated once
per run and written in place, so reading one never waits on the host and a compiled decode step
can hold it (:mod:`surgery.signal_board`, which keeps them per row, also under continuous
batching). :class:`OnSignal`, a trigger, reads them.

When is a signal there to be read? A forward runs its sites in order (:func:`forward_order`:
block by block, ``resid_pre`` < ``attn_out`` < ``mlp_out`` < ``resid_post``, then ``logits``),
then the token-choice phase runs (:meth:`~surgery.blocks.Intervention.choose`, e.g.
representation recycling). A reader sees this forward's value when the probe's site comes
strictly before where it reads (at one site, interventions run before probes, so the same site
is too late), and anything computed in the forward from the token-choice phase. With
``previous=True`` it reads the value of the previous forward instead, wherever the probe sits.
The trace checks every read when it is entered (:func:`check_signal_reads`) and refuses an
order in which the value would not exist yet.

Example:
    >>> import torch
    >>> from surgery.step import Step
    >>> step = Step.prefill(torch.tensor([[5, 6], [7, 8]]), torch.ones(2, 2, dtype=torch.bool))
    >>> board = SignalBoard({"score": SignalSpec("score", "float", "resid_post.0")})
    >>> board.publish("score", torch.tensor([0.5, 2.0]), step)
    >>> board.read("score", step).tolist(), board.read("score", step, previous=True).isnan().tolist()
    ([0.5, 2.0], [True, True])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from jaxtyping import Bool
from torch import Tensor

from surgery.signal_board import SIGNAL_KINDS, SignalBoard, SignalSpec
from surgery.sites import Site
from surgery.step import Step
from surgery.triggers import Trigger

__all__ = ["CHOICE_PHASE", "OnSignal", "SIGNAL_KINDS", "SignalBoard", "SignalSpec", "check_signal_reads", "forward_order"]

#: Where token-choice code reads (after every site of the forward).
CHOICE_PHASE = "token choice"
_KIND_ORDER = {"resid_pre": 0, "attn_out": 1, "mlp_out": 2, "resid_post": 3}


def forward_order(site: str | Site, n_layers: int) -> tuple[int, int]:
    """Where ``site`` (canonical) runs in a forward, or :data:`CHOICE_PHASE` after it: a sort key.

    >>> forward_order("resid_post.2", 4) < forward_order("resid_pre.3", 4) < forward_order("logits", 4)
    True
    """
    if site == CHOICE_PHASE:
        return (n_layers + 1, 0)
    site = Site.parse(site).resolve(n_layers)
    return (n_layers, 0) if site.kind == "logits" else (site.layer, _KIND_ORDER[site.kind])


def check_signal_reads(model, blocks, plans: dict) -> None:
    """Resolve every :class:`~surgery.signals.OnSignal` in ``blocks`` and check its order.

    Args:
        model: the wrapped model (its depth orders sites).
        blocks: every attached block.
        plans: block id -> the canonical sites it hooks (what :func:`surgery.decode.trace.check_blocks`
            returned).

    Raises:
        ValueError: a signal's probe is not attached (or the name matches several), it does
            not publish that signal, or the value would be read before it is computed.
    """
    from surgery.blocks import Intervention, Probe

    read: dict[int, set[str]] = {id(block): set() for block in blocks}
    for block in blocks:
        reads = block.signal_triggers()
        if not reads:
            continue
        where = list(plans[id(block)])
        if isinstance(block, Intervention) and block.edits_tokens:
            where.append(CHOICE_PHASE)
        for trigger in reads:
            probe, spec = trigger.resolve(blocks, model.n_layers)
            read[id(probe)].add(spec.name)
            if trigger.previous:
                continue
            late = [site for site in where
                    if forward_order(spec.site, model.n_layers) >= forward_order(site, model.n_layers)]
            if late:
                reader = late[0]
                raise ValueError(
                    f"{type(block).__name__} reads {probe.name}'s signal {spec.name!r} at {reader}, but the probe "
                    f"computes it at {spec.site}, "
                    + ("the same site (where probes run after interventions)" if spec.site == reader else "later in the forward")
                    + ": it does not exist yet when it is read. Move the probe to a site before "
                    f"{reader}, or read the previous step's value with OnSignal(..., previous=True)"
                )
    for block in blocks:
        if isinstance(block, Probe):
            block.use_signals(frozenset(read[id(block)]))


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

    def _compare(self, op: str, value) -> OnSignal:  # the comparison operators below
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
            known = (*spec.classes, *spec.other_names)
            unknown = [v for v in values if v not in known and not (isinstance(v, int) and 0 <= v < len(spec.classes))]
            if unknown:
                raise ValueError(f"signal {spec.name!r} has the classes {list(known)}: {unknown} is not one")
            # a name the probe never outputs matches nothing (-2: signals are -1 where there is no class)
            values = tuple((spec.classes.index(v) if v in spec.classes else -2) if isinstance(v, str) else v
                           for v in values)
        elif any(isinstance(v, str) for v in values):
            raise ValueError(f"signal {spec.name!r} is a number: compare it with numbers, got {self.value!r}")
        return values if self.op == "in" else values[0]

    def mask(self, step: Step) -> Bool[Tensor, "batch pos"]:
        if self._resolved is None:
            raise RuntimeError("OnSignal is not resolved: use it in a block inside surgery.trace(...), beside its probe")
        probe, spec, threshold = self._resolved
        value = probe.signal_board.read(spec.name, step, self.previous)
        if self.op in ("true", "in"):
            hit = value if self.op == "true" else sum(value == v for v in threshold) > 0  # no tensor built per step
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
    try:
        return other is not None and Site.parse(written).resolve(n_layers) == Site.parse(other).resolve(n_layers)
    except ValueError:
        return False
