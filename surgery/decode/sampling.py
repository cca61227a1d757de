"""Sampling that does not depend on the batch: one random stream per row, seeded by its key.

Rows drawn from one shared generator get tokens that depend on the rows beside them. Here every
row has its own ``torch.Generator``, seeded from ``(seed, the row's key)`` by a stable hash
(:func:`row_seed`: BLAKE2b, never Python's ``hash``, which is salted per process), and each
draw for a row uses only that row's probabilities. A row with the same key and seed therefore
samples the same tokens alone, at any place in any batch, in any process: on the same kind of
device (CPU and CUDA generators give different streams), and up to the float noise that padding
adds to a row's logits (it flips a draw only at a tie within rounding).

The keys (:func:`row_keys_for`): given explicitly (strings or ints, unique in the batch), or by
default the row's prompt tokens plus which copy of that prompt the row is in the batch (0 for
the first), so copies of one prompt draw different tokens while each stays independent of the
other rows. A prompt's first copy has the same key wherever it runs; a later copy does not.

One draw per row per generated token: :meth:`RowSampler.sample` draws for every row, so a row's
k-th token always comes from the k-th draw of its stream, whatever the other rows do. A row that
has finished draws too (its draws come after its last token, so they change nothing; skipping it
would need the finished flags on the host, a device sync every step), and a token that a block
forces or replaces (:class:`~surgery.blocks.TokenChoice`) has used its row's draw as well (the
blocks decide from the sampled token): every row consumes exactly one draw per step it runs.

Example:
    >>> import torch
    >>> logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    >>> batched = RowSampler(seed=0, keys=["a", "b", "c"]).sample(logits)
    >>> alone = RowSampler(seed=0, keys=["b"]).sample(logits[1:2])
    >>> bool(batched[1] == alone[0])
    True
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["RowKey", "RowSampler", "row_keys_for", "row_seed", "sampling_probs"]

#: What names a row's random stream: a string or an int (an int and its decimal string differ).
RowKey = str | int


def sampling_probs(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """The distribution to sample from: softmax of ``logits / temperature``, cut to the nucleus.

    ``top_p`` drops a token when the tokens ranked above it already hold ``top_p`` of the mass
    (1.0 keeps every token; the top token is always kept). ``logits`` is ``[batch, vocab]``.

    Example:
        >>> sampling_probs(torch.tensor([[2.0, 1.0, 0.0]]), top_p=0.5)
        tensor([[1., 0., 0.]])
    """
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def _check_key(key) -> None:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"row keys are strings or ints, got {key!r} ({type(key).__name__})")


def row_seed(seed: int, key: RowKey) -> int:
    """The seed of one row's generator: a 63-bit BLAKE2b hash of ``(seed, key)``.

    Stable across processes, machines and Python versions (the int key ``1`` and the string
    ``"1"`` are different keys).

    Example:
        >>> row_seed(0, "a") == row_seed(0, "a") != row_seed(1, "a")
        True
        >>> row_seed(0, 1) != row_seed(0, "1")
        True
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    _check_key(key)
    text = f"{seed}\x00{type(key).__name__}\x00{key}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def row_keys_for(
    input_ids: Tensor, attention_mask: Tensor, row_keys: Sequence[RowKey] | None = None, unique: bool = True
) -> list[RowKey]:
    """Each row's key: ``row_keys`` checked against the batch, or by default from the prompts.

    The default key of a row is ``"prompt:<its token ids>#<copy>"``: the prompt's tokens
    (padding excluded) and how many rows before it in the batch have the same tokens.

    Args:
        input_ids: ``[batch, pos]`` left-padded prompts (from :func:`surgery.encode_prompts`).
        attention_mask: ``[batch, pos]``, 0 on padding.
        row_keys: one string or int per row, unique in the batch; None for the defaults.
        unique: refuse repeated ``row_keys`` (False: rows with equal keys draw the same stream,
            e.g. one problem under several conditions of a study sharing a slot pool).

    Raises:
        ValueError: ``row_keys`` has the wrong length or a repeated key.
        TypeError: a key is neither a string nor an int.

    Example:
        >>> ids = torch.tensor([[0, 5, 6], [5, 6, 7], [0, 5, 6]])
        >>> row_keys_for(ids, (ids > 0).long())
        ['prompt:5,6#0', 'prompt:5,6,7#0', 'prompt:5,6#1']
    """
    batch = input_ids.shape[0]
    if row_keys is not None:
        if isinstance(row_keys, (str, bytes)) or len(row_keys) != batch:
            raise ValueError(f"row_keys needs one key per prompt ({batch}), got {row_keys!r}")
        for key in row_keys:
            _check_key(key)
        repeated = sorted({repr(k) for k, n in Counter(row_keys).items() if n > 1})
        if repeated and unique:
            raise ValueError(f"row_keys must be unique in the batch (equal keys sample equal tokens): {', '.join(repeated)} repeat")
        return list(row_keys)
    copies: Counter[str] = Counter()
    keys: list[RowKey] = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        tokens = ",".join(str(t) for t, m in zip(ids, mask) if m)
        keys.append(f"prompt:{tokens}#{copies[tokens]}")
        copies[tokens] += 1
    return keys


class RowSampler:
    """Draws one token per row per call, each row from its own generator seeded by its key.

    Args:
        seed: the run's seed; None draws one from torch's global CPU generator (so
            ``torch.manual_seed`` makes the run repeatable, as before per-row streams).
        keys: one key per row (see :func:`row_keys_for`).
        temperature: softmax temperature (> 0).
        top_p: nucleus mass in (0, 1] (see :func:`sampling_probs`).

    The generators are made at the first draw, on the device of the logits (the model's):
    CUDA generators for a model on CUDA.
    """

    def __init__(self, seed: int | None, keys: Sequence[RowKey], temperature: float = 1.0, top_p: float = 1.0):
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, ()))
        self.seed = seed
        self.row_seeds = [row_seed(seed, key) for key in keys]
        self.temperature, self.top_p = temperature, top_p
        self._generators: list[torch.Generator] | None = None

    def admit(self, slot: int, key: RowKey) -> None:
        """A new row, named ``key``, takes row ``slot`` (continuous batching): a fresh stream,
        seeded from (seed, key), so it draws what it would alone."""
        self.row_seeds[slot] = row_seed(self.seed, key)
        if self._generators is not None:
            device = self._generators[slot].device
            self._generators[slot] = torch.Generator(device=device).manual_seed(self.row_seeds[slot])

    def sample(self, logits: Tensor) -> Tensor:
        """The next token of every row, ``[batch]``, from ``logits`` ``[batch, vocab]``.

        Row ``i`` takes the next draw of its own stream on its own probabilities only.
        """
        if logits.shape[0] != len(self.row_seeds):
            raise ValueError(f"logits have {logits.shape[0]} rows, the sampler {len(self.row_seeds)}")
        if self._generators is None:
            self._generators = [torch.Generator(device=logits.device).manual_seed(s) for s in self.row_seeds]
        probs = sampling_probs(logits, self.temperature, self.top_p)
        draws = [torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(self._generators)]
        return torch.cat(draws).squeeze(1)
