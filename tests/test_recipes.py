"""Vector recipes: a steering block whose vector a traces study makes, in the same `surgery run`
(tiny random Llama from a saved config, offline); the recipe's errors name the field and the fix."""

import json

import pytest
from test_runner import write_study

from experiments.config_checks import StudyConfigError
from experiments.recipes import make_vectors
from experiments.run_overrides import RunOverrides
from experiments.study_config import load_study_config
from interventions import SteeringVector

MODEL = 'name = "model"\nconfig = "model"\ntokenizer = "model"'
RECIPE = '{ type = "steering_vector", extract = { study = "traces.toml", layer = 2, correct = 1, incorrect = 2 } }'


def studies(folder, recipe=RECIPE, traces_model=MODEL):
    """``folder/main.toml`` (plain and a SEAL condition whose vector ``traces.toml`` makes) and ``folder/traces.toml``."""
    text = write_study(folder, conditions=["plain"]).read_text().replace('name = "model"', MODEL)
    (folder / "traces.toml").write_text(text.replace('name = "tiny"', 'name = "traces"').replace(
        'output = "out"', 'output = "traces-out"').replace(MODEL, traces_model).split("[probes]")[0])
    (folder / "main.toml").write_text(text.replace("[probes]", f"[conditions.seal]\nblocks = [{recipe}]\n[probes]"))
    return folder / "main.toml"


def test_the_vector_is_made_by_the_traces_study_then_the_study_reads_it(tmp_path):
    path = studies(tmp_path)
    config = load_study_config(path, RunOverrides(random_weights=True))
    (recipe,) = config.recipes
    vector_path = tmp_path / "traces-out-random-weights" / "vector-layer2-correct1-incorrect2.safetensors"
    assert recipe.path == str(vector_path) and not recipe.made and recipe.field == "conditions.seal.blocks[0]"
    (seal,) = config.conditions["seal"]
    assert (seal.source, seal.source_sha256, seal.config["site"]) == (str(vector_path), None, "resid_pre.2")  # a stand-in
    made = make_vectors(config, progress=False)
    assert recipe.made and made.recipes[0].made
    (seal,) = made.conditions["seal"]
    assert seal.source == str(vector_path) and len(seal.source_sha256) == 64 and made.fingerprint() != config.fingerprint()
    vector = SteeringVector.load(vector_path)
    assert vector.metadata["source"]["used"] == {"correct": 0, "incorrect": 2}  # 5 problems, none solved: 2 kept
    assert vector.metadata["source"]["study"] == "traces" and vector.vector.shape == (64,)
    traces = [json.loads(line) for line in (tmp_path / "traces-out-random-weights" / "results.jsonl").read_text().splitlines()]
    assert len(traces) == 5
    assert make_vectors(made, progress=False) is made  # nothing missing: nothing run


def test_a_moved_output_takes_the_traces_study_along(tmp_path):
    config = load_study_config(studies(tmp_path), RunOverrides(random_weights=True, output=str(tmp_path / "smoke")))
    assert config.recipes[0].traces.output == str(tmp_path / "smoke" / "recipes" / "traces")


BAD = {
    "missing study": (RECIPE.replace("traces.toml", "absent.toml"), MODEL, "extract.study", "no study file at"),
    "layer out of range": (RECIPE.replace("layer = 2", "layer = 4"), MODEL, "extract.layer", "has 4 blocks"),
    "no layer": (RECIPE.replace("layer = 2, ", ""), MODEL, "extract.layer", "missing: write layer = 20"),
    "negative count": (RECIPE.replace("correct = 1", "correct = -1"), MODEL, "extract.correct", "must be 0 or more"),
    "unknown option": (RECIPE.replace("incorrect = 2", "incorrect = 2, options = { empty = 1 }"), MODEL,
                       "extract.options.empty", "unknown key"),
    "unknown condition": (RECIPE.replace("incorrect = 2", 'incorrect = 2, condition = "seal"'), MODEL,
                          "extract.condition", "has no condition 'seal': choose one of plain"),
    "another model": (RECIPE, MODEL + '\nsmoke_shrink = 2', "extract.study", "runs another model (smoke_shrink 2 there"),
    "not a steering vector": (RECIPE.replace("steering_vector", "token_mask"), MODEL, "extract",
                              "only a steering_vector block is made by a recipe"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_recipe_errors_name_the_field(case, tmp_path):
    recipe, traces_model, field, words = BAD[case]
    with pytest.raises(StudyConfigError) as caught:
        load_study_config(studies(tmp_path, recipe, traces_model), RunOverrides(random_weights=True))
    assert caught.value.field == f"conditions.seal.blocks[0].{field}" and words in str(caught.value), str(caught.value)


def test_a_recipe_study_that_needs_this_study_is_refused(tmp_path):
    path = studies(tmp_path)
    traces = (tmp_path / "traces.toml").read_text()
    (tmp_path / "traces.toml").write_text(traces + "[conditions.seal]\nblocks = [" + RECIPE.replace("traces.toml", "main.toml") + "]\n")
    with pytest.raises(StudyConfigError, match="leads back to a study that needs it"):
        load_study_config(path, RunOverrides(random_weights=True))
