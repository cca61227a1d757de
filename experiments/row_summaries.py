"""What a study keeps of one row of a run: JSON for the record, tensors for a sidecar file.

After a batch of one condition has generated, :func:`summarise_rows` turns the
:class:`~surgery.decode.engine.GenerationOutput` and the blocks of the trace into one entry per row:

* the generation: prompt, its length in tokens (``prompt_tokens``, padding not counted), text,
  token ids, number of tokens, stop reason, seconds (the batch's wall time shared equally
  between its rows);
* ``fired``: per intervention, where it acted in this row (its ``by_row()``: position ids, 0 at
  the row's first prompt token, so ``position - prompt_tokens`` is a generated-token offset;
  thinking-token insertion gives generated-token indices);
* ``probes``: per probe, a JSON summary of this row:

  - :class:`~probes.MIEstimator`: the per-token values, the Tukey peaks, their token texts and
    the peak statistics (``count``, ``ratio``, gaps, ``mean``, ``std``, ``aom``);
  - :class:`~probes.ThoughtClassifier`: each thought's label and position, and counts per label
    (its states go to the sidecar: a SEAL vector can be extracted from a finished run);
  - :class:`~probes.ReasoningGraph`: the number of steps (the step vectors go to the sidecar: the
    graph is clustered over every row of a condition, when the report is made);
  - any other probe: its ``by_row()`` entry when that is JSON, else tensors to the sidecar.

Tensors are named ``"<probe name>.<field>"``; an entry without tensors has an empty dict.

Example::

    with surgery.trace(model, *interventions.values(), *probes.values()) as tr:
        out = tr.generate(prompts, 64)
    rows = summarise_rows(out, interventions, probes, model.tokenizer)
    rows[0].record["probes"]["mi"]["peak_tokens"], rows[0].tensors.keys()
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Mapping

from torch import Tensor

from probes import MIEstimator, ReasoningGraph, ThoughtClassifier
from surgery.blocks import Block

__all__ = ["RowSummary", "fired_entries", "summarise_rows"]


@dataclasses.dataclass
class RowSummary:
    """One row of a run: ``record`` (JSON values) and ``tensors`` (name -> CPU tensor) for the sidecar."""

    record: dict
    tensors: dict[str, Tensor]


def summarise_rows(out, interventions: Mapping[str, Block], probes: Mapping[str, Block], tokenizer,
                   prompts=None, seconds: float | None = None) -> list[RowSummary]:
    """One :class:`RowSummary` per row of ``out``.

    Args:
        out: the run's :class:`~surgery.decode.engine.GenerationOutput`.
        interventions: name -> intervention of the trace (named as the study names them).
        probes: name -> probe of the trace.
        tokenizer: the model's tokenizer (peak token texts).
        prompts: the prompt texts, kept in the records when given.
        seconds: the batch's wall time.
    """
    batch = len(out.token_ids)
    rows = [
        RowSummary(
            record={
                **({"prompt": prompts[row]} if prompts is not None else {}),
                "prompt_tokens": out.prompt_lengths[row],
                "text": out.texts[row],
                "token_ids": list(out.token_ids[row]),
                "n_tokens": len(out.token_ids[row]),
                "stop_reason": out.stop_reasons[row],
                **({"seconds": seconds / batch} if seconds is not None else {}),
                "fired": {},
                "probes": {},
            },
            tensors={},
        )
        for row in range(batch)
    ]
    for name, block in interventions.items():
        for summary, entry in zip(rows, fired_entries(block, batch), strict=True):
            summary.record["fired"][name] = entry
    for name, probe in probes.items():
        for summary, (record, tensors) in zip(rows, _probe_rows(probe, out, tokenizer), strict=True):
            summary.record["probes"][name] = record
            summary.tensors.update({f"{name}.{key}": value.detach().cpu().contiguous() for key, value in tensors.items()})
    return rows


def fired_entries(block: Block, rows: int) -> list:
    """Where intervention ``block`` acted in each of the run's ``rows`` rows (its ``by_row()``
    entries, as JSON), or None per row when it keeps nothing per row."""
    by_row = block.by_row()
    return [None] * rows if by_row is None else [_json_ready(entry) for entry in by_row[:rows]]


def _probe_rows(probe: Block, out, tokenizer) -> list[tuple[dict, dict[str, Tensor]]]:
    if isinstance(probe, MIEstimator):
        found = probe.result(out)
        texts = found.peak_token_texts(out, tokenizer)
        return [
            ({"values": [_finite(v) for v in values.tolist()], "peaks": peaks.tolist(), "peak_tokens": words,
              "stats": {key: _finite(value) for key, value in dataclasses.asdict(stats).items()}}, {})
            for values, peaks, words, stats in zip(found.values, found.peaks, texts, found.stats, strict=True)
        ]
    if isinstance(probe, ThoughtClassifier):
        found = probe.result()
        return [
            ({"labels": [t.label for t in thoughts], "positions": [t.position for t in thoughts],
              "counts": dict(Counter(t.label for t in thoughts))}, {"states": states})
            for thoughts, states in zip(found.thoughts, found.states, strict=True)
        ]
    if isinstance(probe, ReasoningGraph):
        return [({"n_steps": int(steps.shape[0])}, {"steps": steps}) for steps in probe.result()]
    by_row = probe.by_row()
    if by_row is None:
        raise TypeError(f"{type(probe).__name__} has no per-row results (by_row() is None): a study cannot keep it")
    return [_generic_row(entry) for entry in by_row]


def _generic_row(entry) -> tuple[dict, dict[str, Tensor]]:
    if isinstance(entry, Tensor):
        return {}, {"value": entry}
    if isinstance(entry, (tuple, list)) and entry and all(isinstance(e, Tensor) for e in entry):
        return {}, {str(i): e for i, e in enumerate(entry)}
    return {"value": _json_ready(entry)}, {}


def _json_ready(value):
    """``value`` as JSON values (tensors become lists); a TypeError names what cannot be."""
    if isinstance(value, Tensor):
        value = value.tolist()
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"a study keeps per-row results as JSON, and {value!r} is not ({error})") from None
    return value


def _finite(value):
    """A float that JSON can hold (NaN and infinity become None); other values unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
