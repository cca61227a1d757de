"""The KV-cache edits continuous batching needs: place an admitted row, shift every row's columns.

A pool of slots (:mod:`surgery.decode.slots`) decodes with one cache of ``batch`` rows whose columns
are shared: every step writes one column for every slot. A row admitted into a slot brings the
keys and values of its prefill (run on its own cache); :func:`place` copies them into the slot so
that they end at the pool's current length, the columns before them hidden by the slot's
attention mask. :func:`shift_columns` moves every slot's columns left (dropping leading columns
no live row needs: the compaction that keeps the cache bounded) or right (making room for a
prompt longer than the pool's current length).

Both kinds of :mod:`surgery.decode.kv_cache` are handled: a ``DynamicCache`` is re-sliced (its tensors
change, it has no fixed address), a ``StaticCache`` is edited in place and its write position
(``cumulative_length``, a device tensor) moved, so its memory never moves and a compiled decode
step replays on it unchanged.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from surgery.decode.kv_cache import new_cache
    >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=2)
    >>> module = LlamaForCausalLM(config).eval()
    >>> pool, alone = new_cache("dynamic", config, 16), new_cache("dynamic", config, 16)
    >>> _ = module(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), past_key_values=pool, use_cache=True)
    >>> _ = module(input_ids=torch.tensor([[7, 8]]), past_key_values=alone, use_cache=True)
    >>> place(pool, alone, slot=1, row=0, length=2)
    >>> torch.equal(pool.layers[0].keys[1, :, 1:], alone.layers[0].keys[0])
    True
"""

from __future__ import annotations

import torch
from transformers import Cache
from transformers.cache_utils import StaticLayer

__all__ = ["cache_length", "place", "shift_columns"]


def _written(layer) -> int:
    if isinstance(layer, StaticLayer):
        return int(layer.cumulative_length) if layer.is_initialized else 0
    return layer.keys.shape[2] if layer.is_initialized and layer.keys.numel() else 0


def cache_length(cache: Cache) -> int:
    """How many columns the cache has written (the same for every layer of a pool)."""
    return _written(cache.layers[0])


def place(pool: Cache, admitted: Cache, slot: int, row: int, length: int) -> None:
    """Copy ``admitted``'s row ``row``, its last ``length`` written columns, into ``pool``'s slot
    ``slot``, ending at the pool's current length (which must be at least ``length``)."""
    for target, source in zip(pool.layers, admitted.layers):
        end, source_end = _written(target), _written(source)
        if end < length:
            raise ValueError(f"the pool has {end} columns, the admitted row needs {length}: shift_columns first")
        target.keys[slot, :, end - length : end] = source.keys[row, :, source_end - length : source_end]
        target.values[slot, :, end - length : end] = source.values[row, :, source_end - length : source_end]


def shift_columns(cache: Cache, by: int) -> None:
    """Move every row's columns ``by`` places left (``by > 0``: the first ``by`` columns are
    dropped) or ``-by`` places right (``by < 0``: new leading columns, zeros). The cache's length
    changes by ``-by``; a static cache must have room."""
    if by == 0:
        return
    for layer in cache.layers:
        end = _written(layer)
        if isinstance(layer, StaticLayer):
            if end - by > layer.max_cache_len:
                raise ValueError(f"a static cache of {layer.max_cache_len} columns has no room to shift {end} by {-by}")
            for buffer in (layer.keys, layer.values):
                moved = buffer[:, :, max(by, 0) : end].clone()
                buffer[:, :, max(-by, 0) : max(-by, 0) + moved.shape[2]] = moved
                if by < 0:
                    buffer[:, :, : -by] = 0
            layer.cumulative_length.sub_(by)  # in place: the address is static
        elif by > 0:
            layer.keys, layer.values = layer.keys[:, :, by:], layer.values[:, :, by:]
        else:
            pad = (0, 0, -by, 0)
            layer.keys = torch.nn.functional.pad(layer.keys, pad)
            layer.values = torch.nn.functional.pad(layer.values, pad)
