"""Which tokens trigger representation recycling: the paper's words and the released token ids.

:class:`~interventions.recycling.RepresentationRecycling` fires where the next token is a
thinking token. By default it reads words (:data:`RR_TRIGGER_WORDS`, arXiv 2506.02867 §5): a
token triggers when its text, stripped, is one of them (:func:`trigger_ids_for_words`). The
released code (ChnQ/MI-Peaks bcee82c, ``src/applications/RR_evaluate.py`` L465-493) triggers
on token ids instead: the union of the ids listed for the first 10 letters-only words of
``data/<model>.jsonl`` (:func:`released_trigger_ids`); for R1-Distill-Llama-8B those are
:data:`RELEASED_LLAMA8B_TRIGGER_IDS` (2-3 ids per word), what ``trigger_ids`` takes.

Example:
    >>> RR_TRIGGER_WORDS[:3]
    ('So', 'Let', 'Hmm')
    >>> len(RELEASED_LLAMA8B_TRIGGER_IDS), RELEASED_LLAMA8B_TRIGGER_IDS[:3]
    (23, (40, 358, 578))
    >>> released_trigger_ids([("So", [5, 3]), ("\\n", [9]), ("Let", [7])], n_words=1)
    (3, 5)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "RELEASED_LLAMA8B_TRIGGERS",
    "RELEASED_LLAMA8B_TRIGGER_IDS",
    "RR_TRIGGER_WORDS",
    "released_trigger_ids",
    "trigger_ids_for_words",
]

RR_TRIGGER_WORDS = ("So", "Let", "Hmm", "I", "The", "Okay", "That", "First", "Now", "Wait")
"""The thinking words of the paper (arXiv 2506.02867 §5): RR's default triggers."""

RELEASED_LLAMA8B_TRIGGERS = (
    ("So", (2100, 4516, 78012)), ("Let", (6914, 10267)), ("Hmm", (81122, 89290)), ("I", (40, 358, 25494)),
    ("The", (578, 791, 33026)), ("Okay", (33413, 36539)), ("That", (3011, 4897)), ("First", (5451, 5629)),
    ("Now", (4800, 7184)), ("Wait", (14144, 14524)),
)
"""The released word records RR reads for R1-Distill-Llama-8B: the first 10 letters-only entries
of ``src/applications/data/DeepSeek-R1-Distill-Llama-8B.jsonl`` (Llama-3 token ids)."""


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
