"""ThoughtClassifier, alone and with a linear probe, against hand-written references.

References here are written independently of surgery.thoughts: thought boundaries are found by
scanning the rebuilt text character by character, labels of hand-written traces are spelled
out literally, and states come from one uncached forward pass with ``output_hidden_states``.
"""

import json

import pytest
import torch
from conftest import PROMPTS, clusters, occurrences_ending_at_each_token
from tolerance import assert_close

import surgery
from probes.linear_probe import fit_linear_probe
from probes.thought_classifier import ClassifiedThoughts, ThoughtClassifier
from surgery.blocks import block_class
from surgery.examples import ARITHMETIC_PROBLEMS
from surgery.thoughts import classify_thought, split_thoughts

NL = "\n"


# ---- references --------------------------------------------------------------------------------


def reference_thoughts(texts, ids, inside_at_start, offset):
    """``[(position, text)]`` of the thoughts in the tokens ``ids``, by a character scan.

    The span starts at 0 when ``inside_at_start`` (the prompt ended inside ``<think>``), else
    after the first "<think>" (or at 0 without one), and ends at the first "</think>" after it.
    A thought opens after each run of 2+ newlines; its position is the token holding the run's
    second newline, plus ``offset``; blank thoughts are dropped.
    """
    text, owner = "", []
    for k, token in enumerate(ids):
        text += texts[token]
        owner += [k] * len(texts[token])
    begin = 0
    if not inside_at_start and "<think>" in text:
        begin = text.index("<think>") + len("<think>")
    end = text.find("</think>", begin)
    end = len(text) if end < 0 else end
    runs, i = [], begin
    while i < end:
        if text[i] != NL:
            i += 1
            continue
        j = i
        while j < end and text[j] == NL:
            j += 1
        if j - i >= 2:
            runs.append((i, j))
        i = j
    found = []
    for k, (start, stop) in enumerate(runs):
        body = text[stop : runs[k + 1][0] if k + 1 < len(runs) else end]
        if body.strip():
            found.append((owner[start + 1] + offset, body))
    return found


def prompt_ends_inside_think(model, prompt_ids):
    open_id, close_id = model.think_token_ids
    inside = False
    for token in prompt_ids:
        if token == open_id:
            inside = True
        elif token == close_id:
            inside = False
    return inside


def hidden_at(model, ids, layer):
    """resid_pre.layer of one unpadded row, no cache: ``[len(ids), d_model]``."""
    with torch.no_grad():
        return model.module(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False).hidden_states[layer][0]


def classify(model, prompts, site="resid_pre.-1", mode="generate", **options):
    probe = ThoughtClassifier(site, **{k: options.pop(k) for k in ["linear_probe"] if k in options})
    with surgery.trace(model, probe) as tr:
        out = tr.generate(prompts, **options) if mode == "generate" else tr.run(prompts)
    return probe.result(), out


def check_generation(model, prompts, found, out, chat, layer):
    """Positions, texts, labels and states of a generation against the references.

    States: the suite's tolerance policy (cached, padded decoding vs one uncached unpadded forward).
    """
    texts = model.vocabulary_texts
    total = 0
    for row, prompt in enumerate(prompts):
        ids, _ = surgery.encode_prompts(model, [prompt], chat=chat)
        prompt_ids = ids[0].tolist()
        completion = out.token_ids[row][:-1]  # the last generated token is never fed
        expected = reference_thoughts(texts, completion, prompt_ends_inside_think(model, prompt_ids), len(prompt_ids))
        got = found.thoughts[row]
        assert [(t.position, t.text) for t in got] == expected
        assert [t.label for t in got] == [classify_thought(text) for _, text in expected]
        assert [t.index for t in got] == list(range(len(got)))
        assert found.states[row].shape == (len(got), model.d_model)
        if got:
            hidden = hidden_at(model, prompt_ids + completion, layer)
            assert_close(found.states[row], hidden[[p for p, _ in expected]])
        total += len(got)
    return total


# ---- mode 1 on hand-written traces ----------------------------------------------------------------

# (trace, [(label, thought text)]), labels written by hand from SEAL's rules.
TRACES = [
    (
        "<think>Intro.\n\nWait, 3 + 5 = 8?\n\nWaiting is fine.\n\nI will verify it.\n\nMake sure.\n\nHold on.</think>\n\nWait after.",
        [("reflection", "Wait, 3 + 5 = 8?"), ("reflection", "Waiting is fine."), ("reflection", "I will verify it."),
         ("reflection", "Make sure."), ("reflection", "Hold on.")],
    ),
    (
        "<think>\n\nthink again.\n\nIt's correct.\n\nIt's incorrect.\n\nlet me check.\n\nseems right.",
        [("reflection", "think again."), ("reflection", "It's correct."), ("reflection", "It's incorrect."),
         ("reflection", "let me check."), ("reflection", "seems right.")],
    ),
    (
        "<think>A.\n\nAlternatively, 2.\n\nthink differently.\n\nanother way.\n\nanother approach.\n\nanother method.",
        [("transition", "Alternatively, 2."), ("transition", "think differently."), ("transition", "another way."),
         ("transition", "another approach."), ("transition", "another method.")],
    ),
    (
        "<think>B.\n\nanother solution.\n\nanother strategy.\n\nanother technique.\n\nanother way: let me check.\n\nSo 3 + 5 = 8.",
        [("transition", "another solution."), ("transition", "another strategy."), ("transition", "another technique."),
         ("reflection", "another way: let me check."), ("execution", "So 3 + 5 = 8.")],
    ),
    ("<think>Just one line.</think>", []),  # no separator
    ("Before any think\n\nSo.\n\n<think>Intro only.", []),  # separators before <think> are outside the span
    (  # a second <think> is plain text; </think> ends the span
        "<think>A.\n\n<think>Wait, B.\n\nC.</think>\n\nD.",
        [("execution", "<think>Wait, B."), ("execution", "C.")],
    ),
    (  # no <think>: the span is the whole text; a blank thought is skipped
        "Before.\n\nWait.\n\n  \n\nAlternatively.",
        [("reflection", "Wait."), ("transition", "Alternatively.")],
    ),
]


def hand_traces(model):
    """The TRACES as token ids, plus one built token by token: "\\n" tokens, ".\\n\\n", a trailing run."""
    tokenizer = model.tokenizer

    def enc(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rows = [(enc(text), expected) for text, expected in TRACES]
    nl, nlnl = tokenizer.convert_tokens_to_ids(["Ċ", "ĊĊ"])
    assert model.vocabulary_texts[nl] == "\n" and model.vocabulary_texts[nlnl] == "\n\n"
    open_id, close_id = model.think_token_ids
    built = (
        [open_id] + enc("Okay") + [nl, nl, nl] + enc("Wait, yes") + [nl] + enc(".\n\n") + enc("Alternatively, no")
        + [nl, nlnl] + enc("So 8.") + [nl, nl, close_id] + enc("\n\nDone.")
    )
    rows.append((built, [("reflection", "Wait, yes\n."), ("transition", "Alternatively, no"), ("execution", "So 8.")]))
    return rows


def test_hand_written_traces_labels_positions_and_states(tiny):
    rows = hand_traces(tiny)
    assert all(len(ids) <= 128 for ids, _ in rows)
    found, _ = classify(tiny, [ids for ids, _ in rows], site="resid_pre.1", mode="run")
    texts = tiny.vocabulary_texts
    hits = 0
    for row, (ids, expected) in enumerate(rows):
        got = found.thoughts[row]
        assert [(t.label, t.text) for t in got] == expected
        reference = reference_thoughts(texts, ids, inside_at_start=False, offset=0)
        assert [(t.position, t.text) for t in got] == reference
        assert all(t.predicted is None for t in got)
        assert found.states[row].shape == (len(expected), tiny.d_model)
        if expected:
            assert_close(found.states[row], hidden_at(tiny, ids, 1)[[p for p, _ in reference]])
        hits += sum(occurrences_ending_at_each_token(texts, ids, "\n\n"))
    # streaming: one vector per separator hit ("\n\n\n" as three tokens is two hits), not per token
    assert found.n_recorded == hits
    built = rows[-1][0]
    nl = tiny.tokenizer.convert_tokens_to_ids("Ċ")
    assert found.thoughts[-1][0].position == built.index(nl) + 1  # the second of the three "\n" tokens


def test_split_thoughts_labels_the_hand_written_traces():
    for text, expected in TRACES:
        assert [(t.label, t.text) for t in split_thoughts(text)] == expected


# ---- mode 1 during generation ------------------------------------------------------------------


@pytest.mark.parametrize("chat", [True, False])
def test_generation_states_equal_an_uncached_forward(tiny, chat):
    found, out = classify(tiny, PROMPTS, max_new_tokens=24, chat=chat)
    assert isinstance(found, ClassifiedThoughts) and found.site == f"resid_pre.{tiny.n_layers - 1}"
    assert check_generation(tiny, PROMPTS, found, out, chat, tiny.n_layers - 1) > 0
    assert out.token_ids == surgery.generate(tiny, PROMPTS, 24, chat=chat).token_ids  # the probe changes nothing


def test_rows_alone_equal_rows_batched(tiny):
    batched, out = classify(tiny, PROMPTS, site="resid_pre.0", max_new_tokens=24, chat=True)
    for row, prompt in enumerate(PROMPTS):
        alone, alone_out = classify(tiny, [prompt], site="resid_pre.0", max_new_tokens=24, chat=True)
        assert alone_out.token_ids[0] == out.token_ids[row]
        assert alone.thoughts[0] == batched.thoughts[row]
        assert_close(alone.states[0], batched.states[row])


def test_result_helpers(tiny_llama):
    found, _ = classify(tiny_llama, [ids for ids, _ in hand_traces(tiny_llama)], mode="run")
    counts = found.counts()
    assert list(counts) == ["execution", "reflection", "transition"]
    assert counts == {label: found.labels().count(label) for label in counts}
    by_label = found.states_by_label()
    all_states = found.all_states()
    assert all_states.shape == (sum(counts.values()), tiny_llama.d_model)
    for label, states in by_label.items():
        assert states.shape == (counts[label], tiny_llama.d_model)
        keep = [i for i, got in enumerate(found.labels()) if got == label]
        assert_close(states, all_states[keep])


def test_config_registry_and_errors(tiny_llama):
    assert block_class("thought_classifier") is ThoughtClassifier
    block = ThoughtClassifier()
    data = json.loads(json.dumps(block.to_dict()))
    assert data["block"] == "thought_classifier" and data["config"]["when"] == {"kind": "text", "text": "\n\n", "case_sensitive": True}
    assert block.text_patterns() == (("\n\n", True),)
    with pytest.raises(ValueError, match="only separator"):
        ThoughtClassifier(separator="\n")
    with pytest.raises(ValueError, match="logits"):
        with surgery.trace(tiny_llama, ThoughtClassifier("logits")):
            pass
    with pytest.raises(RuntimeError, match="no result yet"):
        ThoughtClassifier().result()
    probe = fit_linear_probe(torch.randn(40, 7), ["a", "b"] * 20)
    with pytest.raises(ValueError, match="7-wide"):
        with surgery.trace(tiny_llama, ThoughtClassifier(linear_probe=probe)):
            pass


# ---- with a linear probe ------------------------------------------------------------------------


def test_online_predictions_equal_predict_on_recorded_states(tiny):
    states, labels = clusters(40, tiny.d_model, spread=0.3)
    probe = fit_linear_probe(states, labels)
    found, out = classify(tiny, PROMPTS, max_new_tokens=24, chat=True, linear_probe=probe)
    assert found.labels() and found.predicted() == probe.predict(found.all_states())
    assert out.token_ids == surgery.generate(tiny, PROMPTS, 24, chat=True).token_ids


# ---- continuous batching -------------------------------------------------------------------------

SLOT_PROMPTS, BUDGETS = [*PROMPTS, PROMPTS[1]], [6, 24, 9, 14, 11]  # a repeated prompt, budgets that free slots


@pytest.mark.parametrize("with_probe", [False, True])
def test_result_in_slots_equals_each_prompt_alone(tiny, with_probe):
    options = {"linear_probe": fit_linear_probe(*clusters(40, tiny.d_model, spread=0.3))} if with_probe else {}
    found, out = classify(tiny, SLOT_PROMPTS, site="resid_pre.0", max_new_tokens=BUDGETS, chat=True, batch_size=2,
                          **options)
    assert out.timings["steps"] < sum(BUDGETS)  # slots were shared
    assert len(found.thoughts) == len(found.states) == len(SLOT_PROMPTS)
    recorded = 0
    for row, (prompt, budget) in enumerate(zip(SLOT_PROMPTS, BUDGETS)):
        alone, alone_out = classify(tiny, [prompt], site="resid_pre.0", max_new_tokens=budget, chat=True, **options)
        assert alone_out.token_ids[0] == out.token_ids[row]
        assert found.thoughts[row] == alone.thoughts[0], f"row {row}"
        assert_close(found.states[row], alone.states[0], path=f"states[{row}]")
        recorded += alone.n_recorded
    assert found.n_recorded == recorded and sum(map(len, found.thoughts)) > 0  # real thoughts were compared
    if with_probe:
        assert found.predicted() == options["linear_probe"].predict(found.all_states())


def test_a_fixed_batch_after_a_run_in_slots_is_as_before(tiny_llama):
    probe = ThoughtClassifier("resid_pre.1")
    with surgery.trace(tiny_llama, probe) as tr:
        tr.generate(SLOT_PROMPTS, BUDGETS, chat=True, batch_size=2)
        tr.generate(PROMPTS, 24, chat=True)
    fresh, _ = classify(tiny_llama, PROMPTS, site="resid_pre.1", max_new_tokens=24, chat=True)
    assert_close(probe.result(), fresh)


# ---- SmolLM2 (slow) ----------------------------------------------------------------------------

# GSM8K-style problems on which greedy SmolLM2 writes blank lines within 64 tokens
GSM8K_LIKE = [
    *ARITHMETIC_PROBLEMS[:3],
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year? "
    "Think step by step.",
]


@pytest.mark.slow
def test_smollm2_thoughts_and_states(smollm2):
    assert smollm2.think_token_ids == (None, None)
    layer = 20
    found, out = classify(smollm2, GSM8K_LIKE, site=f"resid_pre.{layer}", max_new_tokens=64, chat=True)
    # layer-20 residual states reach |x| ~ 100 (norm ~ 200): float32 round-off of a padded, cached batch is ~1e-5
    assert check_generation(smollm2, GSM8K_LIKE, found, out, True, layer) >= 3
    assert out.token_ids == surgery.generate(smollm2, GSM8K_LIKE, 64, chat=True).token_ids
