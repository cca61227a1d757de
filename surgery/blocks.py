"""The block protocols (interventions and probes) and the one registry of block names.

A block is a small class with a frozen, JSON-serialisable config, registered by name. Inside a
trace, at each site it declares, the block receives the site's tensor and the current
:class:`~surgery.step.Step`:

- an :class:`Intervention` returns the (possibly edited) tensor from ``edit(site, value, step)``,
  and may change the tokens the engine emits in ``choose(choice)``, through the
  :class:`TokenChoice` defined here (the protocol is in :meth:`Intervention.choose`);
- a :class:`Probe` only looks, in ``observe(site, value, step)``, and returns what it found from
  ``result()``.

At one site, interventions run in the order they were added and probes see the value after all
of them. ``value`` is ``[batch, pos, width]``; in the prefill the engine asks the head for the
last position only, so at ``logits`` ``pos`` can be shorter than ``step.length``: use
``step.tail(value.shape[1])`` to align (the trace already does this before calling a block).

Example (a complete intervention):

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class ScaleConfig:
    ...     site: str = "resid_post.0"
    ...     factor: float = 1.0
    >>> @register_block("doc_scale")
    ... class Scale(Intervention):
    ...     config_class = ScaleConfig
    ...     def __init__(self, site="resid_post.0", factor=1.0):
    ...         self.config = ScaleConfig(site, factor)
    ...     def sites(self):
    ...         return (self.config.site,)
    ...     def edit(self, site, value, step):
    ...         return value * self.config.factor
    >>> block_class("doc_scale") is Scale
    True
    >>> Block.from_dict(Scale(factor=2.0).to_dict()).config
    ScaleConfig(site='resid_post.0', factor=2.0)

A block's constructor takes its config's fields (and its :meth:`~Block.tensors` by name), so
:meth:`Block.from_dict` can rebuild it; :func:`surgery.files.saving.save_blocks` writes a list of blocks
to one file. The contract test (``tests/test_block_contract.py``) runs over every registered
block, using :meth:`Block.example`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from surgery.config_json import config_from_json, config_to_json
from surgery.step import Step
from surgery.token_choice import TokenChoice

__all__ = [
    "Block",
    "Intervention",
    "Probe",
    "TokenChoice",
    "block_class",
    "register_block",
    "registered_blocks",
]

_REGISTRY: dict[str, type[Block]] = {}


def register_block(name: str):
    """Class decorator: register a block class under ``name`` (unique, lower_snake_case).

    The class names its frozen config dataclass in ``config_class``.
    """
    if not name or not name.replace("_", "").isalnum() or name != name.lower():
        raise ValueError(f"block names are lower_snake_case identifiers, got {name!r}")

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, (Intervention, Probe))):
            raise TypeError(f"@register_block({name!r}) expects an Intervention or Probe subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"block name {name!r} is already taken by {existing.__module__}.{existing.__qualname__}")
        config_class = getattr(cls, "config_class", None)
        if not (dataclasses.is_dataclass(config_class) and config_class.__dataclass_params__.frozen):
            raise TypeError(f"{cls.__name__} must name its frozen config dataclass: config_class = {cls.__name__}Config")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def block_class(name: str) -> type[Block]:
    """The block class registered as ``name``; the error suggests the closest names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(
            f"no block is registered as {name!r}.{hint} Registered: {', '.join(sorted(_REGISTRY)) or 'none'} "
            "(import interventions and probes to register theirs)"
        ) from None


def registered_blocks() -> dict[str, type[Block]]:
    """A copy of the registry: name -> class."""
    return dict(sorted(_REGISTRY.items()))


class Block:
    """What every block has: a registry name, a frozen config, the sites it hooks.

    Subclasses set ``self.config`` (a frozen dataclass of JSON-serialisable fields) in
    ``__init__`` and override :meth:`sites`; :meth:`bind` checks the block against a model before
    any hook is installed, so a mismatch leaves the model untouched; :meth:`reset` clears
    per-run state at the start of every ``generate`` or ``run``.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type]
    config: Any
    #: Whether what the block does in a decode step's forward is all device tensor ops on
    #: memory fixed per run (no host sync, no Python state that changes per step), so that the
    #: step can be compiled or graph-captured with the block inside (``generate(compile=...)``).
    #: Token-choice work (:meth:`Intervention.choose`) runs outside the forward either way.
    graph_safe: ClassVar[bool] = False

    def sites(self) -> tuple[str, ...]:
        """The sites this block hooks, as written by the user (negative block indices allowed)."""
        raise NotImplementedError

    def bind(self, model) -> None:
        """Validate against ``model`` and precompute (raise ValueError with a fix on mismatch)."""

    def reset(self, batch_size: int) -> None:
        """Start of a ``generate``/``run`` over ``batch_size`` rows: clear per-run state.

        Under continuous batching ``batch_size`` is the number of slots, and rows come and go
        through :meth:`admit` and :meth:`retire`.
        """

    # ---- the row lifecycle under continuous batching (``generate(..., batch_size=N)``) ---------
    #: Whether the class implements :meth:`admit` and :meth:`retire` (checked on entry to a
    #: continuous run, so a block that would leak one row's state into the next is refused).
    @property
    def follows_rows(self) -> bool:
        return type(self).admit is not Block.admit and type(self).retire is not Block.retire

    def admit(self, rows: Tensor, prompts: list[int]) -> None:
        """New rows take the slots where ``rows`` (bool ``[batch]``) holds, before their prefill:
        forget every per-row thing those slots held (counters, queues, records, accumulators),
        so that a row behaves as if its run started now. Other slots are left as they are.
        ``prompts``: which prompt (its index in the run) each admitted slot now holds, in slot
        order (a block with per-prompt settings, e.g. one reference answer per prompt, reads
        them here). Called with every slot True before the first prefill of a continuous run.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement the row lifecycle (admit/retire)")

    def retire(self, slot: int, row: int) -> None:
        """The row ``row`` (its index among the run's prompts) has finished in ``slot``: keep what
        the block did or saw for it under ``row``, so that after the run :meth:`by_row` and the
        block's results list every prompt in prompt order, each entry equal to that prompt's run
        alone. The slot's state may then be overwritten (the next :meth:`admit` clears it).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement the row lifecycle (admit/retire)")

    def text_patterns(self) -> tuple[tuple[str, bool], ...]:
        """``(string, case_sensitive)`` keys the engine must follow for this block (by default,
        those of the triggers in its config)."""
        return self._from_config_triggers("text_patterns")

    def signal_triggers(self) -> tuple:
        """The :class:`~surgery.signals.OnSignal` rules in its config's triggers (checked on entry)."""
        return self._from_config_triggers("signal_triggers")

    def _from_config_triggers(self, method: str) -> tuple:
        """``method()`` of every trigger among the config's fields, concatenated."""
        found: tuple = ()
        for f in dataclasses.fields(self.config) if dataclasses.is_dataclass(self.config) else ():
            value = getattr(self.config, f.name)
            if hasattr(value, method):
                found += getattr(value, method)()
        return found

    def tensors(self) -> dict[str, Tensor]:
        """Tensor state saved beside the config (e.g. a steering vector); none by default."""
        return {}

    def to_dict(self) -> dict:
        """``{"block": name, "config": {...}}``, JSON-serialisable (:meth:`from_dict` reverses it)."""
        return {"block": self.name, "config": config_to_json(self.config)}

    @staticmethod
    def from_dict(data: dict, tensors: dict[str, Tensor] | None = None) -> Block:
        """The block ``data`` describes (a :meth:`to_dict`), with the :meth:`tensors` it had.

        The class is looked up in the registry by ``data["block"]``; the config's triggers and
        tuples are rebuilt from their JSON form, then :meth:`from_config` makes the block.
        """
        cls = block_class(data["block"])
        return cls.from_config(config_from_json(cls.config_class, data.get("config", {})), dict(tensors or {}))

    @classmethod
    def from_config(cls, config, tensors: dict[str, Tensor]) -> Block:
        """Build the block from its config and tensors: ``cls(**config fields, **tensors)``.

        Override when the constructor's arguments differ from the config's fields.
        """
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)}, **tensors)

    @classmethod
    def example(cls, model, prompts: Sequence[str] = (), identity: bool = False) -> Block:
        """A small instance that fits ``model`` for a run over ``prompts``, for the contract test.

        Every registered block offers one (``tests/test_block_contract.py`` runs over them all).
        A row's part of the example must not depend on the other rows (an instance made for
        ``[prompts[i]]`` treats that row as the one made for ``prompts`` does). With
        ``identity=True``: settings under which an intervention changes nothing (the tokens
        equal those of no block at all); probes ignore the flag.
        """
        raise NotImplementedError(f"{cls.__name__} must offer example(model, identity) for the block contract test")

    def by_row(self, rows: Sequence[int] | None = None) -> list | None:
        """What the block did (interventions) or saw (probes) in the last run, one entry per row.

        ``rows``: only these prompts' entries, in that order (default: every row). Under
        continuous batching a prompt's entry is readable as soon as it has retired
        (``tr.generate(..., on_row=...)``), while other prompts still run: a study appends each
        record when its row finishes. None when it keeps nothing per row. The contract test
        checks that a row's entry is the same when the row runs alone as in a batch, and, read
        the moment it retires, the same as after the run.
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class Intervention(Block):
    """A block that may change the tensor at its sites, or the tokens the engine emits.

    Override :meth:`edit` to change site tensors, :meth:`choose` to change tokens (forcing,
    replacing, stopping rows, recomputing a position), or both. Token edits run in the order
    the blocks were added; :meth:`choose` states the protocol.
    """

    def edit(self, site: str, value: Tensor, step: Step) -> Tensor:
        """Return the value at ``site`` for this step (the same tensor when nothing fires)."""
        raise NotImplementedError

    def choose(self, choice: TokenChoice) -> None:
        """Change the tokens about to be emitted; called once per generated token.

        Override it only in blocks that edit the token stream: the trace calls ``choose`` only
        on interventions that override it (:attr:`edits_tokens`). The engine builds one
        :class:`TokenChoice` per generated token, after the model's pick and before the tokens
        are emitted, and hands it to every such block in the order they were added, so a block
        sees what the blocks before it did. The protocol:

        - **read** ``choice.index``, ``step`` (the forward pass that made the logits: fed
          tokens, positions, think flags), ``logits``, ``chosen``, ``stops`` and ``finished``.
          All are device tensors: decide with tensor ops (``torch.where``, masks), never with a
          Python ``if`` on a value, which would wait on the GPU every step.
        - **replace** tokens with ``choice.replace(rows, tokens)``: ``rows`` is bool ``[batch]``,
          ``tokens`` ``[batch]``; whether those rows now stop is re-derived (the new token is an
          EOS). Finished rows are left alone.
        - **force** tokens that must not end the row (inserted words, an answer prompt) with
          ``choice.replace(rows, tokens, stop=False)``. One token per call: keep the rest of a
          longer insertion in the block and emit it on the next calls.
        - **stop** rows on this token with ``choice.forced_stop = choice.forced_stop | rows``;
          the row reports ``"block"``, or its own reason when its token stops it anyway.
        - **recompute** this position with extra hooks via ``choice.recompute(install)``:
          ``install()`` registers hooks and returns their handles; the engine rolls the KV cache
          back one position, re-runs it, removes the handles and returns new logits
          ``[batch, vocab]``. Pick from them and ``replace`` (see
          :class:`interventions.RepresentationRecycling`).

        Per-run state (queues, budgets) belongs on the block, cleared in :meth:`reset`.
        """

    @property
    def edits_tokens(self) -> bool:
        """Whether this class overrides :meth:`choose` (only those get token choices)."""
        return type(self).choose is not Intervention.choose

    # ---- a per-row parameter table (tr.generate(..., stacks=...): surgery.decode.row_tables) ----
    def table_key(self):
        """A hashable key, or None (the default: this block always runs on its own).

        Under a stack per row, the blocks at one site whose keys are equal, and of which no
        prompt carries two, are served by one operation over a per-row parameter table instead
        of one operation each (:mod:`surgery.decode.row_tables`): the key must hold everything
        that operation shares (the kind, the site, the trigger), :meth:`table_row` what differs.
        A block that returns a key implements :meth:`table_row`, :meth:`table_edit` and
        :meth:`keep_fired`.
        """
        return None

    def table_row(self) -> Tensor:
        """This block's parameters as one row of the table (a tensor of fixed shape)."""
        raise NotImplementedError

    def table_edit(self, site: str, value: Tensor, step: Step, table: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`edit` with each row's parameters read from ``table`` (``[batch, ...]``, row
        ``i`` the :meth:`table_row` of the block row ``i`` carries): the edited value and where
        it fired (bool ``[batch, pos]``, recorded by the table). Called on one block of the group,
        with ``step`` restricted to the rows that carry any of them."""
        raise NotImplementedError

    def keep_fired(self, row: int, positions: list[int]) -> None:
        """Keep ``positions`` (where the table fired on prompt ``row``) as this block's
        :meth:`~Block.by_row` entry of ``row``."""
        raise NotImplementedError

    @property
    def rerun_layer(self) -> int | None:
        """The lowest block this block's :meth:`TokenChoice.recompute` calls can change (valid
        after :meth:`bind`), or None. Declaring it lets the engine record the inputs of blocks
        from there up and re-run only those."""
        return None


class Probe(Block):
    """A block that only observes; it must never change the model's output.

    A probe may publish signals that triggers read in the same run
    (:class:`~surgery.signals.OnSignal`, :mod:`surgery.signals`): it names them in
    :meth:`signals`, makes ``self.signal_board = SignalBoard(self.signals())`` in :meth:`bind`,
    clears it in :meth:`reset` and writes them in ``observe`` with
    ``self.signal_board.publish(name, value, step)``.
    """

    def signals(self) -> dict:
        """Name -> :class:`~surgery.signals.SignalSpec` of what it publishes (valid after
        :meth:`bind`); none by default."""
        return {}

    signals_read: frozenset[str] = frozenset()  # what triggers read of its signals (use_signals)

    def use_signals(self, names: frozenset[str]) -> None:
        """Told by the trace on entry which of its signals some trigger reads: a probe publishes
        only those (none read: no work) and may compute them differently (without host syncs)."""
        self.signals_read = frozenset(names)

    def signal_hint(self) -> str:
        """Why an expected signal is missing, and the fix (e.g. a probe that needs a setting)."""
        return ""

    signal_board = None  # where it writes its signals (a surgery.signals.SignalBoard; see above)

    def observe(self, site: str, value: Tensor, step: Step) -> None:
        raise NotImplementedError

    def result(self) -> Any:
        """What the probe found in the last run."""
        raise NotImplementedError
