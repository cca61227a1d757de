"""extract_vector: SEAL's vector from a study folder's rows equals the naive full-hidden-state
reference on the same traces; bad folders and conditions are clear errors."""

import pytest
from test_runner import write_study
from test_steering import TRACES, naive_vector
from tolerance import assert_close

import surgery
from experiments.extraction import extract_vector, seal_layer, study_traces
from experiments.store import ResultStore
from experiments.study_config import load_study_config
from interventions import SteeringVector


def traces_study(folder, conditions=("plain",)):
    """A study folder whose ``plain`` rows are TRACES (hand-written, with reflections), as token ids."""
    config = load_study_config(write_study(folder, conditions=list(conditions)))
    model = surgery.load(str(folder / "model"), device="cpu")
    store = ResultStore(config.output, config.to_dict())
    for index, (prompt, completion) in enumerate(TRACES):
        ids = model.tokenizer(completion, add_special_tokens=False)["input_ids"]
        store.append(f"p{index}", "plain", {"prompt": prompt, "token_ids": ids, "text": completion})
    return config, model


def test_the_vector_equals_the_naive_reference_on_the_folder_traces(tmp_path):
    config, model = traces_study(tmp_path)
    vector = extract_vector(config.output, layer=1, progress=False)  # loads the study's model itself
    reference, counts = naive_vector(model, TRACES, 1, chat=False)
    assert_close(vector.vector, reference)
    assert vector.metadata["class_counts"] == counts == {"execution": 6, "reflection": 2, "transition": 1}
    assert vector.metadata["source"]["condition"] == "plain" and vector.metadata["source"]["study"] == "tiny"
    loaded = SteeringVector.load(vector.save(tmp_path / "seal.safetensors"))
    assert loaded.metadata["source"] == vector.metadata["source"] and loaded.config.site == "resid_pre.1"


def test_the_default_layer_is_the_seal_depth(tmp_path):
    config, model = traces_study(tmp_path)
    vector = extract_vector(config.output, model=model, progress=False)
    assert vector.config.site == f"resid_pre.{seal_layer(model.n_layers)}"
    assert [seal_layer(n) for n in (28, 30, 64, 4)] == [20, 21, 46, 3]


def test_conditions_must_be_named_and_known_and_have_rows(tmp_path):
    config, _ = traces_study(tmp_path, conditions=("plain", "mask"))
    with pytest.raises(ValueError, match=r"2 conditions \(mask, plain\).*--condition"):
        study_traces(config.output)
    with pytest.raises(ValueError, match="no condition 'plian'"):
        study_traces(config.output, "plian")
    with pytest.raises(ValueError, match="no finished row of condition 'mask'"):
        study_traces(config.output, "mask")
    assert len(study_traces(config.output, "plain")[1]) == len(TRACES)


def test_a_folder_that_is_not_a_study_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json.*surgery run"):
        extract_vector(tmp_path)
