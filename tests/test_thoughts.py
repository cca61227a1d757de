"""SEAL thoughts on text: the span rule, separators, keyword classes and offsets."""

import dataclasses

import pytest

import surgery.thoughts as thoughts_module
from surgery.thoughts import (
    REFLECTION_KEYWORDS,
    REFLECTION_PREFIXES,
    THOUGHT_CLASSES,
    TRANSITION_KEYWORDS,
    TRANSITION_PREFIXES,
    Thought,
    classify_thought,
    split_thoughts,
    thought_positions,
)


def labels(text):
    return [t.label for t in split_thoughts(text)]


def bodies(text):
    return [t.text.strip() for t in split_thoughts(text)]


def assert_offsets(text, thoughts):
    for thought in thoughts:
        assert text[thought.start : thought.end].strip() == thought.text.strip()
        assert text[thought.start : thought.end] == thought.text
        assert text[thought.separator_start : thought.separator_start + 2] == "\n\n"
        assert thought.separator_start + 2 <= thought.start <= thought.end
        assert text[thought.separator_start : thought.start].strip("\n") == ""


# --- the public surface --------------------------------------------------------------------


def test_all_is_sorted_and_every_name_exists():
    assert list(thoughts_module.__all__) == sorted(thoughts_module.__all__)
    for name in thoughts_module.__all__:
        assert getattr(thoughts_module, name) is not None


def test_constants_are_tuples_with_the_published_words():
    assert THOUGHT_CLASSES == ("execution", "reflection", "transition")
    assert REFLECTION_PREFIXES == ("wait",)
    assert TRANSITION_PREFIXES == ("alternatively",)
    assert REFLECTION_KEYWORDS == (
        "verify", "make sure", "hold on", "think again", "'s correct", "'s incorrect", "let me check", "seems right",
    )
    assert TRANSITION_KEYWORDS == (
        "think differently", "another way", "another approach", "another method", "another solution",
        "another strategy", "another technique",
    )
    for constant in (THOUGHT_CLASSES, REFLECTION_PREFIXES, REFLECTION_KEYWORDS, TRANSITION_PREFIXES, TRANSITION_KEYWORDS):
        assert isinstance(constant, tuple)


def test_thought_is_frozen():
    thought = split_thoughts("a\n\nb")[0]
    assert isinstance(thought, Thought)
    with pytest.raises(dataclasses.FrozenInstanceError):
        thought.label = "reflection"


# --- classify_thought: every keyword rule ---------------------------------------------------


REFLECTION_CASES = [
    ("wait", "Wait, 3 + 5 is 8, not 9."),
    ("verify", "Now let me verify the sum."),
    ("make sure", "I should make sure the units match."),
    ("hold on", "Hold on, the train stops twice."),
    ("think again", "Let me think again about the second step."),
    ("'s correct", "So that's correct: 56."),
    ("'s incorrect", "Hmm, that's incorrect, 7 * 8 is 56."),
    ("let me check", "Let me check the arithmetic once more."),
    ("seems right", "The total of 20 seems right."),
]
TRANSITION_CASES = [
    ("alternatively", "Alternatively, divide 60 by 2."),
    ("think differently", "Maybe I should think differently about the speeds."),
    ("another way", "There is another way to count the apples."),
    ("another approach", "Let's try another approach with a table."),
    ("another method", "Another method: draw the graph."),
    ("another solution", "Here is another solution using symmetry."),
    ("another strategy", "A different plan: another strategy is to guess and test."),
    ("another technique", "One more tool is another technique, induction."),
]


def test_the_cases_cover_every_prefix_and_keyword_once():
    assert [word for word, _ in REFLECTION_CASES] == list(REFLECTION_PREFIXES + REFLECTION_KEYWORDS)
    assert [word for word, _ in TRANSITION_CASES] == list(TRANSITION_PREFIXES + TRANSITION_KEYWORDS)


@pytest.mark.parametrize(("word", "text"), REFLECTION_CASES)
def test_each_reflection_prefix_and_keyword_gives_reflection(word, text):
    assert word in text.lower()
    assert classify_thought(text) == "reflection"
    assert labels("Intro.\n\n" + text) == ["reflection"]


@pytest.mark.parametrize(("word", "text"), TRANSITION_CASES)
def test_each_transition_prefix_and_keyword_gives_transition(word, text):
    assert word in text.lower()
    assert classify_thought(text) == "transition"
    assert labels("Intro.\n\n" + text) == ["transition"]


def test_think_differently_is_spelled_correctly_and_matches():
    assert "think differently" in TRANSITION_KEYWORDS
    assert classify_thought("we need to think differently here") == "transition"


@pytest.mark.parametrize(
    "text",
    ["So 3 + 5 = 8.", "First, 7 * 8 = 56.", "Therefore the answer is 16.", "", "   "],
)
def test_text_without_keywords_is_execution(text):
    assert classify_thought(text) == "execution"


def test_reflection_wins_over_transition_when_both_match():
    assert classify_thought("Alternatively, let me check with another approach.") == "reflection"
    assert classify_thought("Wait, another way is to add first.") == "reflection"
    assert classify_thought("Another method would verify it.") == "reflection"


def test_classes_ignore_case():
    assert classify_thought("WAIT. That is wrong.") == "reflection"
    assert classify_thought("LET ME CHECK.") == "reflection"
    assert classify_thought("ALTERNATIVELY, subtract.") == "transition"
    assert classify_thought("Try ANOTHER WAY.") == "transition"


def test_prefixes_apply_after_stripping_whitespace():
    assert classify_thought("  \n\tWait, no.") == "reflection"
    assert classify_thought(" \n alternatively, halve it.") == "transition"


def test_prefix_words_elsewhere_in_the_thought_do_not_count():
    assert classify_thought("I will not wait for the bus.") == "execution"
    assert classify_thought("We could, alternatively, halve it.") == "execution"


def test_every_label_is_a_thought_class():
    for text in ["Wait.", "Alternatively.", "So."]:
        assert classify_thought(text) in THOUGHT_CLASSES


# --- split_thoughts: separators ------------------------------------------------------------


def test_no_separator_gives_no_thoughts():
    assert split_thoughts("<think>One line.\nAnother line.</think>") == []
    assert split_thoughts("Just text, one newline\nonly.") == []
    assert split_thoughts("") == []


def test_text_before_the_first_separator_is_not_a_thought():
    text = "<think>Wait, this preamble is ignored.\n\nSo 2 + 2 = 4."
    assert bodies(text) == ["So 2 + 2 = 4."]
    assert labels(text) == ["execution"]


def test_each_separator_opens_one_thought_up_to_the_next():
    text = "<think>Intro.\n\nSo 3 + 5 = 8.\n\nWait, let me check.\n\nAlternatively, count.\n\nSo 8.</think>"
    assert bodies(text) == ["So 3 + 5 = 8.", "Wait, let me check.", "Alternatively, count.", "So 8."]
    assert labels(text) == ["execution", "reflection", "transition", "execution"]
    assert [t.index for t in split_thoughts(text)] == [0, 1, 2, 3]


def test_a_run_of_three_newlines_is_one_separator():
    text = "Let me think.\n\nFirst, 7 * 8 = 56.\n\n\nWait, is that right? Yes.\n\nTherefore 56."
    found = split_thoughts(text)
    assert bodies(text) == ["First, 7 * 8 = 56.", "Wait, is that right? Yes.", "Therefore 56."]
    run_start = text.index("\n\n\n")
    assert found[1].separator_start == run_start
    assert found[1].start == run_start + 3
    assert_offsets(text, found)


def test_a_long_newline_run_is_one_separator_and_opens_no_empty_thought():
    text = "a\n\n\n\n\n\nb\n\nc"
    assert bodies(text) == ["b", "c"]
    assert [t.index for t in split_thoughts(text)] == [0, 1]


def test_blank_thoughts_are_skipped_and_take_no_index():
    text = "Intro\n\n   \n\nSo 1.\n\n\t \n\nWait.\n\n"
    found = split_thoughts(text)
    assert bodies(text) == ["So 1.", "Wait."]
    assert [t.index for t in found] == [0, 1]
    assert labels(text) == ["execution", "reflection"]
    assert_offsets(text, found)


def test_trailing_separator_before_close_tag_opens_no_thought():
    text = "<think>Okay: 12 - 4 = 8.\n\nThen 8 * 2 = 16.\n\n</think>16"
    assert bodies(text) == ["Then 8 * 2 = 16."]


def test_single_newlines_inside_a_thought_do_not_split_it():
    text = "Intro\n\nStep one.\nStep two, verify.\nStep three."
    assert bodies(text) == ["Step one.\nStep two, verify.\nStep three."]
    assert labels(text) == ["reflection"]


def test_thought_text_is_stripped_before_classifying():
    text = "Intro\n\n   Wait, no.  \n\n \tAlternatively, yes."
    assert labels(text) == ["reflection", "transition"]


# --- split_thoughts: the reasoning span ----------------------------------------------------


def test_close_tag_ends_the_span_and_later_separators_are_ignored():
    text = "<think>Plan.\n\nSo 3 + 5 = 8.</think>\n\nWait, the answer is 8.\n\nAlternatively, 8."
    assert bodies(text) == ["So 3 + 5 = 8."]
    assert split_thoughts(text)[0].end == text.index("</think>")


def test_text_before_the_open_tag_is_outside_the_span():
    text = "System prompt.\n\nWait, user question.\n\n<think>Hmm.\n\nSo 4.</think>"
    assert bodies(text) == ["So 4."]


def test_separator_right_after_the_open_tag_opens_a_thought():
    text = "Question?<think>\n\nWait, read it again.\n\nSo 4."
    assert bodies(text) == ["Wait, read it again.", "So 4."]
    assert split_thoughts(text)[0].separator_start == text.index("<think>") + len("<think>")


def test_missing_close_tag_runs_the_span_to_the_end():
    text = "<think>Hmm.\n\nSo 5.\n\nWait, 5?"
    assert bodies(text) == ["So 5.", "Wait, 5?"]
    assert split_thoughts(text)[-1].end == len(text)


def test_without_open_tag_the_whole_text_is_the_span():
    # SmolLM2 has no think tokens: its traces have no tags at all.
    text = "Tom has 3 apples.\n\nHe buys 5 more, so 3 + 5 = 8.\n\nWait, let me check: 3 + 5 = 8.\n\nSo the answer is 8."
    assert bodies(text) == ["He buys 5 more, so 3 + 5 = 8.", "Wait, let me check: 3 + 5 = 8.", "So the answer is 8."]
    assert labels(text) == ["execution", "reflection", "execution"]
    assert_offsets(text, split_thoughts(text))


def test_without_open_tag_a_close_tag_still_ends_the_span():
    # A completion whose <think> was in the prompt: the answer after </think> is not reasoning.
    text = "Hmm.\n\nSo 8.\n\nWait, yes.</think>\n\nThe answer is 8.\n\nAlternatively 8."
    assert bodies(text) == ["So 8.", "Wait, yes."]


def test_nested_open_tag_is_plain_text_inside_the_span():
    text = "<think>A.\n\n<think>Wait, nested.\n\nSo 2.</think>\n\nAfter."
    found = split_thoughts(text)
    assert bodies(text) == ["<think>Wait, nested.", "So 2."]
    assert labels(text) == ["execution", "execution"]  # "<think>wait" does not start with "wait"
    assert found[-1].end == text.index("</think>")
    assert_offsets(text, found)


def test_repeated_think_blocks_use_only_the_first():
    text = "<think>A.\n\nSo 1.</think>Mid.\n\n<think>B.\n\nWait, 2.</think>"
    assert bodies(text) == ["So 1."]


def test_close_tag_before_the_open_tag_does_not_end_the_span():
    text = "</think>Junk.\n\nWait.\n\n<think>Hmm.\n\nSo 3.\n\nWait, 3?"
    assert bodies(text) == ["So 3.", "Wait, 3?"]


# --- offsets -------------------------------------------------------------------------------


def test_offsets_point_into_the_original_text():
    text = (
        "<|im_start|>user\nWhat is 7 * 8?<|im_end|>\n<|im_start|>assistant\n<think>\nLet me think.\n\n"
        "First, 7 * 8 = 56.\n\n\n  Wait, is that right? Yes.  \n\nAlternatively, 8 * 7 = 56.\n\n\n\n"
        "Therefore 56.\n</think>\n\n56"
    )
    found = split_thoughts(text)
    assert labels(text) == ["execution", "reflection", "transition", "execution"]
    assert_offsets(text, found)
    for earlier, later in zip(found, found[1:]):
        assert earlier.end == later.separator_start
    assert found[-1].end == text.index("</think>")


def test_separator_start_is_where_the_opening_run_begins():
    text = "x.\n\ny.\n\n\nz."
    found = split_thoughts(text)
    assert [t.separator_start for t in found] == [2, 6]
    assert [t.start for t in found] == [4, 9]
    assert [t.end for t in found] == [6, len(text)]
    assert [t.text for t in found] == ["y.", "z."]


def test_r1_tokens_thoughts_open_at_the_one_token_separators(tiny_r1, r1_tokenizer):
    """On the real R1 tokenizer ".\\n\\n" (382) and "\\n\\n" (271) are single tokens: a thought's
    position is that token, inside <think> only, and the text rule and the SEAL trigger's replay
    agree on this trace."""
    from interventions import seal_trigger

    prompt = r1_tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=True,
                                              add_generation_prompt=True, return_dict=False)
    completion = r1_tokenizer("<think>\nOkay.\n\nFirst, 2 + 3 = 5.\n\nWait, let me check.\n\nAlternatively, count."
                              "</think>\n\nThe answer is 5.\n\nDone.", add_special_tokens=False)["input_ids"]
    found = thought_positions(tiny_r1, list(prompt), completion)
    row = list(prompt) + completion
    assert [label for _, label in found] == ["execution", "reflection", "transition"]
    assert [row[p] for p, _ in found] == [382, 382, 382]  # "Okay." / "5." / "check." end with ".\n\n"
    assert found == thought_positions(tiny_r1, list(prompt), completion, seal_trigger())
