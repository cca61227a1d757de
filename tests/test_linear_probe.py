"""The linear thought probe against scikit-learn and on separable and shuffled labels."""

import pytest
import torch
from conftest import clusters
from tolerance import assert_close, close

from probes.linear_probe import LinearThoughtProbe, fit_linear_probe


def test_linear_probe_separates_clusters_and_not_shuffled_labels():
    states, labels = clusters(60, 16)
    probe = fit_linear_probe(states, labels)
    assert isinstance(probe, LinearThoughtProbe)
    assert probe.classes == ("execution", "reflection", "transition")
    assert probe.held_out_accuracy > 0.9 and probe.stratified
    assert probe.test_counts == {"execution": 15, "reflection": 15, "transition": 15}
    assert probe.train_counts == {"execution": 45, "reflection": 45, "transition": 45}
    shuffled = [labels[i] for i in torch.randperm(len(labels), generator=torch.Generator().manual_seed(1)).tolist()]
    chance = fit_linear_probe(states, shuffled)
    assert chance.held_out_accuracy < 0.6 and close(chance.chance_accuracy, 1 / 3)


@pytest.mark.parametrize("classes", [("execution", "reflection"), ("execution", "reflection", "transition")])
def test_folded_weights_agree_with_sklearn(classes):
    states, labels = clusters(30, 8, classes=classes, spread=1.0)
    probe = fit_linear_probe(states, labels)
    points = torch.randn(200, 8, generator=torch.Generator().manual_seed(2)) * 3
    scores = probe.scores(points)
    assert [probe.classes[k] for k in scores.argmax(-1).tolist()] == probe.predict(points)
    if len(classes) > 2:
        expected = probe.pipeline.decision_function(points.double().numpy())
        assert_close(scores, torch.from_numpy(expected))


def test_linear_probe_errors_and_fallback():
    states = torch.randn(10, 4)
    with pytest.raises(ValueError, match="two distinct labels"):
        fit_linear_probe(states, ["execution"] * 10)
    with pytest.raises(ValueError, match="one label per state"):
        fit_linear_probe(states, ["a", "b"] * 4)
    with pytest.raises(ValueError, match="too few"):
        fit_linear_probe(states[:2], ["a", "b"])
    with pytest.raises(ValueError, match="test_size"):
        fit_linear_probe(states, ["a", "b"] * 5, test_size=1.0)
    # a singleton label cannot be stratified: a plain split, reported as such
    probe = fit_linear_probe(states, ["a"] * 5 + ["b"] * 4 + ["c"])
    assert not probe.stratified and sum(probe.test_counts.values()) == 3
    assert probe.predict(states[:0]) == []
