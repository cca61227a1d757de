"""The model calls of one generation: the prefill, one fed token per step, and re-runs.

:class:`Forward` owns what the decode loop (:mod:`surgery.decode.engine`) hands the model each step:
the KV cache (:mod:`surgery.decode.kv_cache`, dynamic or static), the attention mask and the current
:class:`~surgery.step.Step`, announced to the trace before every pass. With ``rerun_from``
it records the inputs of the blocks from there up (:mod:`surgery.decode.partial_rerun`), so a
recompute runs only those; with ``compile_options`` the decode step runs through
``torch.compile`` (the prefill and re-runs stay eager).

Example::

    forward = Forward(model, Step.prefill(ids, mask), mask, on_step=None, cache="static", max_new_tokens=32)
    logits = forward.prefill(ids)                       # [batch, vocab], float32
    logits = forward.feed(logits.argmax(-1), finished, think_ids, matchers)
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from surgery.decode.block_regions import mark_block_regions
from surgery.decode.kv_cache import cache_keyword, new_cache, read_cache_under_either_name, rollback
from surgery.model import Model
from surgery.decode.partial_rerun import LayerInputs, supports_partial_rerun
from surgery.step import Step

__all__ = ["Forward", "compile_options"]


def _forward_options(module) -> dict:
    options = {"use_cache": True, "return_dict": True}
    if "logits_to_keep" in inspect.signature(module.forward).parameters:
        options["logits_to_keep"] = 1
    return options


class Forward:
    """The model calls of one generation: the prefill, one fed token per step, and re-runs.

    Holds the KV cache (:mod:`surgery.decode.kv_cache`), the attention mask and the current
    :class:`Step`, and tells ``on_step`` about every pass just before it runs. Each call returns
    the last position's logits, float32 ``[batch, vocab]``. With ``rerun_from`` set (a block
    index), it records the inputs of blocks from there up at every forward, so a re-run can
    start at such a block (:mod:`surgery.decode.partial_rerun`).
    """

    def __init__(
        self,
        model: Model,
        step: Step,
        attention_mask: Tensor,
        on_step: Callable[[Step | None], None] | None,
        cache: str = "dynamic",
        max_new_tokens: int = 1,
        rerun_from: int | None = None,
        compile_options: dict | None = None,
    ):
        module = model.module
        self.module, self.step, self.on_step = module, step, on_step
        self.options = _forward_options(module)
        self.cache_keyword = cache_keyword(module)  # "cache" on transformers >= 5.24
        read_cache_under_either_name(module)  # TransformerLens 4.3 on transformers >= 5.24 (surgery.decode.kv_cache)
        # the decode step, compiled when asked (the prefill and re-runs stay eager), its decoder
        # blocks compiled once for all layers unless the options say "regions": False
        torch_options = dict(compile_options or {})
        regions = torch_options.pop("regions", True)  # ours, not torch.compile's
        self.decode = module if compile_options is None else torch.compile(module.forward, **torch_options)
        self.static = cache == "static"
        self.cache = new_cache(cache, module.config, attention_mask.shape[1] + max_new_tokens)
        if bool(attention_mask.all()):
            self.mask = None  # model.generate drops an all-ones mask (the model builds a causal one)
        elif self.static:
            # one mask for the whole run: the cache's length, ones after the prompt (the causal
            # mask hides positions not written yet), so no step changes its shape or address
            self.mask = torch.cat([attention_mask, attention_mask.new_ones(len(attention_mask), max_new_tokens)], dim=1)
        else:
            self.mask = attention_mask
        self.inputs = None
        if rerun_from is not None and supports_partial_rerun(model.architecture):
            self.inputs = LayerInputs(module, model.architecture, rerun_from % model.n_layers)
        self.n_layers = model.n_layers
        self._unmark = lambda: None  # last: nothing after it may fail and leave the marks on
        if compile_options is not None and regions:
            self._unmark = mark_block_regions(model.architecture.block_list(module))

    def _call(self, input_ids: Tensor, step: Step, module=None) -> Tensor:
        with _guard_hooks() if module is not None and module is not self.module else contextlib.nullcontext():
            output = (module or self.module)(
                input_ids=input_ids, attention_mask=self.mask, position_ids=step.positions,
                **{self.cache_keyword: self.cache}, **self.options,
            )
        return output.logits[:, -1].to(dtype=torch.float32, copy=True)

    def _announce(self, step: Step) -> None:
        if self.on_step is not None:
            self.on_step(step)

    def prefill(self, input_ids: Tensor) -> Tensor:
        """Run the whole (left-padded) prompt."""
        self._announce(self.step)
        return self._call(input_ids, self.step)

    def feed(self, chosen: Tensor, finished: Tensor, think_ids, matchers) -> Tensor:
        """Feed the tokens just emitted (``[batch]``) as the next step.

        ``finished`` includes the rows that stopped on the token being fed: the model still
        computes that position (the batch runs on), but it is not valid, so no block acts on or
        records a token the row never feeds when it runs alone.
        """
        self.step = self.step.next(chosen, finished, think_ids, matchers)
        self._announce(self.step)
        if self.mask is not None and not self.static:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(chosen), 1)], dim=1)
        return self._call(chosen[:, None], self.step, self.decode)

    def recompute(self, install: Callable[[], list], from_layer: int | None = None) -> Tensor:
        """Re-run the current step's last position with the hooks ``install`` adds.

        With ``from_layer`` (a block index) and the inputs of that block recorded, only blocks
        ``from_layer`` and up run again, on their recorded inputs, with their KV cache rolled
        back one position (blocks below would recompute the same values); otherwise the whole
        model re-runs, every layer's cache rolled back.
        """
        start = None if from_layer is None else from_layer % self.n_layers
        partial = self.inputs is not None and start is not None and start >= self.inputs.first and self.inputs.ready
        rollback(self.cache, range(start, self.n_layers) if partial else None)
        handles = install()
        last = self.step.tail(1)
        try:
            self._announce(dataclasses.replace(last, is_rerun=True))
            return self.inputs.rerun(start) if partial else self._call(last.token_ids, last)
        finally:
            for handle in handles:
                handle.remove()
            self._announce(self.step)

    def close(self) -> None:
        """Remove the recording hooks, if any, and the blocks' compile-region marks."""
        self._unmark()
        if self.inputs is not None:
            self.inputs.remove()


def _guard_hooks():
    """Make a compiled step check the modules' hooks: torch.compile skips those guards by
    default, and would then replay a step compiled with another trace's blocks. Each stack of
    blocks (and each batch shape) is a compile of the same forward: allow more than the
    default 8 before torch.compile gives up."""
    return torch._dynamo.config.patch(skip_nnmodule_hook_guards=False, recompile_limit=64)


def compile_options(compile, cache: str, device: torch.device) -> dict | None:
    """What ``torch.compile`` gets for the decode step, or None to run it eagerly."""
    if compile is False or compile is None:
        return None
    if cache != "static":
        raise ValueError("compile needs cache='static' (a compiled step must see the same KV memory every step)")
    if compile is True:
        # on CUDA, "reduce-overhead" replays the step as a CUDA graph
        return {"mode": "reduce-overhead", "fullgraph": True} if device.type == "cuda" else {"fullgraph": True}
    if not isinstance(compile, dict):
        raise ValueError(f"compile must be True, False or a dict of torch.compile options, got {compile!r}")
    if not isinstance(compile.get("regions", True), bool):
        raise ValueError(f"compile['regions'] must be True or False, got {compile['regions']!r}")
    return dict(compile)
