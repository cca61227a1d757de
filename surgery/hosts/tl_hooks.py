"""Our blocks as TransformerLens hook functions, for a bridge's own ``generate`` and ``run_with_hooks``.

:class:`TLHooks` turns interventions and probes into ``(hook_name, fn)`` pairs that a
``TransformerBridge`` runs itself: ``bridge.hooks(fwd_hooks=...)`` around ``bridge.generate``,
or ``bridge.run_with_hooks(..., fwd_hooks=...)``. Blocks see the same
:class:`~surgery.step.Step` as in our engine (fed tokens, positions from the attention mask,
``valid``, think state, text-matcher states, finished rows), so triggers fire at the same places
and greedy tokens equal those of ``surgery.trace(surgery.wrap(bridge), ...).generate``.

Where the Step comes from: no hook point exposes the attention mask or the KV cache, so while
the adapter is entered (``with TLHooks(...) as hooks:``) it holds one torch forward pre-hook on
``bridge.original_model`` that notes each forward's ``input_ids``, ``attention_mask`` and cache;
leaving the ``with`` removes it, also on an exception. The TL hooks themselves are TL's: the
bridge removes them when ``bridge.hooks(...)`` or ``run_with_hooks`` ends. A hook function
called outside the ``with`` raises instead of passing values through unedited.

When a run starts: every forward without a KV cache (or with an empty one) is a new run, a
prefill, and resets the blocks (as ``tr.generate``/``tr.run`` do); a forward with a cache is the
next decode step and must feed one token per row. A Step is built only in forwards where the
hook functions run, so other forwards inside the ``with`` leave the blocks alone.

Same rules as our engine: in a prefill that starts a KV cache (``bridge.generate``'s), blocks at
``logits`` see the last position only (the one that picks the first token); a fed token in
``eos_token_ids`` finishes its row, so the EOS that ``bridge.generate`` keeps feeding finished
rows is not valid.

What TransformerLens cannot express, said rather than done halfway:

- token-choice blocks (:attr:`~surgery.blocks.Intervention.edits_tokens`: thinking-token
  insertion, representation recycling): ``bridge.generate`` picks tokens inside its own loop and
  offers no way to change them or to roll back its KV cache. :class:`TLHooks` refuses them; run
  them with ``surgery.trace(surgery.wrap(bridge), ...)``.
- stop strings and ``stopping_criteria``: the adapter sees token ids only, so it knows that a
  row stopped only from ``eos_token_ids``; the token that completes a stop string stays valid.
- ``generate(use_past_kv_cache=False)`` re-feeds the whole sequence each step: each forward is
  then a new run (probes keep the last one only). Keep the default KV cache.
- ``run_with_hooks`` on strings of different lengths pads on the tokenizer's side (right, with no
  attention mask): the model and the blocks then take the pads for tokens. Pass
  ``padding_side="left"``, or token ids with ``attention_mask=``.
- ``do_sample=True`` samples with TransformerLens' sampler, not ours (same blocks, other draws).

Example (offline: the embedded SmolLM2, booted into a bridge in place)::

    import surgery, torch
    from interventions import SteeringVector, TokenMask
    from surgery.hosts.tl_hooks import TLHooks
    from surgery.triggers import OnText

    model = surgery.load()
    bridge = surgery.hosts.bridge.boot(model.module, model.tokenizer)
    steer = SteeringVector(torch.randn(model.d_model), layer=15, when=OnText("\\n\\n"))
    mask = TokenMask(["wait"], penalty=None)
    with TLHooks(bridge, steer, mask) as hooks, bridge.hooks(fwd_hooks=hooks.fwd_hooks()):
        tokens = bridge.generate(["What is 7 * 8?", "Is 56 even?"], max_new_tokens=32, do_sample=False,
                                 prepend_bos=False, return_type="tokens", verbose=False)
    steer.fired(), mask.fired()          # per row: the positions where each acted
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from surgery.decode.kv_cache import passed_cache
from surgery.sites import Site
from surgery.step import Step
from surgery.text_match import text_matchers
from surgery.signals import check_signal_reads
from surgery.decode.trace import add_routes, apply_blocks, check_blocks, refuse_token_choice

__all__ = ["TLHooks"]


class TLHooks:
    """Blocks bound to a ``TransformerBridge``, as TransformerLens forward hooks.

    Args:
        bridge: a ``TransformerBridge`` (not in compatibility mode) with a tokenizer.
        *blocks: interventions that edit site values (no token-choice blocks) and probes.
        eos_token_ids: the ids that stop a row in ``bridge.generate`` (its ``eos_token_id``;
            ``()`` with ``stop_at_eos=False``). Default: the model's EOS ids
            (:attr:`surgery.Model.eos_token_ids`).
        tokenizer: the tokenizer that decodes tokens for text triggers; default: the bridge's.

    Every block is checked against the model (``bind``) here, before anything is installed.
    Use it as a context manager (see the module docstring) and pass :meth:`fwd_hooks` to the
    bridge inside.

    Raises:
        ValueError: a token-choice block, or a block that does not fit the model.
        TypeError: ``bridge`` is not a ``TransformerBridge``, or a block is not a block.
    """

    def __init__(self, bridge, *blocks, eos_token_ids: Sequence[int] | None = None, tokenizer=None):
        from surgery.hosts.bridge import is_bridge
        from surgery.hosts.wrapping import wrap

        if not is_bridge(bridge):
            raise TypeError(f"TLHooks expects a TransformerLens TransformerBridge, got {type(bridge).__name__}")
        refuse_token_choice(blocks, "a generation emits, and bridge.generate picks its tokens inside its own loop, with "
                            "no hook to change them or to roll back its KV cache. Run token-choice blocks with our "
                            "engine on the same bridge: with surgery.trace(surgery.wrap(bridge), *blocks) as tr: "
                            "tr.generate(...)")
        self.bridge = bridge
        self.model = wrap(bridge, tokenizer)
        plans = check_blocks(self.model, blocks)
        check_signal_reads(self.model, [block for block, _ in plans], {id(block): sites for block, sites in plans})
        self.blocks = [block for block, _ in plans]
        self._routes: dict[str, tuple[list, list]] = {}
        add_routes(self._routes, plans)
        ids = self.model.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
        self._eos = torch.tensor(ids, dtype=torch.long, device=self.model.device)
        self._matchers = text_matchers(self.model, (p for block in self.blocks for p in block.text_patterns()))
        self._handle = None
        self._pending: tuple | None = None  # the inputs of the forward now running
        self._step: Step | None = None
        self._generating = False  # the current run's prefill started a KV cache

    # ---- lifetime ----------------------------------------------------------------------------
    def __enter__(self) -> TLHooks:
        if self._handle is not None:
            raise RuntimeError("this TLHooks is already entered: `with hooks:` once at a time")
        self._handle = self.model.module.register_forward_pre_hook(self._note_inputs, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> bool:
        self._handle.remove()
        self._handle, self._pending, self._step = None, None, None
        return False

    def fwd_hooks(self) -> list[tuple[str, Callable]]:
        """``(hook_name, fn)`` per site the blocks use, for ``bridge.hooks`` / ``run_with_hooks``.

        Each ``fn(tensor, hook)`` returns the edited tensor. The names are the bridge's hook
        points (:class:`surgery.hosts.bridge.BridgeArchitecture`), e.g. ``blocks.1.hook_in`` for
        ``resid_pre.1``.
        """
        hook_name = self.model.architecture.hook_name
        return [(hook_name(Site.parse(site)), self._hook_fn(site)) for site in self._routes]

    # ---- per forward -------------------------------------------------------------------------
    def _note_inputs(self, _module, args, kwargs) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        cache = passed_cache(kwargs)
        cached = cache is not None and cache.get_seq_length() > 0
        self._pending = (ids, kwargs.get("attention_mask"), cached, bool(kwargs.get("use_cache")))

    def _current_step(self) -> Step:
        if self._handle is None:
            raise RuntimeError(
                "a TLHooks hook function ran outside `with TLHooks(...) as hooks:`, where it cannot tell "
                "which tokens the forward feeds: enter the adapter around bridge.hooks(...) / run_with_hooks"
            )
        if self._pending is not None:  # the first of our hooks in this forward builds its Step
            self._step = self._next_step(*self._pending)
            self._pending = None
        return self._step

    def _next_step(self, ids: Tensor | None, mask: Tensor | None, cached: bool, starts_cache: bool) -> Step:
        if ids is None or ids.is_floating_point():
            raise ValueError("TLHooks needs the token ids each forward feeds; this forward got embeddings (inputs_embeds)")
        think_ids = self.model.think_token_ids
        if not cached:  # a new run: its prefill
            for block in self.blocks:
                block.reset(ids.shape[0])
            self._generating = starts_cache
            return Step.prefill(ids, torch.ones_like(ids) if mask is None else mask, think_ids, self._matchers)
        previous = self._step
        if previous is None or ids.shape != (previous.batch_size, 1):
            raise ValueError(
                f"TLHooks follows a generation one token per row after its prefill, but this forward feeds "
                f"{tuple(ids.shape)} tokens with a KV cache{'' if previous else ' and no prefill before it'}: "
                "start each run with a forward without a cache (bridge.generate does)"
            )
        fed = ids[:, 0]
        finished = previous.finished | torch.isin(fed, self._eos)  # as our engine: the fed stop token is not valid
        return previous.next(fed, finished, think_ids, self._matchers)

    def _hook_fn(self, site: str) -> Callable:
        interventions, probes = self._routes[site]

        def hook_fn(tensor: Tensor, hook=None) -> Tensor:
            step = self._current_step()
            if site == "logits" and step.is_prefill and self._generating and tensor.shape[1] > 1:
                # our engine's prefill asks the head for the last position only
                last = apply_blocks(site, tensor[:, -1:], step, interventions, probes)
                return torch.cat([tensor[:, :-1], last], dim=1)
            return apply_blocks(site, tensor, step, interventions, probes)

        hook_fn.__name__ = f"surgery_{site.replace('.', '_')}"
        return hook_fn

    def __repr__(self) -> str:
        return f"TLHooks({', '.join(map(repr, self.blocks))})"
