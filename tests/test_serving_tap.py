"""RowText streams exactly the final text, stops where the engine's stop strings stop; ServerTap
stops rows in the pool as the engine would."""

import pytest

import surgery
from experiments.serving.tap import RowText, ServerTap, cut_at_stop


def _stream(tokenizer, text, stops=()):
    pieces = []
    row = RowText(tokenizer, stops, stream=True, on_text=pieces.append)
    for i, token in enumerate(tokenizer(text, add_special_tokens=False)["input_ids"]):
        if row.add(token):
            return pieces, row, i
    return pieces, row, None


def test_streamed_pieces_add_up_to_the_text_and_never_split_a_character(r1_tokenizer):
    text = "Wait, 3 × 4 = 12 — so the answer is 12 🎉 done"
    pieces, row, stopped = _stream(r1_tokenizer, text)
    assert stopped is None and "".join(pieces) == row.text == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_a_stop_string_stops_on_the_token_that_completes_it_and_is_never_streamed(r1_tokenizer):
    text = "12\n\nQ: what next?"
    pieces, row, stopped = _stream(r1_tokenizer, text, stops=("Q:",))
    ids = r1_tokenizer(text, add_special_tokens=False)["input_ids"]
    first_with_stop = next(i for i in range(len(ids)) if "Q:" in r1_tokenizer.decode(ids[: i + 1]))
    assert stopped == first_with_stop
    assert row.text == "12\n\n" and "".join(pieces) == "12\n\n"


def test_cut_at_the_earliest_stop():
    assert cut_at_stop("a;b.c", [".", ";"]) == "a" and cut_at_stop("abc", []) == "abc"


def test_the_tap_stops_stop_strings_and_gone_clients_in_a_pool(tiny_r1):
    prompts = ["So the answer is", "Wait, let me check", "So", "Alternatively"]
    stop = " is"  # a word the tiny model writes in most rows
    gone = [False, True, False, False]
    rows = [RowText(tiny_r1.tokenizer, (stop,), cancelled=lambda i=i: gone[i]) for i in range(4)]
    tap = ServerTap(rows)
    with surgery.trace(tiny_r1, tap) as tr:
        out = tr.generate(prompts, [24] * 4, batch_size=2, chat=True)
    expected = surgery.generate(tiny_r1, prompts, 24, chat=True, stop_strings=[stop])
    assert [expected.stop_reasons[i] for i in (0, 2, 3)].count("stop_string") >= 2
    for i in (0, 2, 3):
        assert out.token_ids[i] == expected.token_ids[i]
        assert rows[i].text == cut_at_stop(expected.texts[i], [stop])
    assert out.lengths[1] == 1 and out.stop_reasons[1] in ("block", "eos")  # stopped at its first token
    assert tap.slot_rows == [None, None]


@pytest.mark.parametrize("stream", [False, True])
def test_rows_without_stops_or_streams_are_not_read(stream):
    row = RowText(tokenizer=None, stops=(), stream=stream)
    assert row.watched is stream
