"""RepresentationRecycling (RR): run one block twice where the model is about to think aloud.

arXiv 2506.02867 §5 (METHODS.md §2 "RR"): when the greedy next token of a row is a thinking
token (So, Let, Hmm, ...), recompute that row's last position with block ``layer`` applied
twice (its output fed to it once more), run the blocks above on the result, and emit the
argmax of the new logits. The recomputed keys and values replace the old ones in the KV cache,
so later tokens attend to the recycled position.

How it runs here: the engine re-runs the step's last position from block ``layer`` up, on the
input block ``layer`` received in the step's forward, with the KV cache of those blocks rolled
back one position (:attr:`rerun_layer`; :mod:`surgery.partial_rerun`). Blocks below ``layer``
would recompute the same values, so they are not run again (on a TransformerLens bridge the
engine re-runs the whole model: same tokens, more cost). During the re-run, a hook on block
``layer`` applies the block's ``forward`` a second time to its own output for the firing rows,
after rolling that layer's cache back one more position, so the second application attends to
the past as the first did and its keys/values are the ones kept. Rows that do not fire keep
their first pass exactly (keys and values restored). Works with either KV cache kind
(:mod:`surgery.kv_cache`).

Paper-compatible: the released trigger set (default), ``layer`` 23 of 32 for
R1-Distill-Llama-8B, and ``probability=0.5`` reproduces the released code's coin flip. The coin
is a hash of (seed, the row's prompt, position), so a row flips the same coins alone or in a
batch. A token triggers when its text, stripped, is one of the words. RR is defined for greedy
decoding; with sampling, the sampled token triggers and the argmax replaces it.

Example:
    >>> rr = RepresentationRecycling(layer=23, probability=0.5, seed=0)
    >>> rr.config.trigger_words[:3]
    ('So', 'Let', 'Hmm')
    >>> model = surgery.load()                                            # doctest: +SKIP
    >>> with surgery.trace(model, RepresentationRecycling(layer=20)) as tr:   # doctest: +SKIP
    ...     out = tr.generate(["What is 7 * 8?"], max_new_tokens=64, chat=True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from surgery.blocks import Intervention, per_row, register_block
from surgery.kv_cache import last_entry, restore_last_entry, rollback
from surgery.triggers import Trigger

__all__ = ["RR_TRIGGER_WORDS", "RepresentationRecycling", "RepresentationRecyclingConfig"]

RR_TRIGGER_WORDS = ("So", "Let", "Hmm", "I", "The", "Okay", "That", "First", "Now", "Wait")
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class RepresentationRecyclingConfig:
    layer: int = field(default=0, metadata={"help": "block applied twice (negative from the end)"})
    trigger_words: tuple[str, ...] = field(default=RR_TRIGGER_WORDS, metadata={"help": "thinking tokens that trigger it"})
    probability: float = field(default=1.0, metadata={"help": "chance a trigger fires (released code: 0.5; 0: never)"})
    seed: int = field(default=0, metadata={"help": "seed of the coin flips"})
    when: Trigger | None = field(
        default=None, metadata={"help": "fire where this trigger holds at the emitting position instead of on the words"}
    )


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash (lowbias32), elementwise on int64 tensors."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def coin(seed: int, row_keys: Tensor, positions: Tensor) -> Tensor:
    """Uniform numbers in [0, 1) from (seed, row key, position): the same for a row alone or batched."""
    x = _mix(row_keys + _mix(positions + _mix(torch.full_like(positions, seed))))
    return x.double() / 2**32


@register_block("representation_recycling")
class RepresentationRecycling(Intervention):
    """Re-run block ``layer`` twice at positions whose next token is a thinking word.

    Graph-safe (:attr:`~surgery.blocks.Block.graph_safe`): in a decode step's forward it only
    records block inputs (:mod:`surgery.partial_rerun`); the decision and the re-run happen in
    the token-choice phase, eagerly, on the steps that fire (one host sync per token while
    attached).

    Args:
        layer: the block to apply twice (negative counts from the end).
        trigger_words: words whose token (stripped text equal to the word) triggers recycling.
        probability: chance that a trigger fires, in [0, 1] (0 never fires: the identity setting).
        seed: seed of the coin flips.
        when: a trigger that replaces the word list: RR fires for a row where it holds at the
            step's last position, the one whose output emits the token (so ``OnTokens`` there
            means the *fed* token). Closed loop: ``when=OnSignal(mi, "peak")`` recycles where the
            MI of the emitting state crosses the row's running Tukey fence
            (:class:`probes.MIEstimator`), measured in the same forward, instead of on words
            that tend to sit at peaks. The coin still applies.
    """

    graph_safe = True  # see surgery.blocks.Block.graph_safe
    config_class = RepresentationRecyclingConfig

    @classmethod
    def example(cls, model, prompts=(), identity: bool = False) -> RepresentationRecycling:
        # many common words, so that it fires on a random model too; probability 0 never fires
        words = sorted({t.strip() for t in model.vocabulary_texts if t.strip().isalpha()})[:64]
        return cls(layer=model.n_layers // 2, trigger_words=words, probability=0.0 if identity else 0.5, seed=1)

    def by_row(self) -> list[list[int]]:
        return self.fired()

    @property
    def rerun_layer(self) -> int | None:
        return getattr(self, "_layer", None)

    def __init__(self, layer: int, trigger_words=RR_TRIGGER_WORDS, probability: float = 1.0, seed: int = 0,
                 when: Trigger | None = None):
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layer must be a block index (int), got {layer!r}")
        trigger_words = (trigger_words,) if isinstance(trigger_words, str) else tuple(trigger_words)
        if not trigger_words or any(not isinstance(w, str) or not w.strip() for w in trigger_words):
            raise ValueError(f"RepresentationRecycling needs non-empty trigger words, got {trigger_words!r}")
        if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
            raise ValueError(f"probability must be in [0, 1], got {probability!r}")
        if when is not None and not isinstance(when, Trigger):
            raise TypeError(f"when must be a surgery trigger (or None for the word list), got {type(when).__name__}")
        self.config = RepresentationRecyclingConfig(layer, trigger_words, float(probability), int(seed), when)
        self._records: list[tuple[Tensor, Tensor]] = []

    def sites(self) -> tuple[str, ...]:
        return ()

    def bind(self, model) -> None:
        if not -model.n_layers <= self.config.layer < model.n_layers:
            raise ValueError(
                f"layer {self.config.layer} is out of range: {model.name} has {model.n_layers} blocks "
                f"(0..{model.n_layers - 1}, or {-model.n_layers}..-1 from the end)"
            )
        self._layer = self.config.layer % model.n_layers
        self._block = model.architecture.block_list(model.module)[self._layer]
        if self.config.when is not None:  # the words are not used
            self.config.when.bind(model)
            return
        stripped = [text.strip() for text in model.vocabulary_texts]
        missing = [w for w in self.config.trigger_words if w.strip() not in stripped]
        if missing:
            raise ValueError(
                f"RepresentationRecycling cannot encode the trigger words {missing} as single tokens "
                f"of {model.name}'s vocabulary; drop them from trigger_words"
            )
        words = {w.strip() for w in self.config.trigger_words}
        self._triggers = torch.tensor([text in words for text in stripped], dtype=torch.bool, device=model.device)

    def reset(self, batch_size: int) -> None:
        self._records = []
        self._row_keys = None

    def _keys(self, choice) -> Tensor:
        """A per-row key from the row's prompt tokens (computed at the first token)."""
        if self._row_keys is None:
            step = choice.step
            weights = _mix(step.positions + 1)
            self._row_keys = _mix(((step.token_ids * weights) & _MASK32).where(step.valid, 0).sum(dim=1))
        return self._row_keys

    def choose(self, choice) -> None:
        if self.config.when is None:
            fire = self._triggers[choice.chosen] & ~choice.finished
        else:
            fire = self.config.when(choice.step.tail(1))[:, 0] & ~choice.finished
        positions = choice.step.positions[:, -1]
        if self.config.probability < 1:
            fire &= coin(self.config.seed, self._keys(choice), positions) < self.config.probability
        self._records.append((positions, fire))
        if not bool(fire.any()):  # one host sync per token while attached: the re-run is the cost
            return
        logits = choice.recompute(
            lambda: [self._block.register_forward_hook(self._doubler(fire), with_kwargs=True, prepend=True)],
            from_layer=self._layer,
        )
        choice.replace(fire, logits.argmax(dim=-1))

    def _doubler(self, fire: Tensor):
        from transformers import Cache

        layer = self._layer

        def hook(module, args, kwargs, output):
            first = output[0] if isinstance(output, tuple) else output
            cache = next(v for v in (*args, *kwargs.values()) if isinstance(v, Cache))
            keys, values = last_entry(cache, layer)
            rollback(cache, [layer])  # the second application attends to the same past as the first
            again = module.forward(first, *args[1:], **kwargs)
            second = again[0] if isinstance(again, tuple) else again
            restore_last_entry(cache, layer, keys, values, ~fire)
            result = torch.where(fire[:, None, None], second, first)
            return (result, *output[1:]) if isinstance(output, tuple) else result

        return hook

    def reruns(self) -> int:
        """How many decode steps of the last run were re-run (rows firing together share one)."""
        return sum(bool(fire.any()) for _, fire in self._records)

    def fired(self) -> list[list[int]]:
        """Per row of the last run, the position ids that were recycled."""
        return per_row(self._records)
