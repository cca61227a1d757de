"""The Trace: attach blocks to a model for the length of a ``with`` block.

Entering a trace checks every block against the model, then installs one hook per site used;
leaving it removes every hook, also when the body raises, so the model afterwards computes
exactly what it computed before. Blocks act only inside ``tr.generate`` and ``tr.run``: a
forward pass the user makes on ``model.module`` directly inside the ``with`` block passes
through the hooks untouched (there is no :class:`~surgery.step.Step` to decide triggers).

At one site, interventions run in the order they were added and probes then see the value
after all of them. When the engine recomputes a position (representation recycling), the
interventions edit the re-run too, but probes are not called again: they keep the first pass. One trace at a time per model: a second, nested one is refused (add all the
blocks to one trace instead).

Example:
    >>> import surgery, torch
    >>> from interventions import ResidualAdd
    >>> from surgery.triggers import OnTokens
    >>> model = surgery.load()                                                  # doctest: +SKIP
    >>> add = ResidualAdd(torch.zeros(model.d_model), site="resid_pre.10", when=OnTokens("\\n\\n"))  # doctest: +SKIP
    >>> with surgery.trace(model, add) as tr:                                   # doctest: +SKIP
    ...     out = tr.generate(["What is 7 * 8?"], max_new_tokens=32, chat=True)
    >>> add.fired()                                                             # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from surgery.decode import engine
from surgery.decode.generation_output import FinishedRow
from surgery.blocks import Block, Intervention, Probe
from surgery.model import Model
from surgery.decode.row_stacks import RowStacks
from surgery.signals import check_signal_reads
from surgery.sites import Site, hook_site
from surgery.step import Step

__all__ = ["Trace", "add_routes", "apply_blocks", "apply_to_slots", "check_blocks", "refuse_token_choice", "trace", "untraced"]


class Trace:
    """A context in which blocks are attached to a model; see the module docstring."""

    def __init__(self, model, blocks=()):
        if not isinstance(model, Model):
            raise TypeError(
                f"surgery.trace expects a surgery Model, got {type(model).__name__}: "
                "use surgery.load(...) or surgery.wrap(hf_model, tokenizer) first"
            )
        self.model = model
        self.blocks: list[Block] = []
        self._pending = list(blocks)
        self._routes: dict[str, tuple[list[Intervention], list[Probe]]] = {}
        self._handles = []
        self._sites: dict[int, list[str]] = {}  # block id -> its canonical sites
        self._step: Step | None = None
        self._stacks: RowStacks | None = None  # a stack per row (tr.generate(..., stacks=...))
        self._active = False

    # ---- context -----------------------------------------------------------------------------
    def __enter__(self) -> Trace:
        active = self.model._active_trace
        if active is not None:
            raise RuntimeError(
                f"a trace is already active on {self.model.name}: traces do not nest. "
                "Add all blocks to one trace (surgery.trace(model, a, b) or tr.add(block))."
            )
        self.model._active_trace = self
        self._active = True
        try:
            self._attach(self._pending)
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self._detach()
        return False

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._routes.clear()
        self._sites.clear()
        self._step = None
        self._active = False
        if self.model._active_trace is self:
            self.model._active_trace = None

    # ---- blocks ------------------------------------------------------------------------------
    def add(self, block):
        """Attach one more block; returns it (handy for probes: ``mi = tr.add(Probe(...))``)."""
        if not self._active:
            raise RuntimeError("tr.add(block) works inside the `with surgery.trace(...) as tr:` block")
        self._attach([block])
        return block

    def _attach(self, blocks) -> None:
        plans = check_blocks(self.model, blocks, attached=self.blocks)
        sites = {**self._sites, **{id(block): block_sites for block, block_sites in plans}}
        check_signal_reads(self.model, [*self.blocks, *(block for block, _ in plans)], sites)
        self._sites = sites
        for site in add_routes(self._routes, plans):
            module, kind = self.model.architecture.module_for(self.model.module, Site.parse(site))
            self._handles.append(hook_site(module, kind, self._router(site)))
        self.blocks.extend(block for block, _ in plans)

    def _router(self, site: str):
        def route(value: Tensor) -> Tensor:
            step = self._step
            if step is None:
                return value
            if step.slots is not None:  # rows admitted into a slot pool: blocks see every slot
                return apply_to_slots(site, value, step, *self._routes[site], self._stacks)
            return apply_blocks(site, value, step, *self._routes[site], self._stacks)

        return route

    def _on_step(self, step: Step | None) -> None:
        self._step = step

    def _begin(self, prompts, batch_size: int | None = None, every_slot: bool = False) -> None:
        """Clear every block's per-run state before a run over ``prompts`` (through
        ``batch_size`` slots under continuous batching; all of them when late rows may come)."""
        batch = 1 if isinstance(prompts, str) else len(prompts)
        if batch_size is not None:
            batch = batch_size if every_slot else min(batch, batch_size)
            lost = [type(block).__name__ for block in self.blocks if not block.follows_rows]
            if lost:
                raise ValueError(
                    f"batch_size (continuous batching) needs blocks that follow rows through their slots, and "
                    f"{', '.join(lost)} do(es) not implement admit/retire (surgery.blocks.Block.admit): run without "
                    "batch_size, or implement them"
                )
        self._slot_count = batch
        for block in self.blocks:
            block.reset(batch)

    # ---- running -----------------------------------------------------------------------------
    def _require_active(self) -> None:
        if not self._active:
            raise RuntimeError("use tr.generate / tr.run inside the `with surgery.trace(...) as tr:` block")

    def generate(
        self, prompts, max_new_tokens: int | Sequence[int] = 64, *, stacks: Sequence[Sequence[Block]] | None = None,
        on_row: Callable[[FinishedRow], None] | None = None, **options,
    ) -> engine.GenerationOutput:
        """Generate with every attached block active; options as :func:`surgery.generate`.

        ``stacks``: one list per prompt of the attached blocks that prompt carries (a stack per
        row, :mod:`surgery.decode.row_stacks`): a block acts on, and records, only the rows that carry
        it, and each prompt gets what it gets alone under its own stack. A block's
        :meth:`~surgery.blocks.Block.by_row` then has an entry for every prompt (empty where
        the prompt does not carry it). Blocks of one kind at one site with different parameters
        (a steering vector per prompt) run as one operation over a per-row table
        (:mod:`surgery.decode.row_tables`). None: every prompt carries every block.

        ``on_row``: called with each prompt's :class:`~surgery.decode.generation_output.FinishedRow`
        once every block has it: under continuous batching the moment the row leaves its slot
        (read its blocks' entries then with ``block.by_row(rows=[row.row])``: a study saves each
        record so, and a kill loses only the rows in flight); otherwise for every row at the end.
        """
        self._require_active()
        n_prompts = 1 if isinstance(prompts, str) else len(prompts)
        late = options.get("late_rows")
        self._begin(prompts, options.get("batch_size"), every_slot=late is not None)
        self._stacks = None
        pooled = options.get("batch_size") is not None or not isinstance(max_new_tokens, int)  # a slot pool
        if stacks is not None:
            if isinstance(stacks, (str, bytes)) or len(stacks) != n_prompts:
                raise ValueError(f"stacks needs one list of blocks per prompt ({n_prompts})")
            slots = n_prompts if options.get("batch_size") is None else min(n_prompts, options["batch_size"])
            slots = self._slot_count if late is not None else slots
            self._stacks = RowStacks(self.blocks, stacks, slots, self.model.device, self._sites)
            if late is not None:  # each late row's stack joins the table of stacks as it comes
                options = {**options, "late_rows": dataclasses.replace(late, take=self._stacks.taking(late.take))}
            if not pooled:
                self._stacks.admit(list(range(n_prompts)), list(range(n_prompts)))
        choosers = [b for b in self.blocks if isinstance(b, Intervention) and b.edits_tokens]

        def on_choose(choice) -> None:
            for block in choosers:
                if self._stacks is None:
                    block.choose(choice)
                else:
                    self._stacks.choose(block, choice)

        rerun_layers = [block.rerun_layer for block in choosers if block.rerun_layer is not None]
        if options.get("compile"):
            eager = [type(block).__name__ for block in self.blocks if not block.graph_safe]
            if eager:
                warnings.warn(
                    f"compile: {', '.join(eager)} keep(s) per-step state on the host (not graph_safe), so this "
                    "run decodes eagerly; attach only graph-safe blocks to compile the decode step",
                    stacklevel=2,
                )
                options = {**options, "compile": False}
        out = engine.generate(
            self.model,
            prompts,
            max_new_tokens,
            on_step=self._on_step,
            on_choose=on_choose if choosers else None,
            text_patterns=self._text_patterns(),
            rerun_from=min(rerun_layers, default=None),
            on_admit=self._admit,
            on_retire=self._retire,
            on_row=on_row if pooled else None,
            **options,
        )
        if self._stacks is not None and not pooled:
            self._stacks.finish(n_prompts)
        if on_row is not None and not pooled:  # a fixed batch: every row is final now
            for row in range(n_prompts):
                on_row(out.row(row))
        return out

    def _admit(self, slots: list[int], rows: list[int]) -> None:
        """Prompts ``rows`` take ``slots`` (continuous batching): every block forgets those slots."""
        if self._stacks is not None:
            self._stacks.admit(slots, rows)
        admitted = torch.zeros(self._slot_count, dtype=torch.bool, device=self.model.device)
        admitted[slots] = True
        prompts = [row for _, row in sorted(zip(slots, rows))]
        for block in self.blocks:
            block.admit(admitted, prompts)

    def _retire(self, slot: int, row: int) -> None:
        for block in self.blocks:
            block.retire(slot, row)
        if self._stacks is not None:
            self._stacks.retire(slot, row)

    def run(self, prompts, *, chat: bool = False) -> Tensor:
        """One forward pass with every attached block active: logits ``[batch, pos, vocab]``."""
        self._require_active()
        self._begin(prompts)
        return engine.run(self.model, prompts, chat=chat, on_step=self._on_step, text_patterns=self._text_patterns())

    def _text_patterns(self) -> tuple[tuple[str, bool], ...]:
        return tuple(dict.fromkeys(p for block in self.blocks for p in block.text_patterns()))


def check_blocks(model: Model, blocks, attached=()) -> list[tuple[Block, list[str]]]:
    """Check ``blocks`` against ``model`` before any hook is installed; return their sites.

    Each must be an Intervention or a Probe, not among ``attached`` nor given twice, and pass
    its :meth:`~surgery.blocks.Block.bind`. Returns ``(block, canonical sites)`` per block, so a
    bad block raises while the model is still untouched.
    """
    plans: list[tuple[Block, list[str]]] = []
    for block in blocks:
        if not isinstance(block, (Intervention, Probe)):
            raise TypeError(f"blocks are Interventions or Probes, got {type(block).__name__}")
        if any(block is b for b in attached) or any(block is b for b, _ in plans):
            raise ValueError(f"{block!r} is already attached (or given twice)")
        block.bind(model)  # first: a block may derive its sites from the model
        plans.append((block, [model.resolve_site(s).canonical for s in block.sites()]))
    return plans


def refuse_token_choice(blocks, why: str) -> None:
    """Raise ValueError when ``blocks`` hold token-choice interventions (they override
    :meth:`~surgery.blocks.Intervention.choose`) that a host's own loop cannot run; ``why`` says
    why not and what runs them instead."""
    choosers = [block for block in blocks if isinstance(block, Intervention) and block.edits_tokens]
    if choosers:
        raise ValueError(f"{', '.join(type(block).__name__ for block in choosers)} change(s) the tokens {why}")


def add_routes(routes: dict[str, tuple[list, list]], plans) -> list[str]:
    """File each block of ``plans`` (from :func:`check_blocks`) under its sites in ``routes``
    (site -> (interventions, probes), in the order given); return the sites new to ``routes``."""
    new = []
    for block, sites in plans:
        for site in dict.fromkeys(sites):
            if site not in routes:
                routes[site] = ([], [])
                new.append(site)
            interventions, probes = routes[site]
            (interventions if isinstance(block, Intervention) else probes).append(block)
    return new


def apply_blocks(site: str, value: Tensor, step: Step, interventions, probes, stacks: RowStacks | None = None) -> Tensor:
    """Pass one site's value through its blocks for one forward: the interventions edit it in
    order, then the probes see the result (not on a re-run). ``step`` is aligned to the value's
    positions first (:meth:`~surgery.step.Step.tail`). With ``stacks`` (a stack per row) each
    block sees its own rows only and edits only those (:mod:`surgery.decode.row_stacks`)."""
    step = step.tail(value.shape[1])
    for block in interventions:
        if stacks is None:
            value = block.edit(site, value, step)
        else:
            value = stacks.edit(block, site, value, step)
    if not step.is_rerun:  # probes see a recomputed position's first pass only
        for probe in probes:
            probe.observe(site, value, step if stacks is None else stacks.step_for(probe, step))
    return value


def apply_to_slots(site: str, value: Tensor, step: Step, interventions, probes, stacks: RowStacks | None = None) -> Tensor:
    """:func:`apply_blocks` for the prefill of rows admitted into a slot pool: ``value`` holds
    the admitted rows (in ``step.slots`` order), the blocks see a pool-wide tensor (the other
    slots zeros, not valid in ``step``) and the admitted rows' part comes back."""
    index = torch.tensor(step.slots, device=value.device)
    pooled = value.new_zeros((step.batch_size, *value.shape[1:])).index_copy(0, index, value)
    return apply_blocks(site, pooled, step, interventions, probes, stacks).index_select(0, index)


@contextlib.contextmanager
def untraced(model):
    """Forwards made inside see the plain model, even while a trace of ``model`` generates (a
    probe reading a finished row mid-run, e.g. ``ReasoningGraph(steps="released")``): the step
    the engine announced to the trace is withdrawn, so its hooks pass values through untouched
    (no intervention edits them, no probe records them), and announced again on leaving.

    Example:
        >>> with untraced(surgery.load()):                    # doctest: +SKIP
        ...     logits = model.module(ids).logits              # no block sees this forward
    """
    active = getattr(model, "_active_trace", None)
    step = None if active is None else active._step
    if step is None:
        yield
        return
    active._on_step(None)
    try:
        yield
    finally:
        active._on_step(step)


def trace(model, *blocks) -> Trace:
    """Open a trace on ``model`` with ``blocks`` attached: ``with surgery.trace(model, b) as tr:``."""
    return Trace(model, blocks)
