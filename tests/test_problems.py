"""Problem: the unit of a study, keyed by a stable id."""

import pytest

from experiments.problems import Problem


def test_problems_are_values_keyed_by_id():
    a = Problem(id="gsm8k-test-0", question="What is 7 * 8?", answer="56")
    assert a == Problem(id="gsm8k-test-0", question="What is 7 * 8?", answer="56")
    assert len({a.id, Problem(id="gsm8k-test-1", question="3 + 5?", answer="8").id}) == 2


@pytest.mark.parametrize("bad", [dict(id="", question="q", answer="1"), dict(id="x", question="  ", answer="1")])
def test_a_problem_without_id_or_question_is_refused(bad):
    with pytest.raises(ValueError, match="id|question"):
        Problem(**bad)
