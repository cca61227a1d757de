"""A request's blocks: checked like a study's, files only under --files, answers spread per wave."""

import pytest
import torch

import surgery
from experiments.serving.errors import RequestError
from experiments.serving.request_blocks import parse_stack
from interventions import SteeringVector


@pytest.fixture
def files(tmp_path, tiny_llama):
    folder = tmp_path / "vectors"
    folder.mkdir()
    vector = SteeringVector(torch.ones(tiny_llama.d_model), layer=1, when=surgery.Always())
    surgery.save_blocks(folder / "v.safetensors", [vector], tiny_llama)
    surgery.save_blocks(tmp_path / "outside.safetensors", [vector], tiny_llama)
    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    return folder


def _refusal(files, model, interventions=None, probes=None, rows=1):
    with pytest.raises(RequestError) as refused:
        parse_stack(interventions, probes, files=files, model=model, rows=rows)
    return refused.value


def test_a_stack_builds_fresh_blocks_named_as_a_study_names_them(files, tiny_llama):
    stack = parse_stack([{"type": "steering_vector", "from": "v.safetensors", "alpha": 2.0},
                         {"type": "steering_vector", "from": "v.safetensors"}],
                        [{"type": "mi_estimator", "answers": ["4"]}], files=files, model=tiny_llama, rows=1)
    assert stack.names == ["steering_vector", "steering_vector#2"] and stack.probe_names == ["mi_estimator"]
    interventions, probes = stack.build(tiny_llama, positions=[2], wave_rows=4)
    again, _ = stack.build(tiny_llama, positions=[2], wave_rows=4)
    assert interventions["steering_vector"].config.alpha == 2.0 and interventions["steering_vector#2"].config.alpha == 1.0
    assert interventions["steering_vector"] is not again["steering_vector"]
    assert probes["mi_estimator"].config.answers == ("4",) * 4


def test_answers_go_to_the_requests_rows(tiny_llama):
    stack = parse_stack(None, [{"type": "mi_estimator", "answers": ["a", "b"]}], files=None, model=tiny_llama, rows=2)
    _, probes = stack.build(tiny_llama, positions=[1, 3], wave_rows=4)
    assert probes["mi_estimator"].config.answers == ("a", "a", "a", "b")
    assert _refusal(None, tiny_llama, probes=[{"type": "mi_estimator", "answers": ["a", "b"]}], rows=3).param == \
        "probes[0].answers"
    assert _refusal(None, tiny_llama, probes=[{"type": "mi_estimator", "answers_from": "dataset"}]).param == \
        "probes[0].answers_from"


@pytest.mark.parametrize("path, words", [("../outside.safetensors", "outside"), ("link.safetensors", "outside"),
                                         ("/etc/passwd", ".safetensors"), ("missing.safetensors", "no file")])
def test_files_are_read_only_under_the_folder(files, tiny_llama, path, words):
    error = _refusal(files, tiny_llama, [{"type": "steering_vector", "from": path}])
    assert error.param == "interventions[0].from" and words in error.message


def test_no_folder_means_no_files(tiny_llama):
    error = _refusal(None, tiny_llama, [{"type": "steering_vector", "from": "v.safetensors"}])
    assert "--files" in error.message


@pytest.mark.parametrize("table, param", [
    ({"type": "nope"}, "interventions[0].type"),
    ({"type": "mi_estimator"}, "interventions[0].type"),  # a probe listed as an intervention
    ({"type": "token_mask", "words": "Wait"}, "interventions[0].words"),
    ({"type": "token_mask", "words": ["Wait"], "bogus": 1}, "interventions[0].bogus"),
    ({"type": "representation_recycling", "layer": 99}, "interventions[0].layer"),
    ({"type": "representation_recycling", "layer": 1, "coin": "released"}, "interventions[0].coin"),
])
def test_bad_tables_name_their_field(tiny_llama, table, param):
    assert _refusal(None, tiny_llama, [table]).param == param


def test_a_preset_then_the_requests_own(tiny_llama):
    preset = parse_stack([{"type": "token_mask", "words": ["Wait"]}], [{"type": "mi_estimator", "answers": ["1"]}],
                         files=None, model=tiny_llama, rows=1)
    own = parse_stack([{"type": "token_mask", "words": ["So"]}], [{"type": "mi_estimator", "answers": ["2"]}],
                      files=None, model=tiny_llama, rows=1)
    both = preset + own
    assert both.names == ["token_mask", "token_mask#2"] and both.probe_names == ["mi_estimator", "mi_estimator#2"]
    assert both.answers == {0: ("1",), 1: ("2",)}
