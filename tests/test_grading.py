"""grade: hand-written completions, right and wrong, in the main thread, in threads and in Ray actors."""

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from experiments.grading import Grade, extract_answer, grade

ROOT = Path(__file__).resolve().parents[1]

# (completion, reference, correct, predicted, found in)
CASES = [
    # thousands commas, either side
    ("So the total is 1,000.", "1000", True, "1000", "the last number"),
    ("The farm has 1000 apples.", "1,000", True, "1000", "the last number"),
    (r"Hence \boxed{1,000}", "1000", True, "1,000", r"the last \boxed{}"),
    ("So the total is 1,001.", "1000", False, "1001", "the last number"),
    # units and currency
    ("She makes $18 every day.", "18", True, "18", "the last number"),
    ("She makes 18 dollars.", "18", True, "18", "the last number"),
    ("The rope is 18 cm long.", "18", True, "18", "the last number"),
    (r"\boxed{\$18}", "18", True, r"\$18", r"the last \boxed{}"),
    (r"\boxed{18 \text{ dollars}}", "18", True, r"18 \text{ dollars}", r"the last \boxed{}"),
    (r"\boxed{18 dollars}", "18", True, "18 dollars", r"the last \boxed{}"),
    ("She makes $19 every day.", "18", False, "19", "the last number"),
    ("The rope is 18 cm long and 2 cm wide.", "18", False, "2", "the last number"),
    # boxes, fractions against decimals
    (r"Thus \boxed{\frac{1}{2}}.", "0.5", True, r"\frac{1}{2}", r"the last \boxed{}"),
    (r"\boxed{0.5}", r"\frac{1}{2}", True, "0.5", r"the last \boxed{}"),
    (r"\boxed{\frac{1}{3}}", "0.5", False, r"\frac{1}{3}", r"the last \boxed{}"),
    (r"First \boxed{17}. No wait: \boxed{18}", "18", True, "18", r"the last \boxed{}"),
    (r"\boxed{18}. The answer is 17", "18", True, "18", r"the last \boxed{}"),
    (r"\boxed{x^2+1}", "1 + x^2", True, "x^2+1", r"the last \boxed{}"),
    # negative numbers and decimals
    ("It drops to -3 degrees.", "-3", True, "-3", "the last number"),
    ("It drops to 3 degrees.", "-3", False, "3", "the last number"),
    ("Each costs 2.75 dollars.", "2.75", True, "2.75", "the last number"),
    ("Each costs 2.57 dollars.", "2.75", False, "2.57", "the last number"),
    ("It costs $5.00.", "5", True, "5.00", "the last number"),
    # the explicit markers before the last number
    ("12 eggs are left.\n#### 18\nThen 20 more.", "18", True, "18", "the line after '####'"),
    ("#### 1,000 dollars", "1000", True, "1000", "the line after '####'"),
    ("The answer is 18. That took 3 steps", "18", True, "18", "an answer phrase"),
    ("Final answer: 17, from 5 steps", "18", False, "17", "an answer phrase"),
    ("The answer is $18.", "18", True, "18", "an answer phrase"),
]


@pytest.mark.parametrize(("completion", "reference", "correct", "predicted", "where"), CASES)
def test_hand_written_cases(completion, reference, correct, predicted, where):
    result = grade(completion, reference)
    assert (result.correct, result.predicted, result.reference) == (correct, predicted, reference)
    assert where in result.reason and ("equals" if correct else "differs") in result.reason
    assert extract_answer(completion)[0] == predicted


@pytest.mark.parametrize("completion", ["I do not know.", "", r"\boxed{}", "Let me think about it..."])
def test_no_answer_at_all(completion):
    result = grade(completion, "18")
    assert result == Grade(correct=False, predicted=None, reference="18", reason=result.reason)
    assert result.reason.startswith("no answer found")
    assert extract_answer(completion)[0] is None


def test_an_answer_that_is_no_expression_is_compared_as_text():
    result = grade(r"\boxed{???}", "18")
    assert (result.correct, result.predicted) == (False, "???")
    assert "read as text only" in result.reason
    assert grade(r"\boxed{???}", "???").correct


def test_grades_are_json():
    result = grade(r"\boxed{\frac{1}{2}}", "0.5")
    assert Grade(**json.loads(json.dumps(result.to_dict()))) == result


def test_grading_in_threads():
    """math-verify's timeouts use signal.alarm, which exists only in the main thread."""
    cases = [(c, r) for c, r, *_ in CASES]
    with ThreadPoolExecutor(max_workers=2) as pool:
        threaded = list(pool.map(lambda case: grade(*case), cases))
    assert threaded == [grade(*case) for case in cases]
    results = []
    worker = threading.Thread(target=lambda: results.append(grade("1,000 dollars", "1000")))
    worker.start()
    worker.join()
    assert [r.correct for r in results] == [True]


def test_grading_in_ray_actors():
    """A plain actor runs its methods in the worker's main thread, a threaded one in other threads."""
    import ray
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:

        @ray.remote
        class Grader:
            def grade(self, completion: str, reference: str) -> tuple[bool, dict]:
                from experiments.grading import grade

                in_main_thread = threading.current_thread() is threading.main_thread()
                return in_main_thread, grade(completion, reference).to_dict()

        plain, threaded = Grader.remote(), Grader.options(max_concurrency=2).remote()
        calls = [plain.grade.remote(r"\boxed{\frac{1}{2}}", "0.5")]
        calls += [threaded.grade.remote("1,000 dollars", "1000"), threaded.grade.remote("nothing", "3")]
        (main, first), (other, second), (_, third) = ray.get(calls, timeout=120)
    finally:
        ray.shutdown()
    assert main and not other  # both kinds of thread were exercised
    assert (first["correct"], second["correct"], third["predicted"]) == (True, True, None)
