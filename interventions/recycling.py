"""RepresentationRecycling (RR): run one block twice where the model is about to think aloud.

arXiv 2506.02867 §5 (METHODS.md §2 "RR"): when the greedy next token of a row is a thinking
token (So, Let, Hmm, ...), recompute that row's last position with block ``layer`` applied
twice (its output fed to it once more), run the blocks above on the result, and emit the
argmax of the new logits. The recomputed keys and values replace the old ones in the KV cache,
so later tokens attend to the recycled position.

How it runs here: the engine re-runs the step's last position from block ``layer`` up, on the
input block ``layer`` received in the step's forward, with the KV cache of those blocks rolled
back one position (:attr:`rerun_layer`; :mod:`surgery.decode.partial_rerun`). Blocks below ``layer``
would recompute the same values, so they are not run again (on a TransformerLens bridge the
engine re-runs the whole model: same tokens, more cost). During the re-run, a hook on block
``layer`` applies the block's ``forward`` a second time to its own output for the firing rows,
after rolling that layer's cache back one more position, so the second application attends to
the past as the first did and its keys/values are the ones kept. Rows that do not fire keep
their first pass exactly (keys and values restored). Works with either KV cache kind
(:mod:`surgery.decode.kv_cache`).

Paper-compatible: the released trigger set (default), ``layer`` 23 of 32 for
R1-Distill-Llama-8B, and ``probability=0.5``. The default coin (``coin="hash"``) is a hash of
(seed, the row's prompt, position), so a row flips the same coins alone or in a batch. A token
triggers when its text, stripped, is one of the words. RR is defined for greedy decoding; with
sampling, the sampled token triggers and the argmax replaces it.

The released code (ChnQ/MI-Peaks bcee82c, ``src/applications/RR_model.py``,
``RR_evaluate.py``, ``scripts/run_RR.sh``), as named options:

- ``coin="released"``: ``random.random() < 0.5`` from Python's global stream, seeded 0 once per
  process (RR_evaluate.py L495, utils.py L15), drawn only when the greedy candidate is a trigger
  (RR_model.py L153: the ``and`` short-circuits; an EOS candidate ends the row first, L149),
  one prompt after another (RR_evaluate.py L311). Here: one ``random.Random(seed)`` per block,
  one draw per row whose token is a trigger and does not stop it; rows of one step draw in batch
  order; the stream goes on across runs (:meth:`~RepresentationRecycling.restart_coin` restarts
  it). The released order is therefore reproduced by running the prompts one at a time, in
  order, through one block, or in one call with ``batch_size=1`` (a batch draws step by step,
  rows in order: what the released loop would do in lockstep). One host sync per token (RR has
  one anyway); the decode step's forward is untouched, so the block stays graph-safe.
- ``trigger_ids``: the released triggers are token ids (:mod:`interventions.recycling_triggers`:
  :func:`~interventions.recycling_triggers.released_trigger_ids`, and for R1-Distill-Llama-8B
  :data:`~interventions.recycling_triggers.RELEASED_LLAMA8B_TRIGGER_IDS`).
- ``layer=23`` (run_RR.sh L21, the same layer extracted and injected). The released loop
  re-runs the whole model with block 23's input at the last position replaced by its first
  output (RR_model.py L68-78, L160-178): the block applied twice, as here. Not reproduced: the
  released loop never checks a recycled token for EOS (L164-188) and decodes on; here it ends the row.

Under continuous batching (``tr.generate(prompts, n, batch_size=N)``, :mod:`surgery.decode.slots`),
what "alone" means for each coin:

- ``coin="hash"``: exact. A row's coins come from its own prompt (its key, read at the row's
  own prefill, also when it is admitted into a freed slot mid-run) and its own positions, so
  each prompt recycles the positions, and emits the tokens, that it does alone.
- ``coin="released"``: not per prompt. The stream belongs to the run (to the block), as in a
  fixed batch: each pool step draws for its candidate rows in slot order, so which numbers a
  prompt gets depends on which prompts share the pool with it and on when it was admitted. The
  draws are reproducible (the same prompts, budgets and ``batch_size`` draw the same), and
  ``batch_size=1`` is the released order; a prompt's result equals its run alone only where
  the coin cannot matter (``probability`` 0 or 1).

A row's lifecycle: :meth:`~RepresentationRecycling.admit` forgets the recycled positions of
the slots that new rows take, :meth:`~RepresentationRecycling.retire` keeps a finished row's
under its prompt's index. The engine re-runs the first recompute after an admission in full
(the recorded block inputs were the admitted rows' prefill: ``LayerInputs.forget``).

Example:
    >>> rr = RepresentationRecycling(layer=23, probability=0.5, seed=0)
    >>> rr.config.trigger_words[:3]
    ('So', 'Let', 'Hmm')
    >>> from interventions.recycling_triggers import RELEASED_LLAMA8B_TRIGGER_IDS
    >>> released = RepresentationRecycling(23, probability=0.5, coin="released",   # the released run
    ...                                    trigger_ids=RELEASED_LLAMA8B_TRIGGER_IDS)
    >>> len(released.config.trigger_ids)
    23
    >>> model = surgery.load()                                            # doctest: +SKIP
    >>> with surgery.trace(model, RepresentationRecycling(layer=20)) as tr:   # doctest: +SKIP
    ...     out = tr.generate(["What is 7 * 8?"], max_new_tokens=64, chat=True)
"""

from __future__ import annotations

from collections.abc import Sequence
import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from interventions.recycling_triggers import (  # noqa: F401  (all still importable from here)
    RELEASED_LLAMA8B_TRIGGER_IDS,
    RELEASED_LLAMA8B_TRIGGERS,
    RR_TRIGGER_WORDS,
    released_trigger_ids,
    trigger_ids_for_words,
)
from surgery.blocks import Intervention, register_block
from surgery.row_entries import per_row, pick_rows, retired_rows
from surgery.decode.kv_cache import last_entry, restore_last_entry, rollback
from surgery.step import Step
from surgery.triggers import Trigger

__all__ = ["COINS", "RepresentationRecycling", "RepresentationRecyclingConfig"]

COINS = ("hash", "released")
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
    coin: str = field(default="hash", metadata={
        "help": '"hash": seeded per (row, position), the same alone or batched; "released": random.Random(seed), '
                "one draw per trigger candidate in process order, as the released code"})
    trigger_ids: tuple[int, ...] | None = field(
        default=None, metadata={"help": "token ids that trigger it instead of trigger_words (released_trigger_ids)"}
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


def prompt_keys(step: Step) -> Tensor:
    """Each row's key from its prompt: a hash of the valid tokens of a prefill ``step`` and their
    positions, ``[batch]`` (the hash coin's row key)."""
    weights = _mix(step.positions + 1)
    return _mix(((step.token_ids * weights) & _MASK32).where(step.valid, 0).sum(dim=1))


@register_block("representation_recycling")
class RepresentationRecycling(Intervention):
    """Re-run block ``layer`` twice at positions whose next token is a thinking word.

    Graph-safe (:attr:`~surgery.blocks.Block.graph_safe`): in a decode step's forward it only
    records block inputs (:mod:`surgery.decode.partial_rerun`); the decision and the re-run happen in
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
        coin: ``"hash"`` (default): a per-row hash, the same alone, batched or admitted into a
            slot mid-run (it then reads each row's prompt at its prefill, through a hook at
            ``resid_pre.<layer>`` that changes nothing). ``"released"``: the released code's
            draws from ``random.Random(seed)`` (module docstring): a row's coins then depend on
            the rows drawn before it, in a fixed batch as under continuous batching.
        trigger_ids: token ids that trigger instead of ``trigger_words`` (released:
            :data:`~interventions.recycling_triggers.RELEASED_LLAMA8B_TRIGGER_IDS` for
            R1-Distill-Llama-8B, or :func:`~interventions.recycling_triggers.released_trigger_ids`
            of the word file).

    Raises:
        ValueError: a bad layer, word list, id list, probability, seed or coin (at
            construction), or a layer or word the model lacks (on entering a trace).
    """

    graph_safe = True  # see surgery.blocks.Block.graph_safe
    config_class = RepresentationRecyclingConfig

    @classmethod
    def example(cls, model, prompts=(), identity: bool = False) -> RepresentationRecycling:
        # many common words, so that it fires on a random model too; probability 0 never fires
        words = sorted({t.strip() for t in model.vocabulary_texts if t.strip().isalpha()})[:64]
        return cls(layer=model.n_layers // 2, trigger_words=words, probability=0.0 if identity else 0.5, seed=1)

    def by_row(self, rows: Sequence[int] | None = None) -> list[list[int]]:
        return self.fired(rows)

    @property
    def rerun_layer(self) -> int | None:
        return getattr(self, "_layer", None)

    def __init__(self, layer: int, trigger_words=RR_TRIGGER_WORDS, probability: float = 1.0, seed: int = 0,
                 when: Trigger | None = None, coin: str = "hash", trigger_ids=None):
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layer must be a block index (int), got {layer!r}")
        trigger_words = (trigger_words,) if isinstance(trigger_words, str) else tuple(trigger_words)
        if not trigger_words or any(not isinstance(w, str) or not w.strip() for w in trigger_words):
            raise ValueError(f"RepresentationRecycling needs non-empty trigger words, got {trigger_words!r}")
        if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
            raise ValueError(f"probability must be in [0, 1], got {probability!r}")
        if when is not None and not isinstance(when, Trigger):
            raise TypeError(f"when must be a surgery trigger (or None for the word list), got {type(when).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if coin not in COINS:
            raise ValueError(f"coin must be one of {COINS}, got {coin!r}")
        if trigger_ids is not None:
            trigger_ids = tuple(trigger_ids)
            if not trigger_ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in trigger_ids):
                raise ValueError(f"trigger_ids must be non-empty token ids (integers >= 0), got {trigger_ids!r}")
            if when is not None:
                raise ValueError("give trigger_ids or when, not both: each replaces the word list")
            trigger_ids = tuple(sorted(set(trigger_ids)))
        self.config = RepresentationRecyclingConfig(layer, trigger_words, float(probability), seed, when, coin,
                                                    trigger_ids)
        self.reset(0)
        self.restart_coin()

    def restart_coin(self, draws: int = 0) -> None:
        """``coin="released"``: restart the stream at ``seed``, then skip ``draws`` numbers (to go
        on from :attr:`coin_draws` of an earlier process). Unused by the hash coin."""
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
            raise ValueError(f"draws must be an integer >= 0, got {draws!r}")
        self._stream = random.Random(self.config.seed)
        for _ in range(draws):
            self._stream.random()
        self.coin_draws = draws  # numbers drawn from the released stream so far

    def sites(self) -> tuple[str, ...]:
        hashed = self.config.coin == "hash" and self.config.probability < 1  # reads each prompt (edit)
        return (f"resid_pre.{self.config.layer}",) if hashed else ()

    def edit(self, site: str, value: Tensor, step: Step) -> Tensor:
        """Changes nothing; at a prefill, reads the prompt key of each row it prefills (all rows,
        or the rows admitted into slots, the others not valid there) for the hash coin."""
        if step.is_prefill and not step.is_rerun:
            keys = prompt_keys(step)
            self._row_keys = keys if self._row_keys is None else torch.where(step.valid.any(dim=1), keys, self._row_keys)
        return value

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
        ids = self.config.trigger_ids
        if ids is None:
            ids = trigger_ids_for_words(model, self.config.trigger_words)
        elif ids[-1] >= model.vocab_size:
            raise ValueError(f"trigger_ids {[i for i in ids if i >= model.vocab_size]} are outside {model.name}'s "
                             f"vocabulary (0..{model.vocab_size - 1}): were they made for another tokenizer?")
        self._triggers = torch.zeros(model.vocab_size, dtype=torch.bool, device=model.device)
        self._triggers[list(ids)] = True

    def reset(self, batch_size: int) -> None:
        self._records: list[tuple[Tensor, Tensor]] = []  # per token choice: (positions, fired), [batch] each
        self._retired: dict[int, list[int]] = {}  # prompt -> its recycled positions (continuous batching)
        self._row_keys: Tensor | None = None  # the hash coin's per-row prompt keys (edit)
        self._reruns = 0

    def admit(self, rows: Tensor, prompts: list[int]) -> None:
        # the slots' prompt keys are read at the admitted rows' prefill (edit); the released stream is the run's
        self._records = [(positions, fire & ~rows) for positions, fire in self._records]
        self._records = [(positions, fire) for positions, fire in self._records if bool(fire.any())]

    def retire(self, slot: int, row: int) -> None:
        records = [(positions[slot : slot + 1], fire[slot : slot + 1]) for positions, fire in self._records]
        self._retired[row] = per_row(records)[0] if records else []

    def choose(self, choice) -> None:
        if self.config.when is None:
            fire = self._triggers[choice.chosen] & ~choice.finished
        else:
            fire = self.config.when(choice.step.tail(1))[:, 0] & ~choice.finished
        positions = choice.step.positions[:, -1]
        if self.config.coin == "released":
            fire = self._released_coin(fire & ~choice.stops)
        elif self.config.probability < 1:
            fire &= coin(self.config.seed, self._row_keys, positions) < self.config.probability
        self._records.append((positions, fire))
        if not bool(fire.any()):  # one host sync per token while attached: the re-run is the cost
            return
        self._reruns += 1
        logits = choice.recompute(
            lambda: [self._block.register_forward_hook(self._doubler(fire), with_kwargs=True, prepend=True)],
            from_layer=self._layer,
        )
        choice.replace(fire, logits.argmax(dim=-1))

    def _released_coin(self, candidates: Tensor) -> Tensor:
        """One draw per candidate row, in batch (slot) order (a host sync: the draws are Python's)."""
        rows = candidates.nonzero().flatten().tolist()
        kept = [row for row in rows if self._stream.random() < self.config.probability]
        self.coin_draws += len(rows)
        fire = torch.zeros_like(candidates)
        if kept:
            fire[kept] = True
        return fire

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
        """How many decode steps of the last run were re-run (rows firing together share one;
        under continuous batching, rows of different prompts in one pool step too)."""
        return self._reruns

    def fired(self, rows: Sequence[int] | None = None) -> list[list[int]]:
        """Per row of the last run (or of ``rows``, :meth:`~surgery.blocks.Block.by_row`), the
        position ids that were recycled (after a continuous run: per prompt, in prompt order)."""
        if self._retired:
            return retired_rows(self._retired, rows)
        return pick_rows(per_row(self._records), rows)
