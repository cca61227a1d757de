"""TransformerLens 4: a ``TransformerBridge`` as a backend, its hook points as our sites.

:func:`surgery.wrap` hands a bridge here. The engine then runs the HF model the bridge wraps
(``bridge.original_model``: TransformerLens rebuilt it in place, so every forward goes through
the bridge's hook points) and attaches blocks to the hook points themselves:

==============  ===============================================================
site            hook point
==============  ===============================================================
resid_pre.L     ``blocks.L.hook_in``
resid_post.L    ``blocks.L.hook_out``
attn_out.L      ``blocks.L.ln1_post.hook_out`` where the block normalises its
                attention output before the residual add (Gemma 2), else
                ``blocks.L.attn.hook_out``
mlp_out.L       ``blocks.L.ln2_post.hook_out``, else ``blocks.L.mlp.hook_out``
logits          ``unembed.hook_out``
==============  ===============================================================

So tokens and states equal those of our engine on the same HF module, and a model whose
architecture our own table (:data:`surgery.sites.ARCHITECTURES`) lacks works wherever
TransformerLens has an adapter for it: :func:`boot` builds the bridge for a plain HF model.

Booting changes the HF model in place (TransformerLens replaces its layers by ``BlockBridge``
objects and switches attention to ``eager``; logits move by ~1e-6). Compare backends on the
same module, after booting.

TransformerLens 4.3 with transformers >= 5.24: the attention bridges that compute attention
themselves read the KV cache from a ``past_key_values`` keyword, which transformers 5.24 renamed
to ``cache`` in the calls its decoder layers make. They then neither write nor read the cache, so
every decoded token attends to itself alone (the HF model's own ``generate`` on a booted model
writes garbage). :func:`wrap_bridge`, :func:`boot` and the engine (on every run) let the bridge's
attention see the cache under either name (:func:`surgery.decode.kv_cache.read_cache_under_either_name`);
with transformers <= 5.23, or a TransformerLens that reads ``cache`` itself, that changes nothing.

Example::

    from transformer_lens.model_bridge import TransformerBridge
    bridge = TransformerBridge.boot_transformers("smollm2", hf_model=hf_model, tokenizer=tokenizer)
    model = surgery.wrap(bridge)
    with surgery.trace(model, SteeringVector(v, layer=15)) as tr:
        out = tr.generate(prompts, 64, chat=True)
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from surgery.decode.kv_cache import read_cache_under_either_name
from surgery.model import Model
from surgery.sites import Site

__all__ = ["BridgeArchitecture", "boot", "is_booted", "is_bridge", "wrap_bridge"]


def is_bridge(obj) -> bool:
    """Whether ``obj`` is a TransformerLens ``TransformerBridge`` (without importing the library)."""
    return type(obj).__module__.startswith("transformer_lens") and hasattr(obj, "hook_dict") and hasattr(obj, "original_model")


def is_booted(module: nn.Module) -> bool:
    """Whether TransformerLens has rebuilt this HF model in place (its layers are bridges)."""
    return any(type(m).__name__ == "BlockBridge" or type(m).__module__.startswith("transformer_lens")
               for m in module.modules() if m is not module)


@dataclass(frozen=True)
class BridgeArchitecture:
    """Where the sites live in a booted model: the bridge's hook points (see the module docstring).

    Offers what :class:`surgery.sites.Architecture` offers, so the rest of the toolkit does not
    know which one it has.
    """

    name: str
    bridge: Any = field(repr=False, compare=False)

    def block_list(self, module: nn.Module) -> list[nn.Module]:
        """The HF decoder layers inside the bridge's blocks (recycling re-runs these, as on HF)."""
        return [block.original_component for block in self.bridge.blocks]

    def hook_name(self, site: Site) -> str:
        if site.kind == "logits":
            return "unembed.hook_out"
        prefix = f"blocks.{site.layer}."
        candidates = {
            "resid_pre": ("hook_in",),
            "resid_post": ("hook_out",),
            "attn_out": ("ln1_post.hook_out", "attn.hook_out"),
            "mlp_out": ("ln2_post.hook_out", "mlp.hook_out"),
        }[site.kind]
        for candidate in candidates:
            if prefix + candidate in self.bridge.hook_dict:
                return prefix + candidate
        raise ValueError(
            f"the {self.name} bridge has no hook point for {site} (looked for "
            f"{', '.join(prefix + c for c in candidates)}): pick another site"
        )

    def module_for(self, module: nn.Module, site: Site) -> tuple[nn.Module, str]:
        """The hook point for ``site`` (an identity module: its output is the site's value)."""
        return self.bridge.hook_dict[self.hook_name(site)], "post"


def wrap_bridge(bridge, tokenizer=None, *, name: str | None = None):
    """A :class:`~surgery.model.Model` on a ``TransformerBridge`` (what :func:`surgery.wrap` does).

    Without ``tokenizer``, the bridge's own is used: TransformerLens may have made it a new one
    that prepends BOS to plain text (its ``default_prepend_bos``), unlike the HF tokenizer; pass
    the HF tokenizer to encode exactly as on the HF model.

    Raises ValueError for a bridge in compatibility mode (its weights were processed, so it no
    longer computes the HF model's logits) and for one without a tokenizer.
    """
    if getattr(bridge, "compatibility_mode", False) or getattr(bridge, "_weights_processed", False):
        raise ValueError(
            "this TransformerBridge is in compatibility mode: enable_compatibility_mode() rewrote the "
            "weights of the model it wraps (folded norms, centred unembedding), in place and for good, so "
            "its logits are no longer the model's. Boot a fresh bridge on a freshly loaded model, without "
            "enable_compatibility_mode(), and wrap that"
        )
    tokenizer = tokenizer if tokenizer is not None else getattr(bridge, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("this TransformerBridge has no tokenizer: surgery.wrap(bridge, tokenizer)")
    read_cache_under_either_name(bridge)
    module = bridge.original_model
    architecture = BridgeArchitecture(module.config.model_type, bridge)
    return Model(module.eval(), tokenizer, name=name, architecture=architecture, host=bridge)


def boot(module: nn.Module, tokenizer, *, name: str | None = None):
    """Build a ``TransformerBridge`` around an HF model (in place, offline) and return it.

    The bridge gets a copy of ``tokenizer`` (booting edits the tokenizer it is given). Raises
    ValueError when TransformerLens has no adapter for the architecture.
    """
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as error:
        raise ValueError(
            f"{module.config.model_type!r} is not in surgery's site table, and TransformerLens (which could "
            "resolve its sites) is not installed: pip install transformer-lens"
        ) from error
    label = name or getattr(module.config, "_name_or_path", None) or module.config.model_type
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            bridge = TransformerBridge.boot_transformers(label, hf_model=module, tokenizer=copy.deepcopy(tokenizer))
        except Exception as error:
            if "architecture" not in str(error).lower():
                raise
            raise ValueError(str(error)) from error
    read_cache_under_either_name(bridge)
    return bridge

