"""The hosts room: models that come from elsewhere, and our blocks inside their own loops.

Loading an HF causal LM (:func:`surgery.load`), wrapping a model object the user has
(:func:`surgery.wrap`, which detects its host), TransformerLens bridges and nnsight models as
backends, and the adapters that run our blocks inside their own ``generate`` / ``trace``. It
imports the core and the decode room.

- :mod:`~surgery.hosts.bridge`: TransformerLens 4: a ``TransformerBridge`` as a backend, its hook
  points as our sites;
- :mod:`~surgery.hosts.loading`: Loading models: the embedded default (SmolLM2-135M-Instruct), any
  HF id or folder, GGUF files, and models with random weights built from a config (offline smoke
  runs of a paper's model);
- :mod:`~surgery.hosts.nnsight_blocks`: Our blocks inside nnsight's own tracing: ``blocks.step()``
  in ``lm.generate`` or ``lm.trace``;
- :mod:`~surgery.hosts.nnsight_host`: nnsight 0.8: an nnsight model as a backend;
- :mod:`~surgery.hosts.tl_hooks`: Our blocks as TransformerLens hook functions, for a bridge's own
  ``generate`` and ``run_with_hooks``;
- :mod:`~surgery.hosts.wrapping`: Wrapping a model the user already has: an HF model as is, a
  TransformerLens or nnsight one through its host.

This package only names its modules: the public API is ``surgery``'s.

Example:
    >>> import surgery
    >>> from surgery.hosts import wrapping
    >>> wrapping.wrap is surgery.wrap
    True
"""

from surgery.hosts import bridge, loading, nnsight_blocks, nnsight_host, tl_hooks, wrapping

__all__ = ["bridge", "loading", "nnsight_blocks", "nnsight_host", "tl_hooks", "wrapping"]
