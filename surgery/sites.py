"""Sites: one vocabulary of places in a model, mapped per architecture to modules and hooks.

A site is written ``kind.layer`` (``resid_pre.20``, ``mlp_out.-1``) or ``logits``:

==============  =====================================================  ===========
site            value                                                  hook
==============  =====================================================  ===========
resid_pre.L     residual stream entering block L (HF hidden_states[L])  pre, block
resid_post.L    residual stream leaving block L (HF hidden_states[L+1]) post, block
attn_out.L      output of block L's attention, before the residual add   post, attn
mlp_out.L       output of block L's MLP, before the residual add         post, mlp
logits          output of the unembedding                               post, head
==============  =====================================================  ===========

Block L is the L-th decoder layer, 0-based; a negative L counts from the end, so
``resid_post.-1`` is the output of the last block *before* the final norm.

TransformerLens 4 hook names are accepted wherever a site is, on every backend, and results
name the site the way it was written (``str(site)``):

=========================================================  ===========
TransformerLens hook name                                   site
=========================================================  ===========
``blocks.L.hook_in``, ``blocks.L.hook_resid_pre``           resid_pre.L
``blocks.L.hook_out``, ``blocks.L.hook_resid_post``         resid_post.L
``blocks.L.attn.hook_out``, ``blocks.L.hook_attn_out``      attn_out.L
``blocks.L.mlp.hook_out``, ``blocks.L.hook_mlp_out``        mlp_out.L
``unembed.hook_out``, ``hook_unembed``                      logits
=========================================================  ===========

Example:
    >>> Site.parse("resid_pre.-1").resolve(n_layers=30)
    Site(kind='resid_pre', layer=29)
    >>> str(Site.parse("logits"))
    'logits'
    >>> site = Site.parse("blocks.15.hook_in")
    >>> site == Site("resid_pre", 15), site.canonical, str(site)
    (True, 'resid_pre.15', 'blocks.15.hook_in')
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ARCHITECTURES", "Architecture", "SITE_KINDS", "Site", "architecture_of", "hook_site"]

LAYER_SITE_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
SITE_KINDS = (*LAYER_SITE_KINDS, "logits")


# TransformerLens 4 hook names (and their aliases) of the sites
_TL_BLOCK_HOOKS = {
    "hook_in": "resid_pre", "hook_resid_pre": "resid_pre",
    "hook_out": "resid_post", "hook_resid_post": "resid_post",
    "attn.hook_out": "attn_out", "hook_attn_out": "attn_out",
    "mlp.hook_out": "mlp_out", "hook_mlp_out": "mlp_out",
}  # fmt: skip
_TL_LOGITS_HOOKS = ("unembed.hook_out", "hook_unembed")
_TL_BLOCK_NAME = re.compile(r"blocks\.(-?\d+)\.(.+)")


@dataclass(frozen=True)
class Site:
    """A place in the model: a kind and, for all kinds but ``logits``, a block index.

    ``written`` keeps a TransformerLens hook name the site was parsed from (not compared), so
    that ``str(site)`` names it as the user did; :attr:`canonical` is always ours.
    """

    kind: str
    layer: int | None = None
    written: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, text: str | Site) -> Site:
        """Parse ``"resid_pre.20"``, ``"mlp_out.-1"``, ``"logits"`` or a TransformerLens hook name
        (see the module docstring); raise ValueError otherwise."""
        if isinstance(text, Site):
            return text
        if not isinstance(text, str):
            raise TypeError(f"a site is a string such as 'resid_pre.20', got {type(text).__name__}")
        if text == "logits":
            return cls("logits")
        if text in _TL_LOGITS_HOOKS:
            return cls("logits", written=text)
        hook = _TL_BLOCK_NAME.fullmatch(text)
        if hook is not None and hook.group(2) in _TL_BLOCK_HOOKS:
            return cls(_TL_BLOCK_HOOKS[hook.group(2)], int(hook.group(1)), written=text)
        kind, dot, layer = text.partition(".")
        if kind not in LAYER_SITE_KINDS or not dot:
            raise ValueError(
                f"unknown site {text!r}: expected one of {', '.join(k + '.L' for k in LAYER_SITE_KINDS)} "
                "(L a block index, negative counts from the end), 'logits', or a TransformerLens hook "
                f"name ({', '.join('blocks.L.' + h for h in _TL_BLOCK_HOOKS)}, {', '.join(_TL_LOGITS_HOOKS)})"
            )
        try:
            index = int(layer)
        except ValueError:
            raise ValueError(f"site {text!r}: the block index {layer!r} is not an integer") from None
        return cls(kind, index)

    def resolve(self, n_layers: int) -> Site:
        """Return the same site with a non-negative block index, checked against ``n_layers``."""
        if self.layer is None:
            return self
        if not -n_layers <= self.layer < n_layers:
            raise ValueError(
                f"site {self} is out of range: the model has {n_layers} blocks, "
                f"so L must be in 0..{n_layers - 1} (or {-n_layers}..-1 from the end)"
            )
        return Site(self.kind, self.layer % n_layers, written=self.written)

    @property
    def canonical(self) -> str:
        """The site in our vocabulary, e.g. ``"resid_pre.15"`` for ``blocks.15.hook_in``."""
        return self.kind if self.layer is None else f"{self.kind}.{self.layer}"

    def __str__(self) -> str:
        return self.written or self.canonical


@dataclass(frozen=True)
class Architecture:
    """Where the sites live in one family of HF causal LMs (dotted attribute paths)."""

    name: str
    blocks: str
    attn: str
    mlp: str
    head: str
    final_norm: str

    def block_list(self, module: nn.Module) -> nn.ModuleList:
        return module.get_submodule(self.blocks)

    def module_for(self, module: nn.Module, site: Site) -> tuple[nn.Module, str]:
        """The module to hook for ``site`` (already resolved) and the hook kind, "pre" or "post"."""
        if site.kind == "logits":
            return module.get_submodule(self.head), "post"
        block = self.block_list(module)[site.layer]
        if site.kind == "resid_pre":
            return block, "pre"
        if site.kind == "resid_post":
            return block, "post"
        return block.get_submodule(self.attn if site.kind == "attn_out" else self.mlp), "post"


_LLAMA_LIKE = dict(blocks="model.layers", attn="self_attn", mlp="mlp", head="lm_head", final_norm="model.norm")
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", **_LLAMA_LIKE),
    "qwen2": Architecture("qwen2", **_LLAMA_LIKE),
    "qwen3": Architecture("qwen3", **_LLAMA_LIKE),
    "mistral": Architecture("mistral", **_LLAMA_LIKE),
    "gpt2": Architecture("gpt2", blocks="transformer.h", attn="attn", mlp="mlp", head="lm_head", final_norm="transformer.ln_f"),
}


def architecture_of(module: nn.Module) -> Architecture:
    """Look up the site table for an HF model by its ``config.model_type``."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {model_type!r} ({type(module).__name__}): supported are "
            f"{', '.join(sorted(ARCHITECTURES))}. Add an entry to surgery.sites.ARCHITECTURES if its "
            "layout matches one of them."
        )
    return ARCHITECTURES[model_type]


def hook_site(
    module: nn.Module, kind: str, edit: Callable[[torch.Tensor], torch.Tensor]
) -> torch.utils.hooks.RemovableHandle:
    """Register a hook on ``module`` that passes the site's tensor through ``edit``.

    ``kind="pre"`` edits the first input (the residual stream entering a block, positional or
    ``hidden_states=``); ``kind="post"`` edits the output, or its first element when the module
    returns a tuple (attention modules do). Returns the handle that removes the hook.
    """
    if kind == "pre":

        def pre_hook(_module, args, kwargs):
            if args:
                return (edit(args[0]), *args[1:]), kwargs
            kwargs["hidden_states"] = edit(kwargs["hidden_states"])
            return args, kwargs

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(_module, _args, output):
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    return module.register_forward_hook(post_hook)
