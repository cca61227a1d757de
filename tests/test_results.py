"""Probe results save to disk and load back."""

import pytest
import torch
from conftest import PROMPTS

import surgery
from probes import ClassifiedThoughts, GraphAnalysis, MIEstimator, MIResult, RecordedStates, RecordSite, ThoughtClassifier, analyse
from surgery.results import SavedResult


def test_every_probe_result_round_trips(tiny_llama, tmp_path):
    mi = MIEstimator(answers=["8"] * len(PROMPTS))
    classifier = ThoughtClassifier("resid_pre.1")
    record = RecordSite("resid_post.0")
    with surgery.trace(tiny_llama, mi, classifier, record) as tr:
        out = tr.generate(PROMPTS, 16, chat=True)
    steps = [torch.randn(6, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    results = [mi.result(out), classifier.result(), record.result(), analyse(steps, n_clusters=3)]
    for result, kind in zip(results, (MIResult, ClassifiedThoughts, RecordedStates, GraphAnalysis)):
        assert isinstance(result, SavedResult)
        loaded = kind.load(result.save(tmp_path / f"{kind.__name__}.pt"))
        assert type(loaded) is kind
    loaded_mi = MIResult.load(tmp_path / "MIResult.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded_mi.values, results[0].values))
    loaded_graph = GraphAnalysis.load(tmp_path / "GraphAnalysis.pt")
    assert [list(g.edges(data=True)) for g in loaded_graph.graphs] == [list(g.edges(data=True)) for g in results[3].graphs]
    with pytest.raises(ValueError, match="holds a MIResult, not a GraphAnalysis"):
        GraphAnalysis.load(tmp_path / "MIResult.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a saved surgery result"):
        MIResult.load(tmp_path / "other.pt")
