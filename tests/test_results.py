"""Probe results save to one safetensors file and load back equal; nothing is ever unpickled."""

import pickle

import networkx as nx
import pytest
import torch
from conftest import PROMPTS
from tolerance import assert_close

import surgery
from probes import (
    ClassifiedThoughts,
    GraphAnalysis,
    MIEstimator,
    MIResult,
    ReasoningGraph,
    RecordedStates,
    RecordSite,
    StepVectors,
    ThoughtClassifier,
    analyse,
    fit_linear_probe,
)
from surgery.files.results import SavedResult


def same(loaded, original, path="result"):
    """Exact equality, graphs compared by their nodes and edges with attributes."""
    if isinstance(original, nx.Graph):
        assert type(loaded) is type(original)
        assert list(loaded.nodes(data=True)) == list(original.nodes(data=True)), path
        assert list(loaded.edges(data=True)) == list(original.edges(data=True)), path
    elif isinstance(original, list):
        assert len(loaded) == len(original), path
        for i, (a, b) in enumerate(zip(loaded, original)):
            same(a, b, f"{path}[{i}]")
    elif isinstance(original, SavedResult):
        assert type(loaded) is type(original), path
        for name in vars(original):
            same(getattr(loaded, name), getattr(original, name), f"{path}.{name}")
    else:
        assert_close(loaded, original, rtol=0.0, path=path)  # bit for bit: rtol 0 with any scale


def test_every_probe_result_round_trips_equal(tiny_llama, tmp_path):
    mi = MIEstimator(answers=["8"] * len(PROMPTS))
    classifier = ThoughtClassifier("resid_pre.1")
    record = RecordSite("resid_post.0")
    graph = ReasoningGraph(n_clusters=3, min_chars=1, n_init=2)
    with surgery.trace(tiny_llama, mi, classifier, record, graph) as tr:
        out = tr.generate(PROMPTS, 24, chat=True)
    steps = graph.result()
    results = [mi.result(out), classifier.result(), record.result(), steps, analyse(steps, n_clusters=3, n_init=2)]
    assert sum(len(s) for s in steps) >= 3 and sum(len(t) for t in results[1].thoughts) > 0
    for result in results:
        loaded = type(result).load(result.save(tmp_path / f"{type(result).__name__}.safetensors"))
        same(loaded, result)
    assert type(StepVectors.load(tmp_path / "StepVectors.safetensors")[0]) is torch.Tensor
    with pytest.raises(ValueError, match="holds a MIResult, not a GraphAnalysis"):
        GraphAnalysis.load(tmp_path / "MIResult.safetensors")
    assert {type(r) for r in results} == {MIResult, ClassifiedThoughts, RecordedStates, StepVectors, GraphAnalysis}


def test_a_classifier_with_its_linear_probe_saves_and_predicts_the_same(tiny_llama, tmp_path):
    from surgery.files.saving import load_blocks, save_blocks

    states = torch.cat([torch.randn(12, 64) + 3, torch.randn(12, 64) - 3])
    probe = fit_linear_probe(states, ["execution"] * 12 + ["reflection"] * 12)
    classifier = ThoughtClassifier("resid_pre.1", linear_probe=probe)
    (loaded,) = load_blocks(save_blocks(tmp_path / "c.safetensors", [classifier], tiny_llama), tiny_llama)
    assert loaded.linear_probe.report() == probe.report() and loaded.linear_probe.pipeline is None
    assert loaded.linear_probe.predict(states) == probe.predict(states) == list(probe.pipeline.predict(states.double().numpy()))


class Tripwire:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_results_file_is_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"format": "surgery.result/1", "type": "MIResult", "result": Tripwire(marker)}, tmp_path / "old.pt")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps(Tripwire(marker)))
    for name in ("old.pt", "raw.pkl"):
        with pytest.raises(ValueError, match="never unpickles"):
            MIResult.load(tmp_path / name)
    assert not marker.exists()


def test_unknown_types_are_refused_on_save():
    from dataclasses import dataclass

    @dataclass
    class Unmarked:
        x: int

    @dataclass
    class Holder(SavedResult):
        part: object

    with pytest.raises(TypeError, match="mark it @surgery.files.results.result_part"):
        Holder(Unmarked(1)).save("/tmp/never-written.safetensors")
