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
  order, through one block (a batch draws step by step, rows in order: what the released loop
  would do in lockstep). One host sync per token (RR has one anyway); the decode step's forward
  is untouched, so the block stays graph-safe.
- ``trigger_ids``: the released triggers are token ids, the union of the ids listed for the
  first 10 letters-only words of ``data/<model>.jsonl`` (RR_evaluate.py L465-493):
  :func:`released_trigger_ids`; for R1-Distill-Llama-8B, :data:`RELEASED_LLAMA8B_TRIGGER_IDS`
  (2-3 ids per word; :func:`trigger_ids_for_words` builds the same kind of list, the tokens
  whose stripped text is the word, for any vocabulary).
- ``layer=23`` (run_RR.sh L21, the same layer extracted and injected). The released loop
  re-runs the whole model with block 23's input at the last position replaced by its first
  output (RR_model.py L68-78, L160-178): the block applied twice, as here. Not reproduced: the
  released loop never checks a recycled token for EOS (L164-188) and decodes on; here it ends the row.

Example:
    >>> rr = RepresentationRecycling(layer=23, probability=0.5, seed=0)
    >>> rr.config.trigger_words[:3]
    ('So', 'Let', 'Hmm')
    >>> released = RepresentationRecycling(23, probability=0.5, coin="released",   # the released run
    ...                                    trigger_ids=RELEASED_LLAMA8B_TRIGGER_IDS)
    >>> len(released.config.trigger_ids)
    23
    >>> model = surgery.load()                                            # doctest: +SKIP
    >>> with surgery.trace(model, RepresentationRecycling(layer=20)) as tr:   # doctest: +SKIP
    ...     out = tr.generate(["What is 7 * 8?"], max_new_tokens=64, chat=True)
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from surgery.blocks import Intervention, per_row, register_block
from surgery.decode.kv_cache import last_entry, restore_last_entry, rollback
from surgery.triggers import Trigger

__all__ = [
    "COINS",
    "RELEASED_LLAMA8B_TRIGGERS",
    "RELEASED_LLAMA8B_TRIGGER_IDS",
    "RR_TRIGGER_WORDS",
    "RepresentationRecycling",
    "RepresentationRecyclingConfig",
    "released_trigger_ids",
    "trigger_ids_for_words",
]

RR_TRIGGER_WORDS = ("So", "Let", "Hmm", "I", "The", "Okay", "That", "First", "Now", "Wait")
COINS = ("hash", "released")
_MASK32 = 0xFFFFFFFF

RELEASED_LLAMA8B_TRIGGERS = (
    ("So", (2100, 4516, 78012)), ("Let", (6914, 10267)), ("Hmm", (81122, 89290)), ("I", (40, 358, 25494)),
    ("The", (578, 791, 33026)), ("Okay", (33413, 36539)), ("That", (3011, 4897)), ("First", (5451, 5629)),
    ("Now", (4800, 7184)), ("Wait", (14144, 14524)),
)
"""The released word records RR reads for R1-Distill-Llama-8B: the first 10 letters-only entries
of ``src/applications/data/DeepSeek-R1-Distill-Llama-8B.jsonl`` (Llama-3 token ids)."""


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


def released_trigger_ids(records, n_words: int = 10) -> tuple[int, ...]:
    """The released trigger ids: the union of the ids of the first ``n_words`` letters-only words.

    RR_evaluate.py L465-493, in our words: read the records in order, keep those whose word
    matches ``^[a-zA-Z]+$`` (``re.match``), stop after ``n_words`` of them, gather their ids.

    Args:
        records: a path to the released ``data/<model>.jsonl`` (one ``{"word", "token_ids"}`` per
            line), or the records themselves: dicts with those keys, or ``(word, ids)`` pairs.
        n_words: how many words (released: 10).

    Returns:
        The ids, sorted.

    Example:
        >>> released_trigger_ids([{"word": "So", "token_ids": [5, 3]}, {"word": "\\n", "token_ids": [9]},
        ...                       ("Let", [7]), ("Hmm", [8])], n_words=2)
        (3, 5, 7)
    """
    if isinstance(n_words, bool) or not isinstance(n_words, int) or n_words < 1:
        raise ValueError(f"n_words must be a positive integer, got {n_words!r}")
    if isinstance(records, (str, Path)):
        records = [json.loads(line) for line in Path(records).read_text(encoding="utf-8").splitlines() if line.strip()]
    english, ids, taken = re.compile(r"^[a-zA-Z]+$"), set(), 0
    for record in records:
        if taken >= n_words:
            break
        word, token_ids = (record.get("word", ""), record.get("token_ids", [])) if isinstance(record, dict) else record
        if english.match(word):
            taken += 1
            ids.update(int(i) for i in token_ids)
    if not ids:
        raise ValueError("no letters-only word with token ids among the records: is this the released word file?")
    return tuple(sorted(ids))


RELEASED_LLAMA8B_TRIGGER_IDS = released_trigger_ids(RELEASED_LLAMA8B_TRIGGERS)
"""The 23 token ids the released RR triggers on for R1-Distill-Llama-8B (Llama-3 vocabulary)."""


def trigger_ids_for_words(model, words: Iterable[str]) -> tuple[int, ...]:
    """Token ids of ``model``'s vocabulary whose text, stripped, is one of ``words`` (sorted).

    The rule ``trigger_words`` uses; on R1-Distill-Qwen it gives 2-3 ids per released word
    ("So": " So", "So", "\\tSo"), as many as the released Llama-8B file lists per word.

    Raises:
        ValueError: a word is no single token of the vocabulary.
    """
    words = [words] if isinstance(words, str) else list(words)
    stripped = [text.strip() for text in model.vocabulary_texts]
    missing = [w for w in words if w.strip() not in stripped]
    if missing or not words:
        raise ValueError(
            f"RepresentationRecycling cannot encode the trigger words {missing or words} as single tokens "
            f"of {model.name}'s vocabulary; drop them from trigger_words"
        )
    wanted = {w.strip() for w in words}
    return tuple(i for i, text in enumerate(stripped) if text in wanted)


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
        coin: ``"hash"`` (default): a per-row hash, the same alone or batched. ``"released"``:
            the released code's draws from ``random.Random(seed)`` (module docstring): a row's
            coins then depend on the rows drawn before it.
        trigger_ids: token ids that trigger instead of ``trigger_words`` (released:
            :data:`RELEASED_LLAMA8B_TRIGGER_IDS` for R1-Distill-Llama-8B, or
            :func:`released_trigger_ids` of the word file).

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

    def by_row(self) -> list[list[int]]:
        return self.fired()

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
        self._records: list[tuple[Tensor, Tensor]] = []
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
        ids = self.config.trigger_ids
        if ids is None:
            ids = trigger_ids_for_words(model, self.config.trigger_words)
        elif ids[-1] >= model.vocab_size:
            raise ValueError(f"trigger_ids {[i for i in ids if i >= model.vocab_size]} are outside {model.name}'s "
                             f"vocabulary (0..{model.vocab_size - 1}): were they made for another tokenizer?")
        self._triggers = torch.zeros(model.vocab_size, dtype=torch.bool, device=model.device)
        self._triggers[list(ids)] = True

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
        if self.config.coin == "released":
            fire = self._released_coin(fire & ~choice.stops)
        elif self.config.probability < 1:
            fire &= coin(self.config.seed, self._keys(choice), positions) < self.config.probability
        self._records.append((positions, fire))
        if not bool(fire.any()):  # one host sync per token while attached: the re-run is the cost
            return
        logits = choice.recompute(
            lambda: [self._block.register_forward_hook(self._doubler(fire), with_kwargs=True, prepend=True)],
            from_layer=self._layer,
        )
        choice.replace(fire, logits.argmax(dim=-1))

    def _released_coin(self, candidates: Tensor) -> Tensor:
        """One draw per candidate row, in batch order (a host sync: the draws are Python's)."""
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
        """How many decode steps of the last run were re-run (rows firing together share one)."""
        return sum(bool(fire.any()) for _, fire in self._records)

    def fired(self) -> list[list[int]]:
        """Per row of the last run, the position ids that were recycled."""
        return per_row(self._records)
