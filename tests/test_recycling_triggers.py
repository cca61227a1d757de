"""Which tokens trigger RR: the released trigger ids (ChnQ/MI-Peaks RR_evaluate.py) and the word rule."""

import json

import pytest

from interventions.recycling_triggers import (
    RELEASED_LLAMA8B_TRIGGER_IDS,
    RELEASED_LLAMA8B_TRIGGERS,
    RR_TRIGGER_WORDS,
    released_trigger_ids,
    trigger_ids_for_words,
)


def test_released_trigger_ids():
    records = [{"word": w, "token_ids": list(i)} for w, i in RELEASED_LLAMA8B_TRIGGERS]
    # the released file interleaves non-words (" ", "\n\n", "\\"): skipped, not counted
    records[3:3] = [{"word": " ", "token_ids": []}, {"word": "\n\n", "token_ids": [271, 4815]}]
    records += [{"word": "\\", "token_ids": [59]}, {"word": "But", "token_ids": [2030, 4071]}]
    assert released_trigger_ids(records) == RELEASED_LLAMA8B_TRIGGER_IDS
    assert len(RELEASED_LLAMA8B_TRIGGER_IDS) == 23 and 2030 not in RELEASED_LLAMA8B_TRIGGER_IDS
    assert released_trigger_ids(records, n_words=11) == tuple(sorted({*RELEASED_LLAMA8B_TRIGGER_IDS, 2030, 4071}))
    with pytest.raises(ValueError, match="n_words"):
        released_trigger_ids(records, n_words=0)


def test_released_trigger_ids_from_a_word_file(tmp_path):
    path = tmp_path / "DeepSeek-R1-Distill-Llama-8B.jsonl"
    path.write_text("".join(json.dumps({"word": w, "freq": 1, "token_ids": list(i)}) + "\n"
                            for w, i in RELEASED_LLAMA8B_TRIGGERS))
    assert released_trigger_ids(path) == released_trigger_ids(str(path)) == RELEASED_LLAMA8B_TRIGGER_IDS


def test_trigger_ids_from_words_on_the_real_r1_tokenizer(tiny_r1_plain):
    model = tiny_r1_plain
    per_word = [trigger_ids_for_words(model, [w]) for w in RR_TRIGGER_WORDS]
    # as many ids per word as the released Llama-8B file lists (2-3: "So", " So", "\tSo")
    assert [len(ids) for ids in per_word] == [len(ids) for _, ids in RELEASED_LLAMA8B_TRIGGERS]
    assert per_word[0] == (2055, 4416, 76912) and per_word[-1] == (13824, 14190)
    assert trigger_ids_for_words(model, RR_TRIGGER_WORDS) == tuple(sorted(i for ids in per_word for i in ids))


def test_the_words_that_are_no_token_are_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="cannot encode the trigger words"):
        trigger_ids_for_words(tiny_llama, ["Supercalifragilistic"])
    assert trigger_ids_for_words(tiny_llama, "Wait") == trigger_ids_for_words(tiny_llama, [" Wait "])
