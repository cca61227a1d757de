"""summarise_rows: one JSON record and one set of sidecar tensors per row, for any probe."""

import json

import pytest
import torch
from conftest import ANSWERS, PROMPTS

import surgery
from experiments.row_summaries import summarise_rows
from interventions import TokenMask
from probes import MIEstimator, RecordSite
from surgery.triggers import OnTokens


def test_rows_hold_the_generation_firing_and_probe_summaries_as_json(tiny_llama):
    mask = TokenMask(["e", "."], penalty=-5.0)
    mi, record = MIEstimator(answers=ANSWERS), RecordSite("resid_post.1", when=OnTokens("."))
    with surgery.trace(tiny_llama, mask, mi, record) as tr:
        out = tr.generate(PROMPTS, 10)
    rows = summarise_rows(out, {"mask": mask}, {"mi": mi, "states": record}, tiny_llama.tokenizer,
                          prompts=PROMPTS, seconds=2.0)
    assert len(rows) == len(PROMPTS)
    found = mi.result(out)
    for i, row in enumerate(rows):
        json.dumps(row.record, allow_nan=False)  # JSON as it is
        assert row.record["token_ids"] == out.token_ids[i] and row.record["text"] == out.texts[i]
        assert row.record["prompt_tokens"] == out.prompt_lengths[i] > 0
        assert row.record["prompt"] == PROMPTS[i] and row.record["seconds"] == pytest.approx(2.0 / len(PROMPTS))
        assert row.record["fired"]["mask"] == mask.by_row()[i]
        assert row.record["probes"]["mi"]["values"] == pytest.approx(found.values[i].tolist(), rel=1e-12)
        assert row.record["probes"]["mi"]["peaks"] == found.peaks[i].tolist()
        # a probe without a summary of its own: its by_row() entry, tensors to the sidecar
        positions, values = record.by_row()[i]
        assert torch.equal(row.tensors["states.0"], positions) and torch.equal(row.tensors["states.1"], values)
    assert any(row.record["fired"]["mask"] for row in rows)  # not vacuous
