"""surgery demo: the study files it writes load as studies (seven conditions, two of them closed
loop, all probes, the vector's and the thought probe's sites), its evaluated problems are disjoint from its traces' ones, and bad options are
clear errors. (The whole demo takes minutes on the real model: its figures are in the README.)"""

import pytest
import torch

from experiments.demo import EVALUATED_MAX, TRACE_PROBLEMS, write_study_files
from experiments.runner import study_problems
from experiments.study_config import load_study_config
from interventions import SteeringVector
from probes import ThoughtClassifier, fit_linear_probe
from surgery.files.saving import save_blocks
from surgery.signals import OnSignal
from surgery.triggers import OnText, StepWindow, Trigger


def test_the_demo_studies_load_and_their_problems_are_disjoint(tmp_path):
    traces_toml, study_toml = write_study_files(tmp_path, problems=EVALUATED_MAX, max_new_tokens=96, layer=21)
    traces = load_study_config(traces_toml)
    assert list(traces.conditions) == ["plain"] and traces.generation.do_sample
    assert traces.output == str(tmp_path / "traces") and "Wait, let me check" in traces.prompt.template
    # a SmolLM2-shaped vector where stage 2 writes it (the study checks it against the model)
    SteeringVector(torch.zeros(576), layer=21, metadata={"architecture": "llama", "d_model": 576}).save(
        tmp_path / "seal.safetensors")
    # and a thought classifier with a linear probe of that width, where stage 2 writes it
    states = torch.randn(12, 576, generator=torch.Generator().manual_seed(0))
    probe = fit_linear_probe(states, ["execution", "reflection"] * 6)
    save_blocks(tmp_path / "thought_probe.safetensors", [ThoughtClassifier("resid_pre.20", linear_probe=probe)])
    study = load_study_config(study_toml)
    assert list(study.conditions) == ["plain", "seal", "mask", "tts", "rr", "seal_gated", "rr_peaks"]
    assert [spec.type for specs in study.conditions.values() for spec in specs] == [
        "steering_vector", "token_mask", "thinking_token_insertion", "representation_recycling", "steering_vector",
        "representation_recycling"]
    assert {name: spec.type for name, spec in study.probes.items()} == {
        "mi": "mi_estimator", "thoughts": "thought_classifier", "graph": "reasoning_graph"}
    assert study.probes["thoughts"].to_dict()["config"]["site"] == "resid_pre.20"
    gated = Trigger.from_dict(study.conditions["seal_gated"][0].to_dict()["config"]["when"])
    assert gated == OnText("\n\n") & StepWindow(1) & OnSignal("thought_classifier", "predicted", "in",
                                                                ["reflection", "transition"])
    peaks = study.conditions["rr_peaks"][0].to_dict()["config"]
    assert Trigger.from_dict(peaks["when"]) == OnSignal("mi_estimator", "peak") and peaks["probability"] == 1.0
    evaluated = [p.id for p in study_problems(study)]
    traced = [p.id for p in study_problems(traces)]
    assert len(evaluated) == EVALUATED_MAX and len(traced) == TRACE_PROBLEMS[1]
    assert not set(evaluated) & set(traced)
    tts = study.conditions["tts"][0].to_dict()["config"]
    assert tts["first_budget"] + tts["budget"] == 96


@pytest.mark.parametrize(("options", "message"), [
    ({"problems": 0}, "1 to 40 problems"), ({"problems": 41}, "1 to 40 problems"),
    ({"max_new_tokens": 8}, "at least 32")])
def test_bad_demo_options_are_errors(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        write_study_files(tmp_path, **options)
