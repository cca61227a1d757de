"""Wrapping a model the user already has: an HF model as is, a TransformerLens or nnsight one through its host.

An HF causal LM is wrapped as it is; a TransformerLens ``TransformerBridge`` goes to
:mod:`surgery.hosts.bridge`, an nnsight model to :mod:`surgery.hosts.nnsight_host`. Detecting the host lives
here, beside the hosts, so that :mod:`surgery.model` knows none of them (the hosts import the
model, never the other way round).

Example::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = surgery.wrap(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path))
"""

from __future__ import annotations

import warnings

from surgery.hosts import bridge as tl_bridge
from surgery.hosts import nnsight_host
from surgery.model import Model
from surgery.sites import architecture_of

__all__ = ["wrap"]


def wrap(model, tokenizer=None, *, name: str | None = None) -> Model:
    """Wrap a model object the user already has.

    Args:
        model: an HF causal LM (``transformers.PreTrainedModel``), a TransformerLens 4
            ``TransformerBridge``, an nnsight ``LanguageModel`` (or ``NNsight`` around an HF causal
            LM), or a :class:`Model` (returned as is).
        tokenizer: its tokenizer (required for HF models and plain ``NNsight``; a bridge's and a
            ``LanguageModel``'s own is used otherwise).
        name: a label for reports; defaults to the config's ``_name_or_path``.

    An HF model whose architecture :data:`surgery.sites.ARCHITECTURES` lacks is booted into a
    TransformerLens bridge (in place, with a warning) when TransformerLens has an adapter for
    it, and its sites resolve through the bridge's hook points (:mod:`surgery.hosts.bridge`).

    Returns:
        A :class:`Model`.

    Raises:
        ValueError: for a bridge in compatibility mode, a remote or vLLM nnsight model, a missing
            tokenizer, or an architecture neither our table nor TransformerLens knows.
        TypeError: for anything else.

    Example::

        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = surgery.wrap(AutoModelForCausalLM.from_pretrained(path),
                     AutoTokenizer.from_pretrained(path))
    """
    if isinstance(model, Model):
        return model
    if tl_bridge.is_bridge(model):
        return tl_bridge.wrap_bridge(model, tokenizer, name=name)
    if nnsight_host.is_nnsight(model):
        return nnsight_host.wrap_nnsight(model, tokenizer, name=name)
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            "surgery.wrap expects a transformers causal LM (PreTrainedModel), a TransformerLens "
            f"TransformerBridge or an nnsight LanguageModel, got {type(model).__name__}"
        )
    if tokenizer is None:
        raise ValueError("surgery.wrap needs the model's tokenizer: surgery.wrap(model, tokenizer)")
    if tl_bridge.is_booted(model):
        raise ValueError(
            "TransformerLens has rebuilt this model in place (it is a bridge's original_model): wrap "
            "the bridge instead, surgery.wrap(bridge), so that sites resolve through its hook points"
        )
    try:
        architecture_of(model)
    except ValueError as unknown:
        try:
            bridge = tl_bridge.boot(model, tokenizer, name=name)
        except ValueError as error:
            raise ValueError(f"{unknown} TransformerLens cannot resolve it either: {error}") from error
        warnings.warn(
            f"{model.config.model_type!r} is not in surgery's site table: booted a TransformerLens bridge "
            "around the model, in place (its layers are now bridges and attention runs eager), and its "
            "sites resolve through the bridge's hook points",
            stacklevel=2,
        )
        return tl_bridge.wrap_bridge(bridge, tokenizer, name=name)
    return Model(model.eval(), tokenizer, name=name)
