"""Our blocks inside nnsight's own tracing: ``blocks.step()`` in ``lm.generate`` or ``lm.trace``.

:class:`NNsightBlocks` binds interventions and probes to an nnsight model (``LanguageModel``, or
``NNsight`` around an HF causal LM) once, outside any trace. Inside the user's ``with`` block,
one call per forward pass, ``blocks.step()``:

1. reads the forward's inputs (``lm.inputs``: ids, attention mask, KV cache) and builds the
   :class:`~surgery.step.Step` our engine would: at the prefill (an empty cache) with
   :meth:`Step.prefill <surgery.step.Step.prefill>` (positions from the attention mask, padding
   not valid; every block is :meth:`~surgery.blocks.Block.reset` here, so each run starts
   clean), in a decode step with :meth:`Step.next <surgery.step.Step.next>` from the previous
   one (text matchers and the think state carried per row; a row is finished, and its fed
   tokens not valid, from the step that feeds the EOS it chose: HF then feeds pad ids);
2. visits each site the blocks use, in forward order, as nnsight requires: ``resid_pre.L`` is
   ``layers[L].input``, ``resid_post.L`` ``layers[L].output``, ``attn_out.L`` the attention's
   ``output[0]``, ``mlp_out.L`` the MLP's ``output``, ``logits`` the head's ``output`` (in a
   generate's prefill only the last position: blocks see ``step.tail``, as in our trace);
   interventions ``edit`` in the order given, probes then ``observe``, and an edited value is
   written back to nnsight.

Results come from the blocks themselves, as after :func:`surgery.trace`: ``steer.fired()``,
``mask.by_row()``, ``mi.result()``. No hook is installed and nothing is kept on the model, so
once the ``with`` block ends, normally or by an exception, the model computes what it did before.

What nnsight cannot express, refused at construction rather than done partly:
    * token-choice blocks (those that override :meth:`~surgery.blocks.Intervention.choose`:
      thinking-token insertion, representation recycling): HF's generate picks the tokens, and
      no block can force, replace or recompute them there. Use ``surgery.trace(surgery.wrap(lm),
      ...)``, which runs them on the same module.
    * a ``generate`` without the KV cache (``use_cache=False``) is refused at the first step.

The caller must keep to the following (checked where it can be, at each step):
    * call ``blocks.step()`` once in every forward pass, from the prefill on (``for _ in
      tracer.all()``, or ``tracer.iter[:max_new_tokens]``), in one invoke that holds every row;
      a step missed is an error, not a silent drift of the triggers;
    * tell the adapter the EOS ids ``lm.generate`` stops on when they are not the model's
      generation config's (``eos_token_id=`` there, ``eos_token_ids=`` here). Rows stopped by
      HF's ``stop_strings=`` are not seen as finished (their padding stays valid).

Untested here: remote execution (NDIF). ``surgery.wrap`` refuses a model whose weights are not
loaded locally, because binding a block (MI's answer states, vocabulary masks) runs the model
here; and the blocks are Python objects whose state would live on the client, where a remote
run only sends back saved values. vLLM-backed nnsight models expose no HF modules and are
refused by ``surgery.wrap``.

Example (tested in ``tests/test_nnsight_blocks.py``)::

    from nnsight import LanguageModel
    lm = LanguageModel(hf_model, tokenizer=tokenizer)
    steer = SteeringVector(vector, layer=1)              # SEAL: "\\n\\n" inside <think>
    mask = TokenMask(["Wait"], penalty=-3.0)
    mi = MIEstimator(answers=["56", "8"])
    blocks = NNsightBlocks(lm, steer, mask, mi)
    with lm.generate(max_new_tokens=32, do_sample=False) as tracer:
        with tracer.invoke(["What is 7 * 8?", "3 + 5?"]):
            for _ in tracer.all():
                blocks.step()
        with tracer.invoke():                            # survives rows stopping early
            ids = tracer.result.save()
    steer.fired(), mask.by_row(), mi.result().values, blocks.generated(ids)

nnsight ends an open ``tracer.all()`` loop with a UserWarning ("... was never reached"), by
design; the second invoke keeps the result when every row stops before ``max_new_tokens``. One
forward pass (wrap it in ``torch.no_grad()``: nnsight's trace records gradients)::

    with torch.no_grad(), lm.trace(["What is 7 * 8?", "3 + 5?"]):
        blocks.step()
        logits = lm.lm_head.output.save()                # after the blocks' edits
"""

from __future__ import annotations

import torch
from torch import Tensor

from surgery.blocks import Intervention, Probe
from surgery.decode.kv_cache import passed_cache
from surgery.sites import Site
from surgery.step import Step
from surgery.text_match import text_matchers
from surgery.signals import check_signal_reads
from surgery.decode.trace import add_routes, apply_blocks, check_blocks, refuse_token_choice

__all__ = ["NNsightBlocks"]

# Within one block the forward computes these in this order (the logits come after every block).
_ORDER = {"resid_pre": 0, "attn_out": 1, "mlp_out": 2, "resid_post": 3}


class NNsightBlocks:
    """Interventions and probes bound to an nnsight model, applied by :meth:`step` inside its traces.

    Args:
        lm: an nnsight ``LanguageModel`` (or ``NNsight`` with ``tokenizer``), loaded locally.
        *blocks: interventions and probes, as for :func:`surgery.trace` (interventions edit
            in this order at a site; probes see the value after them).
        tokenizer: for a plain ``NNsight``, which has none.
        eos_token_ids: the ids on which ``lm.generate`` ends a row; default: the model's
            generation config's (what HF's generate stops on unless told otherwise).

    Raises:
        ValueError: a token-choice block (see the module docstring), a site the model does not
            have, a block attached twice, or anything :func:`surgery.wrap` or a block's
            ``bind`` refuses.
        TypeError: something that is not an intervention or a probe.

    Example: see the module docstring.
    """

    def __init__(self, lm, *blocks, tokenizer=None, eos_token_ids=None):
        from surgery.hosts.wrapping import wrap

        self.lm = lm
        self.model = model = wrap(lm, tokenizer)
        refuse_token_choice(blocks, "generation emits (overriding choose()), and inside nnsight's lm.generate the "
                            "tokens are picked by HF's generate, where no block can reach them: use "
                            "surgery.trace(surgery.wrap(lm), ...) for it, which runs on the same model")
        plans = check_blocks(model, blocks)
        check_signal_reads(model, [block for block, _ in plans], {id(block): sites for block, sites in plans})
        self.blocks = tuple(block for block, _ in plans)
        routes: dict[str, tuple[list[Intervention], list[Probe]]] = {}
        add_routes(routes, plans)
        self._sites = [(site, *self._place(Site.parse(site)), *routes[site]) for site in sorted(routes, key=_forward_rank)]
        if eos_token_ids is None:
            eos_token_ids = getattr(model.module.generation_config, "eos_token_id", None)
        eos_token_ids = [] if eos_token_ids is None else [eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids
        self.eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=model.device)
        self._matchers = text_matchers(model, (p for block in self.blocks for p in block.text_patterns()))
        self._step: Step | None = None
        self._seen = 0  # positions fed so far in this run (what the KV cache must hold)

    def _place(self, site: Site) -> tuple[object, str]:
        """The nnsight envoy that holds ``site`` and the attribute to read (input or output)."""
        architecture = self.model.architecture
        if site.kind == "logits":
            path = architecture.head
        else:
            path = f"{architecture.blocks}.{site.layer}"
            if site.kind in ("attn_out", "mlp_out"):
                path += "." + (architecture.attn if site.kind == "attn_out" else architecture.mlp)
        envoy = self.lm
        try:
            for part in path.split("."):
                envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        except (AttributeError, IndexError) as error:
            raise ValueError(
                f"site {site} lives at module {path!r} in surgery's {architecture.name} table, but this nnsight "
                f"model has no such module ({error}): check surgery.sites.ARCHITECTURES for this model"
            ) from None
        return envoy, "input" if site.kind == "resid_pre" else "output"

    # ---- inside the trace --------------------------------------------------------------------
    def step(self) -> Step:
        """Apply the blocks to the current forward pass; call it once per step, inside the trace.

        Returns the :class:`~surgery.step.Step` the blocks saw.
        """
        args, kwargs = self.lm.inputs  # first: the root's inputs come before every site
        ids = args[0] if args else kwargs["input_ids"]
        if kwargs.get("use_cache") is False:
            raise ValueError("NNsightBlocks needs the KV cache in lm.generate: leave use_cache at its default (True)")
        cache = passed_cache(kwargs)
        cached = 0 if cache is None else cache.get_seq_length()
        if cached == 0:
            step = self._prefill(ids, kwargs.get("attention_mask"))
        else:
            step = self._decode(ids, cached)
        self._step, self._seen = step, cached + ids.shape[1]
        for site, envoy, attribute, interventions, probes in self._sites:
            served = getattr(envoy, attribute)
            value = served[0] if isinstance(served, tuple) else served
            edited = apply_blocks(site, value, step, interventions, probes)  # prefill logits: last position only
            if edited is not value:
                setattr(envoy, attribute, (edited, *served[1:]) if isinstance(served, tuple) else edited)
        return step

    def _prefill(self, ids: Tensor, attention_mask: Tensor | None) -> Step:
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        for block in self.blocks:
            block.reset(ids.shape[0])
        return Step.prefill(ids, attention_mask, self.model.think_token_ids, self._matchers)

    def _decode(self, ids: Tensor, cached: int) -> Step:
        before = self._step
        if before is None or cached != self._seen or ids.shape != (before.batch_size, 1):
            raise RuntimeError(
                f"blocks.step() did not see every forward pass of this run (the cache holds {cached} positions, "
                f"the blocks saw {self._seen}): call it once per step from the prefill on, "
                "`for _ in tracer.all(): blocks.step()`, in one invoke holding every row"
            )
        fed = ids[:, 0]
        # A row is finished from the step that feeds the EOS it chose (HF then feeds pad ids).
        finished = before.finished | torch.isin(fed, self.eos)
        return before.next(fed, finished, self.model.think_token_ids, self._matchers)

    # ---- after the trace ---------------------------------------------------------------------
    def generated(self, ids: Tensor) -> list[list[int]]:
        """The generated tokens per row of ``lm.generate``'s result (prompt and padding removed),
        each row cut after its EOS: :attr:`surgery.GenerationOutput.token_ids` of the last run."""
        if self._step is None:
            raise RuntimeError("no run yet: blocks.generated(ids) reads the last lm.generate that called blocks.step()")
        prompt = self._seen - self._step.index  # the prefill's width (one position per decode step)
        rows, eos = [], set(self.eos.tolist())
        for row in ids[:, prompt:].tolist():
            stop = next((i for i, token in enumerate(row) if token in eos), len(row) - 1)
            rows.append(row[: stop + 1])
        return rows

    def __repr__(self) -> str:
        return f"NNsightBlocks({self.model.name}, {', '.join(map(repr, self.blocks))})"


def _forward_rank(site: str) -> tuple[float, int]:
    parsed = Site.parse(site)
    return (float("inf"), 0) if parsed.kind == "logits" else (float(parsed.layer), _ORDER[parsed.kind])
