"""The four interventions on the embedded SmolLM2-135M-Instruct (slow: real model; run in CI)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import occurrences_ending_at_each_token
from tolerance import assert_close
from test_recycling import reference_logits
from test_steering import naive_vector

import surgery
from interventions import (RepresentationRecycling, SteeringVector, ThinkingTokenInsertion, TokenMask, seal_trigger,
                           seal_trigger_for)
from surgery.examples import ARITHMETIC_PROBLEMS
from surgery.thoughts import thought_positions
from surgery.triggers import OnText

pytestmark = pytest.mark.slow
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def gsm8k_traces(n: int) -> list[tuple[str, str]]:
    """GSM8K-style traces: the reference solution's lines as blank-line separated steps, then a
    reflection and a transition thought built from the final answer."""
    if GSM8K.exists():
        with GSM8K.open() as lines:
            rows = [json.loads(line) for _, line in zip(range(n), lines)]
    else:  # the data set sits beside the checkout in CI; keep the test meaningful without it
        rows = [{"question": p, "answer": "Step one.\nStep two.\n#### 7"} for p in ARITHMETIC_PROBLEMS[:n]]
    traces = []
    for row in rows:
        *steps, final = row["answer"].split("\n")
        answer = final.replace("####", "").strip()
        body = "\n\n".join(steps)
        traces.append((row["question"], f"Let me solve it.\n\n{body}\n\nWait, let me check the arithmetic again.\n\n"
                                        f"Alternatively, I can count another way.\n\nSo the answer is {answer}."))
    return traces


def test_extraction_on_gsm8k_traces_equals_the_naive_reference(smollm2):
    traces = gsm8k_traces(6)
    steer = SteeringVector.from_thoughts(smollm2, traces, layer=15, chat=True, batch_size=3)
    reference, counts = naive_vector(smollm2, traces, 15)
    print("class counts:", steer.metadata["class_counts"])
    assert steer.metadata["class_counts"] == counts
    assert counts["execution"] >= 6 and counts["reflection"] >= 6 and counts["transition"] >= 6
    assert_close(steer.vector, reference)


def test_an_extracted_vector_fires_at_the_separators_its_states_were_read_at(smollm2):
    # SmolLM2 has no think tags and writes a blank line as two "\n" tokens: SEAL's own trigger
    # (a "\n\n" token inside <think>) cannot fire on it, so the vector gets seal_trigger_for's
    steer = SteeringVector.from_thoughts(smollm2, gsm8k_traces(3), layer=15, chat=True, alpha=0.0)
    assert steer.config.when == seal_trigger_for(smollm2) != seal_trigger()
    with surgery.trace(smollm2, steer) as tr:
        out = tr.generate(ARITHMETIC_PROBLEMS[:3], 96, chat=True)
    texts, read = smollm2.vocabulary_texts, 0
    for row, prompt in enumerate(ARITHMETIC_PROBLEMS[:3]):
        prompt_ids = surgery.encode_prompts(smollm2, [prompt], chat=True)[0][0].tolist()
        fed = prompt_ids + out.token_ids[row][:-1]
        states_read = [p for p, _ in thought_positions(smollm2, prompt_ids, out.token_ids[row][:-1])]
        fired = steer.fired()[row]
        assert set(states_read) <= set(fired)  # it acts wherever extraction reads a thought's state
        assert all(p >= len(prompt_ids) and "".join(texts[t] for t in fed[: p + 1]).endswith("\n\n") for p in fired)
        read += len(states_read)
    assert read >= 2


def test_steering_fires_where_the_text_reaches_blank_lines(smollm2):
    steer = SteeringVector(torch.randn(576, generator=torch.Generator().manual_seed(0)) * 20, layer=15,
                           when=OnText("\n\n"))
    with surgery.trace(smollm2, steer) as tr:
        out = tr.generate(ARITHMETIC_PROBLEMS[:2], 64, chat=True)
    texts = smollm2.vocabulary_texts
    for row, prompt in enumerate(ARITHMETIC_PROBLEMS[:2]):
        ids, _ = surgery.encode_prompts(smollm2, [prompt], chat=True)
        fed = ids[0].tolist() + out.token_ids[row][:-1]
        hits = occurrences_ending_at_each_token(texts, fed, "\n\n")
        assert steer.fired()[row] == [p for p, hit in enumerate(hits) if hit]
    assert sum(map(len, steer.fired())) >= 2


def test_hard_mask_words_never_appear(smollm2):
    words = ["need", "total", "apples"]
    plain = surgery.generate(smollm2, ARITHMETIC_PROBLEMS, 64, chat=True)
    assert any(w in text.lower() for w in words for text in plain.texts)
    with surgery.trace(smollm2, TokenMask(words, penalty=None)) as tr:
        out = tr.generate(ARITHMETIC_PROBLEMS, 64, chat=True)
    assert not any(w in text.lower() for w in words for text in out.texts)


def test_tts_inserts_where_a_row_stops(smollm2):
    prompts = ["What is 7 * 8?", "Name three colours."]
    plain = surgery.generate(smollm2, prompts, 48, chat=True)
    assert "eos" in plain.stop_reasons
    tts = ThinkingTokenInsertion(words=(" Wait",), budget=12)
    with surgery.trace(smollm2, tts) as tr:
        out = tr.generate(prompts, 48, chat=True)
    word = smollm2.tokenizer(" Wait", add_special_tokens=False)["input_ids"]
    for row, reason in enumerate(plain.stop_reasons):
        if reason == "eos":
            k = plain.lengths[row] - 1
            assert tts.insertions()[row] == [k]
            assert out.token_ids[row][:k] == plain.token_ids[row][:k]
            assert out.token_ids[row][k : k + len(word)] == word and out.lengths[row] > k + len(word)


def test_recycling_matches_the_full_sequence_reference(smollm2):
    prompt = ARITHMETIC_PROBLEMS[1]
    plain = surgery.generate(smollm2, [prompt], 24, chat=True)
    texts = smollm2.vocabulary_texts
    words = tuple(dict.fromkeys(texts[t].strip() for t in plain.token_ids[0] if texts[t].strip().isalpha()))[:4]
    rr = RepresentationRecycling(layer=20, trigger_words=words)
    with surgery.trace(smollm2, rr) as tr:
        out = tr.generate([prompt], 24, chat=True)
    assert rr.fired()[0] and rr.fired()[0][0] == out.prompt_lengths[0] - 1  # the first token recycled too
    logits = reference_logits(smollm2, prompt, out.token_ids[0], 20, rr.fired()[0])
    top = logits.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) > 0.05  # float32 noise can flip a near-tie between cached and full runs
    assert int(clear.sum()) >= len(clear) - 2
    assert [t for t, keep in zip(out.token_ids[0], clear) if keep] == [t for t, keep in zip(logits.argmax(-1).tolist(), clear) if keep]
