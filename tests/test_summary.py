"""Per-condition summaries: Wilson intervals against closed-form values, counts from records."""

import pytest

from experiments.summary import condition_summaries, format_table, wilson_interval


Z2 = 1.96**2


@pytest.mark.parametrize("correct, n, expected, tolerance", [
    (8, 10, (0.4902, 0.9433), 1e-4),          # the usual table value for 8 of 10
    (0, 10, (0.0, Z2 / (10 + Z2)), 1e-12),     # at 0 correct the upper bound is z²/(n + z²)
    (10, 10, (10 / (10 + Z2), 1.0), 1e-12),    # and at n correct the lower bound n/(n + z²)
    (0, 0, (0.0, 1.0), 0.0),
])
def test_wilson_interval_equals_the_closed_form(correct, n, expected, tolerance):
    assert wilson_interval(correct, n) == pytest.approx(expected, abs=tolerance)


def record(problem, condition, correct, tokens, labels=(), peaks=(), fired=()):
    payload = {"grade": {"correct": correct}, "n_tokens": tokens, "fired": {"mask": list(fired)},
               "probes": {"thoughts": {"labels": list(labels), "counts": {l: labels.count(l) for l in set(labels)}},
                          "mi": {"values": [0.0] * tokens, "peaks": list(peaks)}}}
    return {"problem": problem, "condition": condition, "payload": payload}


def test_summaries_count_per_condition_in_the_order_first_seen():
    records = [record("a", "plain", True, 10, ("execution", "reflection"), peaks=(1, 4)),
               record("a", "mask", False, 20, ("execution",), fired=(3,)),
               record("b", "plain", False, 30, ("execution",), peaks=(2,)),
               record("b", "mask", False, 40, ())]
    plain, mask = condition_summaries(records)
    assert (plain.condition, plain.n, plain.correct, plain.accuracy) == ("plain", 2, 1, 0.5)
    assert (plain.low, plain.high) == pytest.approx(wilson_interval(1, 2))
    assert (plain.mean_tokens, plain.sd_tokens) == (20.0, 10.0)
    assert plain.thoughts == {"execution": 2, "reflection": 1} and plain.mean_peaks == 1.5
    assert mask.fired == {"mask": 1} and mask.thoughts == {"execution": 1} and mask.mean_peaks == 0.0
    table = format_table([plain, mask])
    assert "plain" in table.splitlines()[2] and "50.0%" in table and "execution 2, reflection 1" in table
