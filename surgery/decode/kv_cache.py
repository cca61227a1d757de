"""The KV caches the engine decodes with, and the few edits recomputing a position needs.

Two kinds, named by :func:`surgery.generate`'s ``cache`` argument:

- ``"dynamic"`` (the default): a :class:`transformers.DynamicCache`, which grows by one position
  per step (what ``model.generate`` uses; the engine's tokens equal its tokens);
- ``"static"``: a :class:`transformers.StaticCache` allocated once for the prompt plus every new
  token. Its buffers never move and its write position is a device tensor, so a decode step
  reads and writes the same memory every time: what CUDA-graph capture and ``torch.compile``
  need. Sliding-window layers are refused (their static form keeps a host-side counter).

The keyword a model's forward takes its cache by changed in transformers 5.24: ``cache=`` from
5.24 on (``past_key_values=`` still works there, with a FutureWarning, until its announced
removal in 5.40), ``past_key_values=`` up to 5.23. :func:`cache_keyword` names the one a model
takes, and :func:`passed_cache` finds the cache a forward was called with under either name
(the adapters read it from hosts that call the model themselves). TransformerLens 4.3's
attention bridges read it as ``past_key_values`` only: :func:`read_cache_under_either_name`
lets them find it under ``cache`` too (the engine applies it on every run, :mod:`surgery.hosts.bridge`
when it wraps or boots a bridge).

Recomputing the last position (representation recycling) rolls layers back one position and
lets the re-run overwrite it; :func:`last_entry` and :func:`restore_last_entry` keep one
layer's last keys and values for the rows that do not change. All of these are tensor ops on
the device for both kinds (no host sync).

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2, num_key_value_heads=2)
    >>> module = LlamaForCausalLM(config).eval()
    >>> cache = new_cache("static", config, max_length=8)
    >>> _ = module(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **{cache_keyword(module): cache})
    >>> int(cache.layers[0].cumulative_length)
    3
    >>> rollback(cache)
    >>> int(cache.layers[0].cumulative_length)
    2
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor
from transformers import Cache, DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

__all__ = [
    "CACHE_KINDS", "cache_keyword", "check_kind", "last_entry", "new_cache", "passed_cache",
    "read_cache_under_either_name", "restore_last_entry", "rollback",
]

#: The cache kinds :func:`new_cache` builds.
CACHE_KINDS = ("dynamic", "static")


def cache_keyword(module: torch.nn.Module) -> str:
    """The keyword ``module``'s forward takes its KV cache by: ``"cache"`` where the forward names
    it so (transformers >= 5.24), else ``"past_key_values"`` (transformers <= 5.23, and models
    whose code still uses the old name)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def passed_cache(kwargs: Mapping) -> Cache | None:
    """The KV cache a forward was called with: ``kwargs["cache"]`` (transformers >= 5.24 call their
    models so, ``generate`` included) or ``kwargs["past_key_values"]`` (older releases, and
    callers such as TransformerLens 4.3 that still use the old name); None without one."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def check_kind(kind: str) -> None:
    """Raise ValueError naming the kinds when ``kind`` is not one of :data:`CACHE_KINDS`."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache must be one of {', '.join(map(repr, CACHE_KINDS))}, got {kind!r}")


def new_cache(kind: str, config, max_length: int) -> Cache:
    """A fresh cache of ``kind`` for a model with ``config``; ``max_length`` bounds a static one.

    Raises:
        ValueError: an unknown kind, or a static cache for a model with sliding-window layers.
    """
    check_kind(kind)
    if kind == "dynamic":
        return DynamicCache(config=config)
    cache = StaticCache(config=config, max_cache_len=max_length)
    odd = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not StaticLayer})
    if odd:
        raise ValueError(
            f"cache='static' supports full-attention layers only; this model has {', '.join(odd)} "
            "(sliding-window attention): use cache='dynamic'"
        )
    return cache


def _layers(cache: Cache, layers: Iterable[int] | None):
    return cache.layers if layers is None else [cache.layers[i] for i in layers]


def rollback(cache: Cache, layers: Iterable[int] | None = None) -> None:
    """Forget the last position of ``layers`` (every layer when None); the next forward rewrites it."""
    for layer in _layers(cache, layers):
        if isinstance(layer, StaticLayer):
            if layer.is_initialized:
                layer.cumulative_length.sub_(1)  # in place: the tensor's address is static
        else:
            layer.crop(-1)


def _last_index(layer: StaticLayer) -> Tensor:
    return (layer.cumulative_length - 1).reshape(1)


def last_entry(cache: Cache, layer: int) -> tuple[Tensor, Tensor]:
    """Copies of ``layer``'s keys and values at its last written position, ``[batch, heads, 1, dim]``."""
    stored = cache.layers[layer]
    if isinstance(stored, StaticLayer):
        index = _last_index(stored)
        return stored.keys.index_select(2, index), stored.values.index_select(2, index)
    return stored.keys[:, :, -1:].clone(), stored.values[:, :, -1:].clone()


def restore_last_entry(cache: Cache, layer: int, keys: Tensor, values: Tensor, rows: Tensor) -> None:
    """Put ``keys``/``values`` (from :func:`last_entry`) back at ``layer``'s last position for ``rows``
    (bool ``[batch]``); other rows keep what is there now."""
    stored = cache.layers[layer]
    keep = rows[:, None, None, None]
    if isinstance(stored, StaticLayer):
        index = _last_index(stored)
        now_keys, now_values = stored.keys.index_select(2, index), stored.values.index_select(2, index)
        stored.keys.index_copy_(2, index, torch.where(keep, keys, now_keys))
        stored.values.index_copy_(2, index, torch.where(keep, values, now_values))
        return
    stored.keys[:, :, -1:] = torch.where(keep, keys, stored.keys[:, :, -1:])
    stored.values[:, :, -1:] = torch.where(keep, values, stored.values[:, :, -1:])


def read_cache_under_either_name(module: torch.nn.Module) -> None:
    """Make the TransformerLens attention bridges inside ``module`` (a bridge, or the HF model it
    rebuilt) find the KV cache under ``cache=`` as under ``past_key_values=``.

    TransformerLens 4.3.0 (the newest release on 2026-12-06) updates the cache in
    ``AttentionBridge._update_kv_cache`` from ``kwargs["past_key_values"]`` (or ``layer_past``)
    only, while the decoder layers of transformers >= 5.24 pass it as ``cache=``. This gives each
    such attention bridge an ``_update_kv_cache`` that copies ``cache`` to ``past_key_values`` when
    only the first is there, then runs TransformerLens' own. Idempotent, and a walk over the
    modules that changes nothing in a model TransformerLens did not boot; the engine calls it on
    every run (a model may be booted after it was wrapped). It repairs the HF model's own
    ``generate`` on the booted module too. Not covered: the multi-head latent attention bridges
    (DeepSeek-V3 style MLA, GLM MoE DSA), which read the cache elsewhere.
    """
    for inner in module.modules():
        if not callable(getattr(type(inner), "_update_kv_cache", None)):
            continue
        current = inner.__dict__.get("_update_kv_cache")
        if isinstance(current, types.MethodType) and current.__func__ is _update_kv_cache_under_either_name:
            continue
        # a bound method: copy.deepcopy rebinds it to the copy of the module
        inner._update_kv_cache = types.MethodType(_update_kv_cache_under_either_name, inner)


def _update_kv_cache_under_either_name(self, key, value, **kwargs):
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs["past_key_values"] = kwargs["cache"]
    return type(self)._update_kv_cache(self, key, value, **kwargs)
