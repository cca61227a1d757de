"""Compile a model's decoder block once, not once per layer: the first compile of a decode step, shortened.

``torch.compile`` of a whole decode step inlines every decoder block, so inductor compiles the
same block code ``n_layers`` times (30 for SmolLM2). While a compiled generation runs,
:func:`mark_block_regions` marks each block's ``forward`` as one
``torch.compiler.nested_compile_region``: dynamo traces the block once and stamps it out for the
others, still inside ONE graph (what a CUDA graph needs). A hook on a block itself (the sites
``resid_pre`` and ``resid_post``) runs outside the region; a hook inside a block (``attn_out``,
``mlp_out``) makes dynamo inline that block, traced and compiled on its own as before (torch
checks each reuse, so the tokens never change: tested against the eager step). A recompile with
dynamic shapes (dynamo's answer to a second cache length in one process, as fixed batches of
different prompt lengths give) inlines every block as before (seen with torch 2.13: tracing the
region under symbolic shapes meets side effects, and dynamo falls back to inlining it). Outside
a compile the marked forward is the block's own forward, called directly.

On SmolLM2 on a 2-thread CPU the first inductor compile of a pool of 8 slots with a steering
vector and a token mask took 44 s without the regions and 26 s with them, 10 s from the on-disk
cache in a second process (``benchmarks/bench_first_compile.py``, ``benchmarks/RESULTS.md``).

Example::

    unmark = mark_block_regions(model.module.model.layers)   # while the compiled step runs
    try:
        ...
    finally:
        unmark()
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["mark_block_regions"]

_MARKED: dict[type, Callable] = {}  # a block class -> its marked forward (one function per class)


def mark_block_regions(blocks: Iterable[nn.Module]) -> Callable[[], None]:
    """Mark each of ``blocks`` (all of one class) as one nested compile region; returns the undo.

    Blocks whose ``forward`` is already set on the instance (another tool's wrapper) or of
    differing classes are left as they are: the undo then does nothing to them.
    """
    blocks = list(blocks)
    kinds = {type(block) for block in blocks}
    if len(kinds) != 1 or any("forward" in vars(block) for block in blocks):
        return lambda: None
    (kind,) = kinds
    if kind not in _MARKED:
        _MARKED[kind] = torch.compiler.nested_compile_region(kind.forward, max_reuse_entries=max(len(blocks), 8))
    for block in blocks:
        vars(block)["forward"] = types.MethodType(_MARKED[kind], block)

    def unmark() -> None:
        for block in blocks:
            vars(block).pop("forward", None)

    return unmark
