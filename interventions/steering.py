"""SteeringVector: SEAL's latent steering at thought separators, and its extraction.

SEAL (arXiv 2504.07986, §3; METHODS.md §1) adds ``alpha * S`` to the residual stream entering
block ``layer`` at every decoding step whose fed token is a separator ("\\n\\n") inside the think
span, where ``S = mean(execution states) - mean(reflection ∪ transition states)`` pooled over
the separators of many reasoning traces. The steered keys and values land in the KV cache, so
later tokens attend to them; there is no extra forward pass.

Paper-compatible defaults: site ``resid_pre`` (input to block ``layer``), ``alpha=1``, trigger
``OnTokens("\\n\\n") & InThink() & FromPromptEnd()`` (tokens whose text contains "\\n\\n", inside
``<think>``, and in the prefill only the last prompt position: separators a prompt already holds
are left alone), no normalisation of ``S``. Deviations, all opt-in: any site kind, any trigger.
For models without think tokens (SmolLM2, which also writes a blank line as two "\\n" tokens)
:func:`seal_trigger_for` gives ``OnText("\\n\\n") & StepWindow(1)``: every generated blank line,
wherever its tokens split it. Extraction reads its states where the vector's own trigger fires
when each trace is replayed, so decode-time and extraction rules are one rule on every tokenizer.

What the released code (VITA-Group/SEAL) does, as named modes (METHODS.md section 1):

- its think flag: ``seal_trigger(released=True)`` (:class:`~surgery.triggers.SealThinkFlag`): set
  after a prompt that holds a ``<think>`` anywhere (the paper's span is closed after an earlier
  turn's ``</think>``), then by fed ``<think>`` / ``</think>``; the prefill rule is the same;
- empty thoughts (a separator right after a separator) counted as execution thoughts:
  ``from_thoughts(..., empty_thoughts="execution")`` (the paper: skipped);
- float32 extraction and steering: load the model with ``dtype=torch.float32`` (bfloat16 moves
  the vector by ~3% on SmolLM2); the vector from the first 500 correct and 500 incorrect MATH
  *train* traces at layer 20 (``studies/replications/``);
- it applies ``mean(R ∪ T) - mean(E)`` with coefficient -1: the same addition as ours with
  ``alpha=+1``;
- its misspelt "think differently" keyword never matches; ours does (:mod:`surgery.thoughts`).

Extraction (:meth:`SteeringVector.from_thoughts`) runs each trace through the model once,
labels its thoughts with :mod:`surgery.thoughts` (SEAL's keyword rules, the "think differently"
typo fixed) and keeps one vector per thought (the state at its opening separator, where the
trigger fires), never every hidden state.

Example:
    >>> import torch
    >>> steer = SteeringVector(torch.zeros(576), layer=20)
    >>> steer.config.site, steer.config.alpha
    ('resid_pre.20', 1.0)
    >>> model = surgery.load()                                                   # doctest: +SKIP
    >>> traces = [("What is 7 * 8?", "7 * 8 = 56.\\n\\nWait, let me check.\\n\\nSo 56.")]
    >>> steer = SteeringVector.from_thoughts(model, traces, layer=15, chat=True)  # doctest: +SKIP
    >>> steer.metadata["class_counts"]                                            # doctest: +SKIP
    {'execution': 1, 'reflection': 1, 'transition': 0}
    >>> steer.save("seal.safetensors")                                           # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from interventions.residual_add import ResidualAdd
from surgery.blocks import register_block
from surgery.sites import Site
from surgery.thoughts import THOUGHT_CLASSES, thought_states
from surgery.files.saving import load_blocks, save_blocks
from surgery.triggers import FromPromptEnd, InThink, OnText, OnTokens, SealThinkFlag, StepWindow, Trigger

__all__ = ["SteeringVector", "SteeringVectorConfig", "seal_trigger", "seal_trigger_for"]


def seal_trigger(released: bool = False) -> Trigger:
    """SEAL's trigger: the fed token contains "\\n\\n", inside the think span, never before the
    prompt's last token (:class:`~surgery.triggers.FromPromptEnd`: in the prefill only the last
    prompt position can fire, METHODS.md section 1, as in the released code).

    ``released=True`` swaps the paper's span (:class:`~surgery.triggers.InThink`) for the released
    code's think flag (:class:`~surgery.triggers.SealThinkFlag`), which differs only after a prompt
    that holds a closed ``<think>…</think>`` (the flag says inside, the span outside).

    Example:
        >>> seal_trigger()
        And(left=And(left=OnTokens(strings=('\\n\\n',), ids=(), case_sensitive=True), right=InThink()), right=FromPromptEnd())
    """
    return OnTokens("\n\n") & (SealThinkFlag() if released else InThink()) & FromPromptEnd()


def seal_trigger_for(model, released: bool = False) -> Trigger:
    """SEAL's trigger for ``model``: :func:`seal_trigger` when it has ``<think>`` tokens; else
    ``OnText("\\n\\n") & StepWindow(1)``: the whole completion is the reasoning, so every
    generated token that completes a blank line, even one written as two "\\n" tokens or one
    that begins with the prompt's last "\\n" (prompt positions never fire). Extraction
    (:meth:`SteeringVector.from_thoughts`) reads its states where this trigger fires, so
    decode-time and extraction rules are the same rule on every tokenizer.

    Raises:
        ValueError: ``released=True`` for a model without ``<think>`` (the released code needs it).
    """
    if model.think_token_ids != (None, None):
        return seal_trigger(released)
    if released:
        raise ValueError(f"the released SEAL trigger needs '<think>' tokens, and {model.name} has none: "
                         "use seal_trigger_for(model) (every generated blank line)")
    return OnText("\n\n") & StepWindow(1)


@dataclass(frozen=True)
class SteeringVectorConfig:
    site: str = field(default="resid_pre.0", metadata={"help": "where to add: resid_pre.L (SEAL) or another residual site"})
    alpha: float = field(default=1.0, metadata={"help": "scale of the vector (SEAL: 1.0)"})
    when: Trigger = field(default_factory=seal_trigger, metadata={"help": "where it fires (SEAL: '\\n\\n' inside <think>)"})
    metadata: dict = field(default_factory=dict, metadata={"help": "where the vector came from (model, site, class counts)"})


@register_block("steering_vector")
class SteeringVector(ResidualAdd):
    """Add ``alpha * vector`` to ``site``'s input of block ``layer`` where ``when`` fires.

    Graph-safe, as :class:`ResidualAdd` (:attr:`~surgery.blocks.Block.graph_safe`).

    Args:
        vector: ``[d_model]``, finite, on the model's device and in its dtype.
        layer: block index (negative counts from the end). SEAL: 20 of 28 for
            R1-Distill-Qwen-1.5B/7B, 55 of 64 for QwQ-32B.
        alpha: scale (SEAL: 1.0).
        site: site kind, default ``"resid_pre"`` (SEAL's "input to block ``layer``").
        when: trigger, default :func:`seal_trigger`.
        metadata: where the vector came from (model, architecture, width, class counts);
            checked against the model when the vector is attached.
    """

    config_class = SteeringVectorConfig

    def __init__(
        self,
        vector: Tensor,
        layer: int,
        alpha: float = 1.0,
        site: str = "resid_pre",
        when: Trigger | None = None,
        metadata: dict | None = None,
    ):
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"layer must be a block index (int), got {layer!r}")
        kind = Site.parse(f"{site}.{layer}").kind
        super().__init__(vector, site=f"{kind}.{layer}", alpha=alpha, when=when if when is not None else seal_trigger())
        base = self.config
        self.config = SteeringVectorConfig(base.site, base.alpha, base.when, dict(metadata or {}))

    @property
    def metadata(self) -> dict:
        """Where the vector came from: model, architecture, width, site, class counts."""
        return self.config.metadata

    @classmethod
    def from_config(cls, config: SteeringVectorConfig, tensors: dict[str, Tensor]) -> SteeringVector:
        site = Site.parse(config.site)
        return cls(tensors["vector"], layer=site.layer, alpha=config.alpha, site=site.kind, when=config.when,
                   metadata=config.metadata)

    @classmethod
    def example(cls, model, prompts=(), identity: bool = False) -> SteeringVector:
        vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)) * 4
        return cls(vector.to(device=model.device, dtype=model.dtype), layer=model.n_layers // 2,
                   alpha=0.0 if identity else 1.0, when=OnText("\n\n"))

    def bind(self, model) -> None:
        made_for = self.metadata.get("architecture")
        if made_for is not None and made_for != model.architecture.name:
            raise ValueError(
                f"this steering vector was extracted from a {made_for} model ({self.metadata.get('model')}), "
                f"not from {model.name} ({model.architecture.name}): extract one for this model"
            )
        super().bind(model)

    # ---- extraction ------------------------------------------------------------------------
    @classmethod
    def from_thoughts(
        cls,
        model,
        traces: Sequence[tuple[str, str | Sequence[int]]],
        layer: int,
        *,
        site: str = "resid_pre",
        chat: bool = False,
        batch_size: int = 8,
        progress: bool | None = None,
        empty_thoughts: str = "skip",
        allow_empty_classes: bool = False,
        **options,
    ) -> SteeringVector:
        """Build SEAL's vector from reasoning traces: mean(execution) - mean(reflection ∪ transition).

        Each completion is cut into thoughts where the vector's own trigger (``when``, default
        :func:`seal_trigger_for` the model) fires when the trace is replayed
        (:func:`surgery.thoughts.thought_positions`): the states are read exactly where the
        vector will be added while decoding, on every tokenizer. Thought ``j`` is the text after
        separator ``j`` up to the next one; text before the first separator is not a thought.
        Each thought's state is read at its separator token.

        Args:
            model: the wrapped model.
            traces: ``(prompt, completion)`` pairs: the completion is the generated reasoning, as
                text or as the token ids the model generated (ids read the trace exactly as it
                was made; text is tokenised again, which may split some tokens differently).
            layer: block index; the states are read at ``site.layer`` (default ``resid_pre``).
            chat: wrap prompts in the chat template (as they were when the traces were made).
            batch_size: traces per forward pass.
            progress: show a progress bar (default: when there are several batches).
            empty_thoughts: an empty thought (a separator right after a separator): ``"skip"``
                (the paper: no thought is empty) or ``"execution"`` (the released code counts it as
                an execution thought).
            allow_empty_classes: a class group without thoughts counts as mean 0 (said in the
                metadata) instead of an error: for random-weights smoke runs, whose noise holds no
                reflection; never for a real vector.
            **options: passed to the constructor (``alpha``, ``when``; ``when`` defaults to
                :func:`seal_trigger_for` the model).

        Returns:
            The vector, with ``metadata`` naming the model, site, width and class counts.

        Raises:
            ValueError: no traces, or no execution thought, or no reflection/transition thought.
        """
        traces = list(traces)
        if not traces:
            raise ValueError("from_thoughts needs at least one (prompt, completion) trace")
        resolved = model.resolve_site(f"{site}.{layer}")
        options.setdefault("when", seal_trigger_for(model))
        states, labels = thought_states(model, traces, resolved, chat=chat, batch_size=batch_size, progress=progress,
                                        when=options["when"], empty_thoughts=empty_thoughts)
        counts = {label: labels.count(label) for label in THOUGHT_CLASSES}
        sums = {label: states[[i for i, seen in enumerate(labels) if seen == label]].double().sum(dim=0)
                for label in THOUGHT_CLASSES}
        empty = counts["execution"] == 0 or counts["reflection"] + counts["transition"] == 0
        if empty and not allow_empty_classes:
            raise ValueError(
                f"SEAL needs both execution and reflection/transition thoughts; the traces gave {counts}. "
                "Pass more traces, or traces whose reasoning has blank-line separated steps."
            )
        # an empty group's sum is 0, so with allow_empty_classes its mean is 0
        execution = sums["execution"] / max(counts["execution"], 1)
        other = (sums["reflection"] + sums["transition"]) / max(counts["reflection"] + counts["transition"], 1)
        vector = (execution - other).to(model.dtype)
        metadata = {
            "model": model.name,
            "architecture": model.architecture.name,
            "d_model": model.d_model,
            "site": str(resolved),
            "class_counts": counts,
            "n_traces": len(traces),
        }
        if empty:
            metadata["empty_classes_as_zero"] = "random-weights smoke run: a class without thoughts has mean 0"
        return cls(vector, layer=resolved.layer, site=resolved.kind, metadata=metadata, **options)

    # ---- saving ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the vector, its config and metadata to one safetensors file (:func:`surgery.files.saving.save_blocks`)."""
        return save_blocks(path, [self])

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> SteeringVector:
        """Read a vector written by :meth:`save` (config, trigger and metadata included)."""
        blocks = load_blocks(path, device=device, dtype=dtype)
        if len(blocks) != 1 or not isinstance(blocks[0], cls):
            raise ValueError(f"{path} holds {[b.name for b in blocks]}, not one steering vector: use surgery.files.saving.load_blocks")
        return blocks[0]
