"""nnsight 0.8: an nnsight model as a backend.

:func:`surgery.wrap` hands an nnsight ``LanguageModel`` (or a plain ``NNsight`` around an HF
causal LM) here. nnsight wraps the HF module without copying it and, outside its own traces,
passes every call straight through; the engine runs that module with the toolkit's hooks, so
tokens and states are those of the same HF model (bit for bit). To use our blocks inside
nnsight's own ``lm.generate(...)`` / ``lm.trace(...)``, see :mod:`surgery.hosts.nnsight_blocks`.

What runs where: a local, dispatched model runs here. Remote execution (NDIF) and vLLM-backed
models run the model somewhere the toolkit's hooks cannot reach: wrapping one is a clear error,
and our blocks reach them only through nnsight's own tracing (untested on these machines).

Example::

    from nnsight import LanguageModel
    lm = LanguageModel(hf_model, tokenizer=tokenizer)
    model = surgery.wrap(lm)
"""

from __future__ import annotations

from surgery.model import Model

__all__ = ["is_nnsight", "wrap_nnsight"]


def is_nnsight(obj) -> bool:
    """Whether ``obj`` is an nnsight model wrapper (without importing nnsight)."""
    return type(obj).__module__.startswith("nnsight") or any(c.__module__.startswith("nnsight") for c in type(obj).__mro__)


def wrap_nnsight(lm, tokenizer=None, *, name: str | None = None):
    """A :class:`~surgery.model.Model` on an nnsight model (what :func:`surgery.wrap` does).

    Raises ValueError for a vLLM-backed model, a model that is not dispatched locally (remote,
    or still on the meta device), one without a tokenizer, and a non-HF module inside.
    """
    from transformers import PreTrainedModel

    kind = type(lm).__name__
    if any(c.__name__ == "VLLM" for c in type(lm).__mro__):
        raise ValueError(
            "this nnsight model runs on vLLM, whose engine the toolkit's hooks cannot reach: load the "
            "same weights as an HF model (or nnsight LanguageModel) to use surgery.trace on it"
        )
    module = getattr(lm, "_module", None)
    if not isinstance(module, PreTrainedModel):
        raise ValueError(
            f"this nnsight {kind} wraps a {type(module).__name__}, not a transformers causal LM: "
            "surgery needs an HF model inside (LanguageModel(hf_model, tokenizer=...))"
        )
    if getattr(lm, "dispatched", True) is False or any(p.is_meta for p in module.parameters()):
        raise ValueError(
            f"this nnsight {kind} is not loaded locally (its weights are on the meta device: a model "
            "meant for remote execution, or one not dispatched yet). surgery runs the model here: build "
            "it with LanguageModel(name, dispatch=True) or around a loaded HF model; for remote (NDIF) "
            "runs, use our blocks inside nnsight's own trace (surgery.hosts.nnsight_blocks)"
        )
    tokenizer = tokenizer if tokenizer is not None else getattr(lm, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"this nnsight {kind} has no tokenizer: surgery.wrap(lm, tokenizer)")
    return Model(module.eval(), tokenizer, name=name, host=lm)
