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
- :mod:`~surgery.decode.kv_cache`: The KV caches the engine decodes with, and the few edits
  recomputing a position needs;
- :mod:`~surgery.decode.partial_rerun`: Re-running only the top of the model: blocks ``start`` and
  above, from their cached inputs;
- :mod:`~surgery.decode.records`: Where a block records, per forward pass, where it acted: on the
  device, in memory fixed per run;
- :mod:`~surgery.decode.sampling`: Sampling that does not depend on the batch: one random stream per
  row, seeded by its key;
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

from surgery.decode import engine, forward, kv_cache, partial_rerun, records, sampling, stopping, trace

__all__ = ["engine", "forward", "kv_cache", "partial_rerun", "records", "sampling", "stopping", "trace"]
