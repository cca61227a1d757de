"""The decode room: running a model on prompts, token by token, with blocks attached.

The engine (:func:`surgery.generate`, :func:`surgery.run`) and what it drives: the model calls
of a run, the KV caches, re-running the blocks from a layer up, one random stream per row, when
rows stop, the records blocks keep on the device per step, and the Trace that attaches blocks
for a run (:func:`surgery.trace`). It imports the core and the kernels, never the hosts or the
files room.

- :mod:`~surgery.decode.engine`: The decode engine: prefill, then one token at a time with the KV
  cache;
- :mod:`~surgery.decode.forward`: The model calls of one generation: the prefill, one fed token per
  step, and re-runs;
- :mod:`~surgery.decode.generation_output`: What a generation returns, and the hand-off of each
  token choice to the blocks;
- :mod:`~surgery.decode.kv_cache`: The KV caches the engine decodes with, and the few edits
  recomputing a position needs;
- :mod:`~surgery.decode.partial_rerun`: Re-running only the top of the model: blocks ``start`` and
  above, from their cached inputs;
- :mod:`~surgery.decode.records`: Where a block records, per forward pass, where it acted: on the
  device, in memory fixed per run;
- :mod:`~surgery.decode.row_stacks`: A stack of blocks per row: one run mixing rows under different
  stacks (a study's conditions);
- :mod:`~surgery.decode.sampling`: Sampling that does not depend on the batch: one random stream per
  row, seeded by its key;
- :mod:`~surgery.decode.slot_cache`: The KV-cache edits continuous batching needs: place an admitted
  row, shift every row's columns;
- :mod:`~surgery.decode.slot_forward`: The model calls of a slot pool: one cache of ``batch`` slots,
  rows admitted into it mid-run;
- :mod:`~surgery.decode.slots`: Continuous batching: more prompts than slots, each finished row's
  slot taken by the next prompt;
- :mod:`~surgery.decode.stopping`: When generated rows stop, and why: an EOS id, a stop string, or a
  block;
- :mod:`~surgery.decode.trace`: The Trace: attach blocks to a model for the length of a ``with``
  block.

This package only names its modules: the public API is ``surgery``'s.

Example:
    >>> import surgery
    >>> from surgery.decode import engine
    >>> engine.generate is surgery.generate
    True
"""

from surgery.decode import (
    engine,
    forward,
    generation_output,
    kv_cache,
    partial_rerun,
    records,
    row_stacks,
    sampling,
    slot_cache,
    slot_forward,
    slots,
    stopping,
    trace,
)

__all__ = [
    "engine",
    "forward",
    "generation_output",
    "kv_cache",
    "partial_rerun",
    "records",
    "row_stacks",
    "sampling",
    "slot_cache",
    "slot_forward",
    "slots",
    "stopping",
    "trace",
]
