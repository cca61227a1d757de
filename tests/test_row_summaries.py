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


def test_a_pooled_row_summarised_as_it_finishes_equals_its_summary_after_the_run(tiny_llama):
    from experiments.row_summaries import summarise_row

    mask = TokenMask(["e", "."], penalty=-5.0)
    mi = MIEstimator(answers=[*ANSWERS, ANSWERS[0]])
    prompts, early = [*PROMPTS, PROMPTS[0]], {}
    with surgery.trace(tiny_llama, mask, mi) as tr:
        out = tr.generate(prompts, [4, 12, 6, 9, 3], batch_size=2, on_row=lambda row: early.__setitem__(
            row.row, summarise_row(row, {"mask": mask}, {"mi": mi}, tiny_llama.tokenizer).record))
    after = summarise_rows(out, {"mask": mask}, {"mi": mi}, tiny_llama.tokenizer)
    assert [early[i] for i in range(len(prompts))] == [row.record for row in after]


def test_a_block_whose_by_row_takes_no_rows_is_named(tiny_llama):
    from experiments.row_summaries import fired_entry

    class Old(TokenMask):
        def by_row(self):
            return self.fired()

    with pytest.raises(TypeError, match=r"Old.by_row\(\) takes no rows argument"):
        fired_entry(Old(["e"]), 0)
