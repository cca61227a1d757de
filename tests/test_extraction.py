"""extract_vector: SEAL's vector from a study folder's rows equals the naive full-hidden-state
reference on the same traces; bad folders and conditions are clear errors."""

from pathlib import Path

import pytest
from test_runner import write_study
from test_steering import TRACES, naive_vector
from tolerance import assert_close

import surgery
from experiments.extraction import extract_vector, seal_layer, study_traces
from experiments.store import ResultStore
from experiments.study_config import load_study_config
from interventions import SteeringVector
from surgery.thoughts import thought_states


def chat_study(folder, conditions) -> Path:
    """write_study's study with the chat template on: its generation prompt opens <think>, so the
    traces' thoughts lie inside the think span, where SEAL reads (and steers) them."""
    path = write_study(folder, conditions=list(conditions))
    path.write_text(path.read_text().replace("chat = false", "chat = true"))
    return path


def traces_study(folder, conditions=("plain",)):
    """A study folder whose ``plain`` rows are TRACES (hand-written, with reflections), as token ids."""
    config = load_study_config(chat_study(folder, conditions))
    model = surgery.load(str(folder / "model"), device="cpu")
    store = ResultStore(config.output, config.to_dict())
    for index, (prompt, completion) in enumerate(TRACES):
        ids = model.tokenizer(completion, add_special_tokens=False)["input_ids"]
        store.append(f"p{index}", "plain", {"prompt": prompt, "token_ids": ids, "text": completion})
    return config, model


def test_the_vector_equals_the_naive_reference_on_the_folder_traces(tmp_path):
    config, model = traces_study(tmp_path)
    vector = extract_vector(config.output, layer=1, progress=False)  # loads the study's model itself
    reference, counts = naive_vector(model, TRACES, 1, chat=True)
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


EXECUTION_ONLY = ("Add 2 and 2.", "First.\n\n2 + 2 = 4.\n\nSo 4.")


def graded_study(folder, traces, grades):
    """A study folder whose ``plain`` rows are ``traces``, stored in reverse dataset order, graded as ``grades``."""
    config = load_study_config(chat_study(folder, ["plain"]))
    model = surgery.load(str(folder / "model"), device="cpu")
    store = ResultStore(config.output, config.to_dict())
    for index in reversed(range(len(traces))):  # as workers or batches may store them
        prompt, completion = traces[index]
        ids = model.tokenizer(completion, add_special_tokens=False)["input_ids"]
        store.append(f"p-{index}", "plain", {"prompt": prompt, "token_ids": ids, "text": completion,
                                             "grade": {"correct": grades[index]}})
    return config, model


def test_the_released_selection_keeps_the_first_correct_and_incorrect_rows_in_dataset_order(tmp_path):
    config, model = graded_study(tmp_path, TRACES, grades=[True, False, True])
    _, traces = study_traces(config.output, correct=1, incorrect=5)
    assert [prompt for prompt, _ in traces] == [TRACES[0][0], TRACES[1][0]]  # p-0 (correct), p-1 (incorrect)
    _, traces = study_traces(config.output, correct=None, incorrect=0)
    assert [prompt for prompt, _ in traces] == [TRACES[0][0], TRACES[2][0]]
    vector = extract_vector(config.output, layer=1, model=model, progress=False, correct=1, incorrect=5)
    reference, counts = naive_vector(model, TRACES[:2], 1, chat=True)
    assert_close(vector.vector, reference)
    assert vector.metadata["class_counts"] == counts
    assert vector.metadata["source"]["used"] == {"correct": 1, "incorrect": 1}
    assert (vector.metadata["source"]["correct"], vector.metadata["source"]["incorrect"]) == (1, 5)


def test_empty_classes_are_an_error_except_in_random_weights_smoke_runs(tmp_path):
    config, model = graded_study(tmp_path, [EXECUTION_ONLY, TRACES[0]], grades=[False, True])
    with pytest.raises(ValueError, match="SEAL needs both execution and reflection/transition thoughts"):
        extract_vector(config.output, layer=1, model=model, progress=False, correct=0)  # no reflection in p-0
    vector = extract_vector(config.output, layer=1, model=model, progress=False, correct=0, allow_empty_classes=True)
    assert "random-weights smoke run" in vector.metadata["empty_classes_as_zero"]
    assert vector.metadata["class_counts"]["reflection"] == 0 and vector.metadata["class_counts"]["execution"] > 0
    trace = (EXECUTION_ONLY[0], model.tokenizer(EXECUTION_ONLY[1], add_special_tokens=False)["input_ids"])
    states, labels = thought_states(model, [trace], model.resolve_site("resid_pre.1"), chat=True)
    assert_close(vector.vector, states.double().mean(0).float())  # mean(execution) - 0
    both = extract_vector(config.output, layer=1, model=model, progress=False, allow_empty_classes=True)
    assert "empty_classes_as_zero" not in both.metadata  # with both classes: SEAL's own extraction
