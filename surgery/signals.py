"""Probe signals: per-row device values a probe publishes every forward, for triggers to read.

A probe may publish signals: after it is bound, :meth:`~surgery.blocks.Probe.signals` names them
(:class:`SignalSpec`: the site where it computes them, their kind, the class names of a class
signal), and each forward it writes one value per row into a :class:`SignalBoard`: the value
for the row's last position, the one that emits the next token (the MI of the emitting state,
the thought probe's class at a separator). Values stay on the device, in buffers allocated once
per run and written in place, so reading one never waits on the host and a compiled decode step
can hold it. :class:`~surgery.triggers.OnSignal` reads them.

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

from dataclasses import dataclass

import torch
from torch import Tensor

from surgery.sites import Site
from surgery.step import Step

__all__ = ["CHOICE_PHASE", "SIGNAL_KINDS", "SignalBoard", "SignalSpec", "check_signal_reads", "forward_order"]

#: Where token-choice code reads (after every site of the forward).
CHOICE_PHASE = "token choice"
SIGNAL_KINDS = ("bool", "float", "class")
_KIND_ORDER = {"resid_pre": 0, "attn_out": 1, "mlp_out": 2, "resid_post": 3}


@dataclass(frozen=True)
class SignalSpec:
    """One signal a probe publishes.

    Attributes:
        name: what readers call it (``OnSignal(probe, name)``).
        kind: ``"bool"`` (False before the first value), ``"float"`` (NaN before) or
            ``"class"`` (an index into ``classes``; -1 where there is no class this step).
        site: the canonical site whose forward hook computes it.
        classes: the class names of a ``"class"`` signal, in index order.
    """

    name: str
    kind: str
    site: str
    classes: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in SIGNAL_KINDS:
            raise ValueError(f"signal kind must be one of {SIGNAL_KINDS}, got {self.kind!r}")

    @property
    def dtype(self) -> torch.dtype:
        return {"bool": torch.bool, "float": torch.float64, "class": torch.long}[self.kind]

    @property
    def empty(self) -> float | bool | int:
        """The value before anything is published."""
        return {"bool": False, "float": float("nan"), "class": -1}[self.kind]


def forward_order(site: str | Site, n_layers: int) -> tuple[int, int]:
    """Where ``site`` (canonical) runs in a forward, or :data:`CHOICE_PHASE` after it: a sort key.

    >>> forward_order("resid_post.2", 4) < forward_order("resid_pre.3", 4) < forward_order("logits", 4)
    True
    """
    if site == CHOICE_PHASE:
        return (n_layers + 1, 0)
    site = Site.parse(site).resolve(n_layers)
    if site.kind == "logits":
        return (n_layers, 0)
    return (site.layer, _KIND_ORDER[site.kind])


class SignalBoard:
    """A probe's signals for one run: current and previous value per row, on the device.

    The buffers are allocated at the first :meth:`publish` of a run (the prefill, which runs
    eagerly) and written in place afterwards; ``published_at`` holds the step index of the last
    value, so :meth:`read` with ``previous=True`` picks the right buffer without asking the host.
    """

    def __init__(self, specs: dict[str, SignalSpec]):
        self.specs = dict(specs)
        self.clear()

    def clear(self) -> None:
        """Forget the last run (a probe calls this in ``reset``)."""
        self._current: dict[str, Tensor] = {}
        self._previous: dict[str, Tensor] = {}
        self._published_at: dict[str, Tensor] = {}

    def _allocate(self, name: str, batch: int, device: torch.device) -> None:
        spec = self.specs[name]
        self._current[name] = torch.full((batch,), spec.empty, dtype=spec.dtype, device=device)
        self._previous[name] = self._current[name].clone()
        self._published_at[name] = torch.full((), -1, dtype=torch.long, device=device)
        if device.type == "cuda":  # graph replays write here: the addresses must not move
            for buffer in (self._current[name], self._previous[name], self._published_at[name]):
                torch._dynamo.mark_static_address(buffer)

    def publish(self, name: str, value: Tensor, step: Step) -> None:
        """This forward's value of signal ``name``, one per row (``[batch]``)."""
        if name not in self._current:
            self._allocate(name, value.shape[0], value.device)
        self._previous[name].copy_(self._current[name])
        self._current[name].copy_(value.to(self.specs[name].dtype))
        self._published_at[name].copy_(step.index_on_device)

    def read(self, name: str, step: Step, previous: bool = False) -> Tensor:
        """Signal ``name`` per row (``[batch]``) as a reader at ``step`` sees it.

        ``previous=False``: the latest value (the trace made sure it is this forward's).
        ``previous=True``: the value of the forward before ``step``'s, whether or not the probe
        has published in ``step`` yet.
        """
        if name not in self._current:  # nothing published in this run yet
            spec = self.specs[name]
            return torch.full((step.batch_size,), spec.empty, dtype=spec.dtype, device=step.token_ids.device)
        if not previous:
            return self._current[name]
        return torch.where(self._published_at[name] == step.index_on_device, self._previous[name], self._current[name])


def check_signal_reads(model, blocks, plans: dict) -> None:
    """Resolve every :class:`~surgery.triggers.OnSignal` in ``blocks`` and check its order.

    Args:
        model: the wrapped model (its depth orders sites).
        blocks: every attached block.
        plans: block id -> the canonical sites it hooks (what :func:`surgery.trace.check_blocks`
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
