"""released_steps: the released segmentation equals a transcription of the released rule, on tiny
random models and on the real R1-Distill-Qwen tokenizer; the pieces; questions from prompts."""

import pytest
import torch
from conftest import PROMPTS
from tolerance import assert_close

import surgery
from probes.released_steps import (
    RELEASED_TEMPLATE,
    TextRecorder,
    prompt_question,
    released_lines,
    released_segments,
    released_step_vectors,
    released_text,
)

# ---- the released rule, transcribed ------------------------------------------------------------------
# Written in our own words from reading gouki510/Topology_of_Reasoning at 5bd287d
# (src/cluster_steps_generated.py, the loop that embeds each sample), so that
# released_step_vectors and ReasoningGraph(steps="released") are checked against it on identical
# inputs (tests/test_reasoning_graph.py imports these helpers). Its GSM8K
# template: two instruction lines, then the question, then the reasoning lines right after it.
RELEASED_HEADER = (
    "Solve the following math problem efficiently and clearly.\n"
    "The last line of your response should be of the following format: 'The answer is: ANSWER.' (without quotes) "
    "where ANSWER is just the final number or expression that solves the problem.\n"
)


def newline_token_ids(tokenizer) -> torch.Tensor:
    """Every vocabulary id whose text, decoded alone without clean-up, ends with a newline."""
    return torch.tensor(sorted(i for i in tokenizer.get_vocab().values()
                               if tokenizer.decode([i], clean_up_tokenization_spaces=False).endswith("\n")))


def kept_lines(text, min_chars=5):
    """Strip the text, cut at each newline, strip each piece, keep those longer than min_chars."""
    pieces = [piece.strip() for piece in text.strip().split("\n")]
    return [piece for piece in pieces if len(piece) > min_chars]


def released_rule(model, question, text, layer, newlines, min_chars=5, max_length=8192):
    """The released script's step vectors for one sample; None when it skips the sample.

    Lines as kept_lines; fewer than two lines: skipped. The input is the header, the question as
    given, then every line but the last joined by newlines, tokenized with the tokenizer's
    defaults (no chat template), truncated to max_length; one forward pass; the states of
    hidden_states[layer]. Each position gets the number of newline tokens up to and including
    it; the first number used is min(lines of the stripped question, the highest number), and
    each number from there to the highest gives one vector: the mean of its positions.
    """
    lines = kept_lines(text, min_chars)
    if len(lines) < 2:
        return None
    encoded = model.tokenizer([RELEASED_HEADER + question + "\n".join(lines[:-1])], return_tensors="pt",
                              padding="longest", max_length=max_length, truncation=True)
    with torch.no_grad():
        states = model.module(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                              output_hidden_states=True).hidden_states[layer][0]
    numbers = torch.isin(encoded["input_ids"], newlines).long().cumsum(-1)[0] * encoded["attention_mask"][0]
    highest = int(numbers.max())
    first = min(len(question.strip().split("\n")), highest)
    return torch.stack([states[numbers == j].mean(0) for j in range(first, highest + 1)])


def variant_rule(model, question, text, layer, newlines, template, drop_last_step, min_chars=5):
    """prompt_line=False (and drop_last_step either way) with a template that ends with a newline:
    the reasoning then starts a token of its own, right after the header's tokens; the states of
    the header are not used, and the reasoning's positions are grouped by the released numbers."""
    assert template.endswith("\n")
    header = template.replace("{question}", question)
    lines = kept_lines(text, min_chars)
    body = lines[:-1] if drop_last_step else lines
    if not body:
        return None
    ids = model.tokenizer(header + "\n".join(body))["input_ids"]
    start = len(model.tokenizer(header)["input_ids"])
    assert ids[:start] == model.tokenizer(header)["input_ids"]  # the header's tokens are a prefix
    with torch.no_grad():
        states = model.module(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
    numbers = torch.isin(torch.tensor(ids), newlines).long().cumsum(0)
    groups = {}
    for position in range(start, len(ids)):
        groups.setdefault(int(numbers[position]), []).append(position)
    return torch.stack([states[positions].mean(0) for positions in groups.values()])


def assert_rows_equal_rule(got, expected_rows, width):
    assert len(got) == len(expected_rows)
    for row, expected in zip(got, expected_rows):
        if expected is None:  # skipped by the released code: no vectors
            assert tuple(row.shape) == (0, width)
        else:
            assert_close(row, expected)


# ---- the pieces ------------------------------------------------------------------------------------
def test_the_template_lines_and_text_are_the_released_ones():
    assert RELEASED_TEMPLATE == RELEASED_HEADER + "{question}"
    text = "  <think>\nFirst, 3 + 5 = 8.\r\nok\n\n   So it is 8.   \n\nThe answer is: 8.\n"
    assert released_lines(text) == kept_lines(text) == ["<think>", "First, 3 + 5 = 8.", "So it is 8.",
                                                        "The answer is: 8."]
    assert released_lines(text, min_chars=0) == kept_lines(text, 0)
    lines = kept_lines(text)
    assert released_text("Q?", lines) == RELEASED_HEADER + "Q?" + "\n".join(lines[:-1])
    assert released_text("Q?", lines, "{question}\n", drop_last_step=False) == "Q?\n" + "\n".join(lines)


def test_segments_follow_the_cumulative_rule():
    newlines = {0}
    ids = [5, 0, 6, 6, 0, 0, 7]  # numbers 0 1 1 1 2 3 3
    assert released_segments(ids, newlines, 1) == [[1, 2, 3], [4], [5, 6]]
    assert released_segments(ids, newlines, 9) == [[5, 6]]  # the start is at most the last segment
    assert released_segments([5, 6], newlines, 3) == [[0, 1]]  # no newline: one segment, all of it
    assert released_segments(ids, newlines, 1, first_token=3) == [[3], [4], [5, 6]]
    assert released_segments(ids, newlines, 1, first_token=7) == [] == released_segments([], newlines, 1)
    with pytest.raises(ValueError, match="question_lines must be an int >= 1"):
        released_segments(ids, newlines, 0)


def test_questions_come_from_the_prompts(tokenizer):
    def chat(question):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)

    for question in PROMPTS:
        assert prompt_question(tokenizer, chat(question)["input_ids"]) == question  # the user turn
        assert prompt_question(tokenizer, tokenizer(question)["input_ids"]) == question  # the text
    two_turns = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}, {"role": "user", "content": "Go"}],
        tokenize=False, add_generation_prompt=True)
    with pytest.raises(ValueError, match="not one user turn.*questions="):
        prompt_question(tokenizer, tokenizer(two_turns, add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="ReasoningGraph was given 2 questions for 3 rows at once"):
        TextRecorder(["a", "b"]).reset(3)


# ---- tiny random models ---------------------------------------------------------------------------
def test_released_step_vectors_take_any_text(tiny_llama):
    out = surgery.generate(tiny_llama, PROMPTS, 40)
    newlines = newline_token_ids(tiny_llama.tokenizer)
    got = released_step_vectors(tiny_llama, PROMPTS, out.texts, min_chars=1)
    expected = [released_rule(tiny_llama, q, t, 3, newlines, 1) for q, t in zip(PROMPTS, out.texts)]
    assert_rows_equal_rule(got, expected, 64)
    # another site, and truncation inside the template (the start falls back to the last segment)
    short = released_step_vectors(tiny_llama, PROMPTS, out.texts, min_chars=1, max_length=12, site="resid_pre.1")
    expected = [released_rule(tiny_llama, q, t, 1, newlines, 1, max_length=12) for q, t in zip(PROMPTS, out.texts)]
    assert_rows_equal_rule(short, expected, 64)
    assert all(len(v) <= 1 for v in short)


@pytest.mark.parametrize("drop_last_step", [True, False])
def test_released_options_equal_their_own_rule(tiny_llama, drop_last_step):
    out = surgery.generate(tiny_llama, PROMPTS, 40)
    newlines = newline_token_ids(tiny_llama.tokenizer)
    template = "Question: {question}\nAnswer:\n"
    got = released_step_vectors(tiny_llama, PROMPTS, out.texts, min_chars=1, prompt_line=False,
                                drop_last_step=drop_last_step, template=template)
    expected = [variant_rule(tiny_llama, q, t, 3, newlines, template, drop_last_step, 1)
                for q, t in zip(PROMPTS, out.texts)]
    assert_rows_equal_rule(got, expected, 64)
    # without the prompt line, one vector per re-encoded line
    for row, text in zip(got, out.texts):
        lines = kept_lines(text, 1)
        assert len(row) == len(lines[:-1] if drop_last_step else lines)


def test_bad_inputs_are_clear_errors(tiny_llama):
    with pytest.raises(ValueError, match="2 questions for 1 texts"):
        released_step_vectors(tiny_llama, ["a", "b"], ["text"])
    with pytest.raises(ValueError, match="lists of strings"):
        released_step_vectors(tiny_llama, "a", "text")
    with pytest.raises(ValueError, match="not 'logits'"):
        released_step_vectors(tiny_llama, ["a"], ["text"], site="logits")
    with pytest.raises(ValueError, match="'{question}' exactly once"):
        released_step_vectors(tiny_llama, ["a"], ["text"], template="Q: {Question}")
    with pytest.raises(ValueError, match="max_length must be an int >= 1"):
        released_step_vectors(tiny_llama, ["a"], ["text"], max_length=0)
    with pytest.raises(ValueError, match="min_chars must be an int >= 0"):
        released_lines("text", -1)


# ---- the real R1-Distill-Qwen tokenizer, with a tiny random Qwen2 of its vocabulary -------------------
GSM_QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?")
GSM_TEXT = ("<think>\nOkay, so Natalia sold 48 clips in April.\n\nIn May she sold half as many: 48 / 2 = 24.\n"
            "ok\n   Altogether: 48 + 24 = 72.   \n\n\nLet me check: 24 * 2 = 48. Yes.\n</think>\n\n"
            "The answer is: 72.")


@pytest.fixture(scope="module")
def r1(tiny_r1_plain):
    """The tiny Qwen2 of the real R1 vocabulary (conftest) and the tokenizer's newline-ending ids."""
    return tiny_r1_plain, newline_token_ids(tiny_r1_plain.tokenizer)


def test_r1_tokenizer_released_vectors_equal_the_rule(r1):
    model, newlines = r1
    questions = [GSM_QUESTION, "Line one of the question.\n\nLine two: what is 3 + 5?\n", GSM_QUESTION, "Hi"]
    texts = [GSM_TEXT, "First, 3 + 5 = 8.\nSo the answer is: 8.\nDone, it is 8.", "Only one line here.", "short\nx"]
    for max_length in (8192, 90, 20):
        got = released_step_vectors(model, questions, texts, max_length=max_length)
        # the default site: resid_pre.{int(0.9 * L)}, HF hidden_states[int(0.9 * L)]
        layer = int(0.9 * model.n_layers)
        expected = [released_rule(model, q, t, layer, newlines, max_length=max_length) for q, t in zip(questions, texts)]
        assert_rows_equal_rule(got, expected, model.d_model)
        assert [len(v) == 0 for v in got] == [False, False, True, True]  # at most one kept line: skipped


def test_r1_tokenizer_what_the_released_rule_embeds(r1):
    model, _ = r1
    tokenizer = model.tokenizer
    lines = kept_lines(GSM_TEXT)
    assert lines[0] == "<think>" and "ok" not in lines and len(lines) == 7
    got = released_step_vectors(model, [GSM_QUESTION], [GSM_TEXT])[0]
    assert len(got) == len(lines)  # a prompt line, then every line but the last
    # Which tokens each vector holds: the first, the template's second line (its ".\n" token
    # opens it); the second, the question glued to the first line.
    ids = tokenizer(released_text(GSM_QUESTION, lines))["input_ids"]
    newline_ids = {i for i, t in enumerate(model.vocabulary_texts) if t.endswith("\n")}
    segments = released_segments(ids, newline_ids, question_lines=1)
    pieces = [tokenizer.decode([ids[p] for p in segment]) for segment in segments]
    assert pieces[0].startswith(".\nThe last line of your response") and pieces[0].endswith("solves the problem")
    assert pieces[1] == ".\n" + GSM_QUESTION + "<think>"
    # Qwen2's ".\n" is one token: a line's final period opens the next segment with the newline
    assert pieces[2] == "\nOkay, so Natalia sold 48 clips in April"
    assert pieces[3].startswith(".\nIn May she sold half as many")
    # The prompt line is the same vector for every sample; the last line is never embedded.
    other = released_step_vectors(model, ["What is 2 + 2?"], [GSM_TEXT.replace("72.", "seventy-two.")])[0]
    assert_close(other[0], got[0], rtol=0.0)
    assert not torch.allclose(other[1], got[1])
    # without the prompt line: one vector per re-encoded line, the first from the first line's
    # tokens only (here the one token "<think>"), the others as before
    reasoning = released_step_vectors(model, [GSM_QUESTION], [GSM_TEXT], prompt_line=False)[0]
    assert len(reasoning) == len(lines) - 1
    encoded = tokenizer(released_text(GSM_QUESTION, lines), return_offsets_mapping=True)
    characters = len(RELEASED_HEADER + GSM_QUESTION)
    start = next(i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and b > characters)
    assert tokenizer.decode([ids[start]]) == "<think>" and start + 1 == segments[2][0]
    with torch.no_grad():
        hidden = model.module(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    states = hidden[int(0.9 * model.n_layers)][0]
    assert_close(reasoning[0], states[start])
    assert_close(reasoning[1:], got[2:])


def test_r1_questions_come_from_the_chat_template(r1):
    model, _ = r1
    tokenizer = model.tokenizer
    ids, mask = surgery.encode_prompts(model, [GSM_QUESTION, "What is 7 * 8?\nThink."], chat=True)
    rows = [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]  # left padding off
    expected = "<｜begin▁of▁sentence｜><｜User｜>" + "What is 7 * 8?\nThink." + "<｜Assistant｜>"
    assert tokenizer.decode(rows[1]) == expected
    assert [prompt_question(tokenizer, row) for row in rows] == [GSM_QUESTION, "What is 7 * 8?\nThink."]
    plain = tokenizer(GSM_QUESTION)["input_ids"]
    assert plain[0] == tokenizer.bos_token_id and prompt_question(tokenizer, plain) == GSM_QUESTION
    system = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": GSM_QUESTION}],
                                           tokenize=False, add_generation_prompt=True)
    with pytest.raises(ValueError, match="markers \\(<｜User｜>, <｜Assistant｜>\\)"):
        prompt_question(tokenizer, tokenizer(system, add_special_tokens=False)["input_ids"])


def test_r1_with_the_released_csv_question_there_is_no_prompt_line(r1):
    # src/eval.py saves, as the question, the prompt it generated from: its own template (a blank
    # line before the question, ".\n\n" one token here) around the question. Wrapped again, the
    # line count exceeds the newline tokens by one, and the first vector is the question.
    model, newlines = r1
    eval_prompt = RELEASED_HEADER.replace("problem.\n", "problem.\n\n") + GSM_QUESTION
    lines = kept_lines(GSM_TEXT)
    got = released_step_vectors(model, [eval_prompt], [GSM_TEXT])[0]
    assert len(got) == len(lines) - 1  # every line but the last, no prompt line
    assert_close(got, released_rule(model, eval_prompt, GSM_TEXT, int(0.9 * model.n_layers), newlines))
    ids = model.tokenizer(released_text(eval_prompt, lines))["input_ids"]
    first = released_segments(ids, set(newlines.tolist()), len(eval_prompt.strip().split("\n")))[0]
    assert model.tokenizer.decode([ids[p] for p in first]) == ".\n\n" + GSM_QUESTION + "<think>"
