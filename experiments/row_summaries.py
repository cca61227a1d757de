"""What a study keeps of one row of a run: JSON for the record, tensors for a sidecar file.

After a batch of one condition has generated, :func:`summarise_rows` turns the
:class:`~surgery.decode.engine.GenerationOutput` and the blocks of the trace into one entry per row;
under continuous batching :func:`summarise_row` makes one row's entry the moment it finishes:

* the generation: prompt, its length in tokens (``prompt_tokens``, padding not counted), text,
  token ids, number of tokens, stop reason, seconds (the batch's wall time shared equally
  between its rows; in a pool, the row's time in its slot divided by the number of slots);
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
import inspect
import json
import math
from collections import Counter
from collections.abc import Mapping

from torch import Tensor

from probes import MIEstimator, ReasoningGraph, ThoughtClassifier
from surgery.blocks import Block
from surgery.decode.generation_output import FinishedRow, GenerationOutput

__all__ = ["RowSummary", "fired_entry", "summarise_row", "summarise_rows"]


@dataclasses.dataclass
class RowSummary:
    """One row of a run: ``record`` (JSON values) and ``tensors`` (name -> CPU tensor) for the sidecar."""

    record: dict
    tensors: dict[str, Tensor]


def summarise_rows(out, interventions: Mapping[str, Block], probes: Mapping[str, Block], tokenizer,
                   prompts=None, seconds: float | None = None) -> list[RowSummary]:
    """One :class:`RowSummary` per row of ``out`` (:func:`summarise_row` for each).

    Args:
        out: the run's :class:`~surgery.decode.engine.GenerationOutput`.
        interventions: name -> intervention of the trace (named as the study names them).
        probes: name -> probe of the trace.
        tokenizer: the model's tokenizer (peak token texts).
        prompts: the prompt texts, kept in the records when given.
        seconds: the batch's wall time, shared equally between its rows.
    """
    batch = len(out.token_ids)
    share = None if seconds is None else seconds / batch
    return [summarise_row(out.row(i), interventions, probes, tokenizer, prompt=None if prompts is None else prompts[i],
                          seconds=share)
            for i in range(batch)]


def summarise_row(row: FinishedRow, interventions: Mapping[str, Block], probes: Mapping[str, Block], tokenizer,
                  prompt: str | None = None, seconds: float | None = None) -> RowSummary:
    """The :class:`RowSummary` of one finished row, read from its blocks with ``rows=[row.row]``:
    under continuous batching this works the moment the row leaves its slot
    (``tr.generate(..., on_row=...)``), so a study appends each record as its row finishes.

    Args:
        row: the row's :class:`~surgery.decode.generation_output.FinishedRow`.
        interventions, probes, tokenizer: as :func:`summarise_rows`.
        prompt: the prompt text, kept in the record when given.
        seconds: the wall time charged to this row.
    """
    summary = RowSummary(
        record={
            **({"prompt": prompt} if prompt is not None else {}),
            "prompt_tokens": row.prompt_length,
            "text": row.text,
            "token_ids": list(row.token_ids),
            "n_tokens": len(row.token_ids),
            "stop_reason": row.stop_reason,
            **({"seconds": seconds} if seconds is not None else {}),
            "fired": {},
            "probes": {},
        },
        tensors={},
    )
    for name, block in interventions.items():
        summary.record["fired"][name] = fired_entry(block, row.row)
    for name, probe in probes.items():
        record, tensors = _probe_row(probe, row, tokenizer)
        summary.record["probes"][name] = record
        summary.tensors.update({f"{name}.{key}": value.detach().cpu().contiguous() for key, value in tensors.items()})
    return summary


def fired_entry(block: Block, row: int):
    """Where intervention ``block`` acted in prompt ``row`` (its ``by_row`` entry, as JSON), or
    None when it keeps nothing per row."""
    by_row = _by_row(block, row)
    return None if by_row is None else _json_ready(by_row[0])


def _by_row(block: Block, row: int):
    """``block.by_row(rows=[row])``, or a TypeError saying what a block written before
    ``rows`` existed lacks."""
    if "rows" not in inspect.signature(block.by_row).parameters:
        raise TypeError(f"{type(block).__name__}.by_row() takes no rows argument: a study reads each row as it "
                        "finishes, so give it by_row(self, rows=None) (see surgery.blocks.Block.by_row)")
    return block.by_row(rows=[row])


def _probe_row(probe: Block, row: FinishedRow, tokenizer) -> tuple[dict, dict[str, Tensor]]:
    rows = [row.row]
    if isinstance(probe, MIEstimator):
        found = probe.result(rows=rows)
        alone = GenerationOutput([row.text], [list(row.token_ids)], [len(row.token_ids)], [row.prompt_length],
                                 [row.stop_reason])
        values, peaks, stats = found.values[0], found.peaks[0], found.stats[0]
        return ({"values": [_finite(v) for v in values.tolist()], "peaks": peaks.tolist(),
                 "peak_tokens": found.peak_token_texts(alone, tokenizer)[0],
                 "stats": {key: _finite(value) for key, value in dataclasses.asdict(stats).items()}}, {})
    if isinstance(probe, ThoughtClassifier):
        found = probe.result(rows=rows)
        thoughts, states = found.thoughts[0], found.states[0]
        return ({"labels": [t.label for t in thoughts], "positions": [t.position for t in thoughts],
                 "counts": dict(Counter(t.label for t in thoughts))}, {"states": states})
    if isinstance(probe, ReasoningGraph):
        steps = probe.result(rows=rows)[0]
        return {"n_steps": int(steps.shape[0])}, {"steps": steps}
    by_row = _by_row(probe, row.row)
    if by_row is None:
        raise TypeError(f"{type(probe).__name__} has no per-row results (by_row() is None): a study cannot keep it")
    return _generic_row(by_row[0])


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
