"""Re-running only the top of the model: blocks ``start`` and above, from their cached inputs.

Representation recycling recomputes the last position with one block applied twice. Blocks
below that one compute exactly what they computed the first time, so re-running them is waste.
:class:`LayerInputs` keeps, during every forward of a generation, what each block from
``first`` up was called with (a reference, no copy: the model makes new tensors each step);
:meth:`LayerInputs.rerun` then runs blocks ``start..L-1``, the final norm and the head on those
inputs, through the modules' own ``__call__`` so every hook on them (the trace's sites, the
recycling hook) acts as in a full forward. The caller rolls the KV cache of those blocks back
one position first (:func:`surgery.decode.kv_cache.rollback`).

The input of block ``start`` is the one it received before any hook edited it (the capture hook
runs first), so an intervention at ``resid_pre.start`` edits the re-run once, as in a full
re-run. Available on models whose sites come from :data:`surgery.sites.ARCHITECTURES` (the
block list, final norm and head are known there); on a TransformerLens bridge the engine
re-runs the whole model instead.

Example::

    inputs = LayerInputs(model.module, model.architecture, first=20)   # before the forwards
    ...                                                                 # forwards run
    rollback(cache, range(20, model.n_layers))
    logits = inputs.rerun(20)                                           # [batch, vocab], float32
    inputs.remove()
"""

from __future__ import annotations

from torch import Tensor, nn

from surgery.sites import Architecture

__all__ = ["LayerInputs", "supports_partial_rerun"]


def supports_partial_rerun(architecture) -> bool:
    """Whether the final norm and head of ``architecture`` are known (an HF site table)."""
    return isinstance(architecture, Architecture)


class LayerInputs:
    """Records the inputs of blocks ``first`` and above at each forward; re-runs from them."""

    def __init__(self, module: nn.Module, architecture: Architecture, first: int):
        blocks = architecture.block_list(module)
        if not 0 <= first < len(blocks):
            raise ValueError(f"first must be a block index in 0..{len(blocks) - 1}, got {first}")
        self.first = first
        self._blocks = list(blocks)
        self._norm = module.get_submodule(architecture.final_norm)
        self._head = module.get_submodule(architecture.head)
        # one slot per block from ``first`` up: (args, kwargs) of its last call
        self._inputs: list[tuple[tuple, dict] | None] = [None] * (len(self._blocks) - first)
        self._recording = [True]  # a list: the hooks read it (see _recorder)
        self._handles = [
            block.register_forward_pre_hook(self._recorder(index), with_kwargs=True, prepend=True)
            for index, block in enumerate(self._blocks)
            if index >= first
        ]

    def _recorder(self, index: int):
        # The hook closes over the slots and the flag only, not over this object: a compiled
        # step guards on what hooks reach, and plain lists keep that small.
        slots, recording, slot = self._inputs, self._recording, index - self.first

        def record(_module, args, kwargs):
            if recording[0]:
                slots[slot] = (args, kwargs)

        return record

    @property
    def ready(self) -> bool:
        """Whether the last forward fed one position per row and was recorded at every block
        from ``first`` up (the prefill feeds the whole prompt: its last position is re-run by a
        full forward of that one position instead, as its recorded inputs hold every position)."""
        return all(entry is not None for entry in self._inputs) and self._hidden(self.first).shape[1] == 1

    def _hidden(self, index: int) -> Tensor:
        args, kwargs = self._inputs[index - self.first]
        return args[0] if args else kwargs["hidden_states"]

    def _rest(self, index: int) -> tuple[tuple, dict]:
        """Block ``index``'s recorded arguments other than the hidden states."""
        args, kwargs = self._inputs[index - self.first]
        if args:
            return tuple(args[1:]), kwargs
        return (), {key: value for key, value in kwargs.items() if key != "hidden_states"}

    def rerun(self, start: int) -> Tensor:
        """Run blocks ``start..L-1``, the final norm and the head on the last recorded inputs of
        block ``start``; the last position's logits, float32 ``[batch, vocab]``."""
        if not self.first <= start < len(self._blocks):
            raise ValueError(f"recorded blocks are {self.first}..{len(self._blocks) - 1}, asked to start at {start}")
        if not self.ready:
            raise RuntimeError("no single-position forward has been recorded: nothing to re-run from")
        hidden = self._hidden(start)
        self._recording[0] = False
        try:
            for index in range(start, len(self._blocks)):
                args, kwargs = self._rest(index)
                output = self._blocks[index](hidden, *args, **kwargs)
                hidden = output[0] if isinstance(output, tuple) else output
            logits = self._head(self._norm(hidden)[:, -1:])
        finally:
            self._recording[0] = True
        return logits[:, -1].float()

    def forget(self) -> None:
        """Drop the recorded inputs (a forward over other rows ran since: continuous batching's
        admission prefill), so the next re-run is a full one until a decode step records again."""
        self._inputs[:] = [None] * len(self._inputs)

    def remove(self) -> None:
        """Remove the recording hooks and drop the recorded tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs[:] = [None] * len(self._inputs)
