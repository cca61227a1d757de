"""A study's EXPERIMENT.toml: parsed into frozen dataclasses, refused before any model loads."""

import dataclasses
import json
import re
import textwrap

import pytest
import torch
import transformers
from conftest import tiny_model

import surgery
import surgery.hosts.loading
from experiments import Problem
from experiments.config_checks import StudyConfigError
import experiments.study_config
from experiments.run_overrides import RunOverrides
from experiments.study_config import load_study_config
from experiments.study_sections import DatasetSpec, GenerationSpec, ModelSpec, PromptSpec
from interventions import RepresentationRecycling, SteeringVector, TokenMask
from probes import MIEstimator, ReasoningGraph, ThoughtClassifier
from surgery.files.saving import save_blocks
from surgery.triggers import OnText, StepWindow

PROBLEMS = [Problem("p0", "Tom has 3 apples and buys 5. How many?", "8"),
            Problem("p1", "What is 7 * 8?", "56")]

STUDY = """
name = "seal-tiny"
output = "runs/seal-tiny"

[model]
name = "tiny-llama"
dtype = "float32"
device = "cpu"

[dataset]
path = "data/test.jsonl"
format = "gsm8k"
limit = 20
offset = 1

[prompt]
template = "{question}\\nPut the final answer after ####."
chat = true

[generation]
max_new_tokens = 6
batch_size = 2
do_sample = false
temperature = 1.0
top_p = 1.0
seed = 0

[conditions.plain]
blocks = []

[conditions.seal]
blocks = [
  { type = "steering_vector", from = "vec.safetensors", alpha = 2.0 },
]

[conditions.mask]
blocks = [
  { type = "token_mask", words = ["Wait", "Alternatively"], penalty = -3.0, when = { kind = "step_window", start = 0, stop = 200 } },
  { type = "representation_recycling", layer = -1, trigger_words = ["Wait"], probability = 0.5 },
]

[probes]
mi = { type = "mi_estimator", answers_from = "dataset" }
thoughts = { type = "thought_classifier", site = "resid_post.-1" }
graph = { type = "reasoning_graph", n_clusters = 2 }
"""


def hand_vector(model) -> SteeringVector:
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(3))
    return SteeringVector(vector, layer=2, when=OnText("\n\n"), metadata={"note": "hand-made"})


@pytest.fixture
def study_folder(tmp_path, tiny_llama):
    """A folder holding STUDY's files: the tiny Llama's config, a dataset and a vector saved for it."""
    tiny_llama.module.config.save_pretrained(tmp_path / "tiny-llama")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.jsonl").write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
    save_blocks(tmp_path / "vec.safetensors", [hand_vector(tiny_llama)], tiny_llama)
    return tmp_path


@pytest.fixture
def model_loads(monkeypatch):
    """Every way a model loads, made to fail and recorded: a test asserts the list stays empty."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded while reading a study's config")

    monkeypatch.setattr(surgery, "load", refuse)
    for name in ("load", "_load_pretrained", "_cached_gguf", "_load_gguf"):
        monkeypatch.setattr(surgery.hosts.loading, name, refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    return calls


def write(folder, text):
    path = folder / "EXPERIMENT.toml"
    path.write_text(text)
    return path


def test_a_full_file_parses_to_the_expected_dataclasses(study_folder, model_loads):
    study = load_study_config(write(study_folder, STUDY))
    assert study.name == "seal-tiny" and study.output == str(study_folder / "runs" / "seal-tiny")
    assert study.model == ModelSpec(name=str(study_folder / "tiny-llama"), dtype="float32", device="cpu")
    assert study.dataset == DatasetSpec(path=str(study_folder / "data" / "test.jsonl"), format="gsm8k", limit=20, offset=1)
    assert study.prompt == PromptSpec("{question}\nPut the final answer after ####.", chat=True)
    assert study.generation == GenerationSpec(max_new_tokens=6, batch_size=2)
    assert list(study.conditions) == ["plain", "seal", "mask"] and study.conditions["plain"] == ()
    (seal,) = study.conditions["seal"]
    assert (seal.type, seal.field, seal.source) == ("steering_vector", "conditions.seal.blocks[0]",
                                                    str(study_folder / "vec.safetensors"))
    assert seal.config["alpha"] == 2.0 and seal.config["site"] == "resid_pre.2"  # the file's site, alpha overridden
    assert seal.config["metadata"] == {"note": "hand-made"} and len(seal.source_sha256) == 64
    mask, rr = study.conditions["mask"]
    assert mask.config["words"] == ["Wait", "Alternatively"] and mask.config["match"] == "auto"  # defaults written out
    # every field written out (the block's own defaults, whatever fields it gains)
    assert rr.config == RepresentationRecycling(layer=-1, trigger_words=("Wait",), probability=0.5).to_dict()["config"]
    assert {"layer": -1, "trigger_words": ["Wait"], "probability": 0.5, "seed": 0, "when": None}.items() <= rr.config.items()
    assert {name: spec.type for name, spec in study.probes.items()} == {
        "mi": "mi_estimator", "thoughts": "thought_classifier", "graph": "reasoning_graph"}
    assert study.probes["mi"].answers_from == "dataset" and study.probes["mi"].config["answers"] is None
    assert model_loads == []


def fingerprint(folder, text):
    return load_study_config(write(folder, text)).fingerprint()


def test_to_dict_is_canonical_json_and_changes_with_any_value(study_folder, model_loads):
    study = load_study_config(write(study_folder, STUDY))
    assert json.loads(json.dumps(study.to_dict())) == study.to_dict()
    same = fingerprint(study_folder, STUDY)
    assert same == study.fingerprint() == fingerprint(study_folder, STUDY)
    # spelled differently, the same study: an int for a float, a default written out
    assert fingerprint(study_folder, STUDY.replace("alpha = 2.0", "alpha = 2")) == same
    assert fingerprint(study_folder, STUDY.replace("probability = 0.5 }", "probability = 0.5, seed = 0 }")) == same
    assert fingerprint(study_folder, STUDY.replace("temperature = 1.0", "temperature = 0.7")) != same
    # generation.cache and compile were added later: at their defaults they leave older fingerprints alone
    assert fingerprint(study_folder, STUDY.replace("top_p = 1.0", 'top_p = 1.0\ncache = "dynamic"')) == same
    assert "cache" not in study.to_dict()["generation"]
    assert fingerprint(study_folder, STUDY.replace("stop = 200", "stop = 100")) != same
    save_blocks(study_folder / "vec.safetensors", [SteeringVector(torch.ones(64), layer=2, when=OnText("\n\n"),
                                                                  metadata={"note": "hand-made"})])
    assert fingerprint(study_folder, STUDY) != same  # a re-extracted vector is another study
    assert model_loads == []


def test_build_blocks_gives_the_blocks_built_by_hand_and_they_run(study_folder, tiny_llama):
    study = load_study_config(write(study_folder, STUDY))
    seal = study.build_blocks("seal", tiny_llama)
    by_hand = hand_vector(tiny_llama)
    expected = SteeringVector(by_hand.vector, layer=2, alpha=2.0, when=OnText("\n\n"), metadata={"note": "hand-made"})
    assert [b.to_dict() for b in seal] == [expected.to_dict()] and torch.equal(seal[0].vector, expected.vector)
    mask = study.build_blocks("mask", tiny_llama)
    assert [b.to_dict() for b in mask] == [
        TokenMask(["Wait", "Alternatively"], penalty=-3.0, when=StepWindow(0, 200)).to_dict(),
        RepresentationRecycling(layer=-1, trigger_words=("Wait",), probability=0.5).to_dict(),
    ]
    assert study.build_blocks("plain", tiny_llama) == []
    probes = study.build_probes(tiny_llama, PROBLEMS)
    assert {name: probe.to_dict() for name, probe in probes.items()} == {
        "mi": MIEstimator(answers=["8", "56"]).to_dict(),
        "thoughts": ThoughtClassifier("resid_post.-1").to_dict(),
        "graph": ReasoningGraph(n_clusters=2).to_dict(),
    }
    prompts = [study.prompt.render(problem) for problem in PROBLEMS]
    with surgery.trace(tiny_llama, *seal, *mask, *probes.values()) as tr:
        out = tr.generate(prompts, study.generation.max_new_tokens, chat=study.prompt.chat)
    assert len(probes["mi"].result(out).values) == 2
    with pytest.raises(KeyError, match="no condition 'seel'.*Did you mean 'seal'"):
        study.build_blocks("seel", tiny_llama)
    with pytest.raises(ValueError, match=r"probes\.mi takes its answers from the dataset"):
        study.build_probes(tiny_llama)
    save_blocks(study_folder / "vec.safetensors", [SteeringVector(torch.ones(64), layer=2)], tiny_llama)
    with pytest.raises(ValueError, match=r"conditions\.seal\.blocks\[0\]: .*vec\.safetensors changed since the study was read"):
        study.build_blocks("seal", tiny_llama)


def test_a_vector_saved_for_a_64_wide_model_is_refused_for_another_width(study_folder, tokenizer, model_loads):
    qwen = tiny_model("qwen2", tokenizer)  # d_model 48, 3 blocks
    qwen.module.config.save_pretrained(study_folder / "tiny-qwen")
    text = STUDY.replace('name = "tiny-llama"', 'name = "tiny-qwen"').replace("layer = -1,", "layer = 0,")
    with pytest.raises(StudyConfigError) as caught:
        load_study_config(write(study_folder, text))
    message = str(caught.value)
    assert caught.value.field == "conditions.seal.blocks[0].from"
    assert "made for tiny-llama (llama, d_model=64), and the study's model tiny-qwen is qwen2 with d_model=48" in message
    assert "Extract it again for tiny-qwen" in message and "point `from` to the new file" in message
    assert model_loads == []


# (what to change in STUDY, the field named, words of the fix)
BAD = {
    "unknown top-level key": (("name =", "nmae ="), "nmae", "Did you mean 'name'?"),
    "misspelled section key": (("max_new_tokens =", "max_new_token ="), "generation.max_new_token",
                               "Did you mean 'max_new_tokens'?"),
    "misspelled block key": (('words = ["Wait", "Alternatively"]', 'wrods = ["Wait"]'),
                             "conditions.mask.blocks[0].wrods", "Did you mean 'words'?"),
    "unknown block type": (('type = "token_mask"', 'type = "token_masks"'), "conditions.mask.blocks[0].type",
                           "Did you mean 'token_mask'? Registered blocks: mi_estimator, reasoning_graph"),
    "wrong field type": (("penalty = -3.0", 'penalty = "high"'), "conditions.mask.blocks[0].penalty",
                         "expected a number, got 'high'"),
    "wrong item type": (('["Wait", "Alternatively"]', '["Wait", 3]'), "conditions.mask.blocks[0].words",
                        "item 1: expected a string, got 3"),
    "bad trigger": (('kind = "step_window"', 'kind = "window"'), "conditions.mask.blocks[0].when",
                    "unknown trigger kind 'window'"),
    "refused by the block": (("penalty = -3.0", 'penalty = -3.0, match = "word"'), "conditions.mask.blocks[0]",
                             "token_mask refuses these settings: match must be one of"),
    "site that does not parse": (('site = "resid_post.-1"', 'site = "resid_pst.1"'), "probes.thoughts.site",
                                 "unknown site 'resid_pst.1'"),
    "site out of range": (('site = "resid_post.-1"', 'site = "resid_post.9"'), "probes.thoughts.site",
                          "tiny-llama has 4 blocks, so the block index must be in 0..3"),
    "layer out of range": (("layer = -1", "layer = 7"), "conditions.mask.blocks[1].layer", "layer 7 is out of range"),
    "tensors without a file": (('from = "vec.safetensors"', 'site = "resid_pre.1"'), "conditions.seal.blocks[0]",
                               "(missing 'vector'). A block with tensors (a steering vector) needs them from a file: "
                               'from = "file.safetensors"'),
    "missing vector file": (('from = "vec.safetensors"', 'from = "old.safetensors"'), "conditions.seal.blocks[0].from",
                            "no file at"),
    "probe in a condition": (('type = "steering_vector", from = "vec.safetensors", alpha = 2.0', 'type = "mi_estimator"'),
                             "conditions.seal.blocks[0].type", "mi_estimator is a probe: list it under [probes]"),
    "answers twice": (('answers_from = "dataset"', 'answers_from = "dataset", answers = ["8"]'), "probes.mi.answers",
                      'give answers or answers_from = "dataset", not both'),
    "answers from elsewhere": (('answers_from = "dataset"', 'answers_from = "file"'), "probes.mi.answers_from",
                               'write answers_from = "dataset" (final answers) or "solution"'),
    "missing dataset file": (('path = "data/test.jsonl"', 'path = "data/train.jsonl"'), "dataset.path",
                             'use sample = "gsm8k"'),
    "dtype out of range": (('dtype = "float32"', 'dtype = "fp16"'), "model.dtype",
                           "'fp16' is not one of float32, float16, bfloat16"),
    "device out of range": (('device = "cpu"', 'device = "gpu"'), "model.device", "write auto, cpu, mps, cuda or cuda:N"),
    "missing model folder": (('name = "tiny-llama"', 'name = "./tiny-llama-2"'), "model.name", "no folder or .gguf file"),
    "template field": (("{question}\\n", "{question} {answer}\\n"), "prompt.template", "unknown field(s) {answer}"),
    "temperature": (("temperature = 1.0", "temperature = 0.0"), "generation.temperature", "must be above 0"),
    "cache": (("top_p = 1.0", 'top_p = 1.0\ncache = "paged"'), "generation.cache", 'must be "dynamic" or "static"'),
    "compile without a static cache": (("top_p = 1.0", "top_p = 1.0\ncompile = true"), "generation.compile",
                                       'needs cache = "static"'),
    "no conditions": ((STUDY[STUDY.index("[conditions.plain]"):STUDY.index("[probes]")], ""), "conditions",
                      "add at least one, e.g. [conditions.plain]"),
    "duplicate condition": (("[conditions.mask]", "[conditions.seal]"), "",
                            "Cannot declare ('conditions', 'seal') twice (at line 36, column 17). Each table"),
    "TOML syntax": (('name = "seal-tiny"', "name = seal-tiny"), "", "not valid TOML: Invalid value (at line 2, column 8)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_config_names_the_field_and_the_fix_before_any_model_loads(case, study_folder, model_loads):
    (old, new), field, fix = BAD[case]
    assert old in STUDY
    with pytest.raises(StudyConfigError) as caught:
        load_study_config(write(study_folder, STUDY.replace(old, new, 1)))
    assert caught.value.field == field
    message = str(caught.value)
    assert message.startswith(f"{field}: " if field else str(study_folder)) and fix in message, message
    assert model_loads == []


def test_an_hf_id_offline_is_checked_when_it_loads(study_folder, model_loads, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = STUDY.replace('name = "tiny-llama"', 'name = "no-such-org/no-such-model"').replace("layer = -1", "layer = 40")
    with pytest.warns(UserWarning, match=re.escape("layer ranges and vector widths will be checked when it loads")):
        study = load_study_config(write(study_folder, text))
    assert study.model.name == "no-such-org/no-such-model" and study.conditions["mask"][1].config["layer"] == 40
    assert model_loads == []


def test_the_model_spec_loads_through_surgery_load_which_the_checks_above_refuse(model_loads):
    with pytest.raises(AssertionError, match="a model was loaded"):
        ModelSpec().load()
    assert model_loads == [(None,)]


def test_the_format_in_the_module_docstring_is_a_valid_study(tmp_path, model_loads):
    doc = experiments.study_config.__doc__
    text = textwrap.dedent(doc[doc.index("::\n\n") + 3 : doc.index("\nExample:")])
    folder = tmp_path / "study"
    (tmp_path / "shared" / "data" / "gsm8k").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "gsm8k" / "test.jsonl").write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
    SteeringVector(torch.zeros(576), layer=15).save(folder / "runs" / "vec.safetensors")
    study = load_study_config(write(folder, text))
    assert list(study.conditions) == ["plain", "seal", "mask", "late_mask"] and list(study.probes) == ["mi", "thoughts", "graph"]
    assert study.model == ModelSpec() and study.dataset.format == "gsm8k"
    assert model_loads == []


# ---- replication studies: the model's config, run overrides, per-condition token limits, system prompts --------

def test_keys_added_later_leave_old_fingerprints_alone(study_folder, model_loads):
    study = load_study_config(write(study_folder, STUDY))
    written = study.to_dict()
    assert "config" not in written["model"] and "random_weights" not in written["model"]
    assert "hub" not in written["dataset"] and "system" not in written["prompt"] and "token_limits" not in written
    spelled_out = STUDY.replace('device = "cpu"', 'device = "cpu"\nsmoke_shrink = 1\nrandom_weights = false')
    assert fingerprint(study_folder, spelled_out) == study.fingerprint()  # defaults are the old study


def test_the_model_config_gives_the_shape_and_random_weights_its_shrunk_one(study_folder, model_loads):
    text = STUDY.replace('name = "tiny-llama"', 'name = "some-org/a-model"\nconfig = "tiny-llama/config.json"\n'
                                                  'tokenizer = "tok"\nsmoke_shrink = 2')
    (study_folder / "tok").mkdir()
    study = load_study_config(write(study_folder, text))  # no warning: the shape is known from the config
    assert study.model.config == str(study_folder / "tiny-llama" / "config.json") and study.model.smoke_shrink == 2
    assert study.model.tokenizer == str(study_folder / "tok") and not study.model.random_weights
    # with random weights the vector of the 64-wide exact model is refused: the random model is 32 wide
    with pytest.raises(StudyConfigError, match=r"conditions\.seal\.blocks\[0\]\.from: .*d_model=64.*d_model=32"):
        load_study_config(write(study_folder, text), RunOverrides(random_weights=True))
    with pytest.raises(StudyConfigError, match=r"^model\.smoke_shrink: widths / 3 are not whole"):
        load_study_config(write(study_folder, text.replace("smoke_shrink = 2", "smoke_shrink = 3")))
    with pytest.raises(StudyConfigError, match=r"^model\.config: no model config at"):
        load_study_config(write(study_folder, text.replace("tiny-llama/config.json", "nothing/config.json")))
    with pytest.raises(StudyConfigError, match=r"^model\.tokenizer: no folder at"):
        load_study_config(write(study_folder, text.replace('tokenizer = "tok"', 'tokenizer = "no-tok"')))
    with pytest.raises(StudyConfigError, match=r"^model: random weights need the model's config and a local tokenizer: "
                                               "add tokenizer"):
        load_study_config(write(study_folder, text.replace('tokenizer = "tok"\n', "")), RunOverrides(random_weights=True))
    assert model_loads == []


def test_run_overrides_are_written_in_before_the_checks(study_folder, model_loads):
    text = STUDY.replace("[conditions.plain]\nblocks = []", "[conditions.plain]\nblocks = []\nmax_new_tokens = 3")
    plain = load_study_config(write(study_folder, text))
    assert plain.max_new_tokens("plain") == 3 and plain.max_new_tokens("mask") == 6
    assert plain.to_dict()["token_limits"] == {"plain": 3}
    other = study_folder / "other.jsonl"
    other.write_text('{"question": "2 + 2?", "answer": "#### 4"}\n')
    study = load_study_config(write(study_folder, text), RunOverrides(limit=1, max_new_tokens=2, dataset=str(other),
                                                                       output=str(study_folder / "elsewhere")))
    assert study.dataset.path == str(other) and study.dataset.limit == 1 and study.dataset.offset == 1  # offset kept
    assert study.generation.max_new_tokens == 2 and study.max_new_tokens("plain") == 2
    assert study.output == str(study_folder / "elsewhere") and study.fingerprint() != plain.fingerprint()
    assert study.overrides.limit == 1
    with pytest.raises(StudyConfigError, match=r"^dataset\.path: no file at"):
        load_study_config(write(study_folder, text), RunOverrides(dataset=str(study_folder / "none.jsonl")))
    with pytest.raises(StudyConfigError, match=r"^conditions\.plain\.max_new_tokens: must be at least 1"):
        load_study_config(write(study_folder, text.replace("max_new_tokens = 3", "max_new_tokens = 0")))
    assert model_loads == []


def test_random_weights_write_beside_the_real_output(study_folder, model_loads):
    text = STUDY.replace('name = "tiny-llama"', 'name = "tiny-llama"\nconfig = "tiny-llama"\ntokenizer = "tok"')
    (study_folder / "tok").mkdir()
    text = text.replace('{ type = "steering_vector", from = "vec.safetensors", alpha = 2.0 },', "")
    study = load_study_config(write(study_folder, text), RunOverrides(random_weights=True))
    assert study.output == str(study_folder / "runs" / "seal-tiny-random-weights") and study.model.random_weights
    assert study.to_dict()["model"]["random_weights"] is True


def test_a_system_prompt_is_rendered_by_the_study(study_folder, tokenizer, model_loads):
    text = STUDY.replace("chat = true", 'chat = true\nsystem = "You are a helpful assistant."')
    study = load_study_config(write(study_folder, text))
    assert study.prompt.system == "You are a helpful assistant." and not study.prompt.engine_chat
    rendered = study.prompt.render(PROBLEMS[0], tokenizer)
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nTom has 3 apples "
                        "and buys 5. How many?\nPut the final answer after ####.<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert load_study_config(write(study_folder, STUDY)).prompt.engine_chat
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        study.prompt.render(PROBLEMS[0])
    with pytest.raises(StudyConfigError, match=r"^prompt\.system: a system message needs the chat template"):
        load_study_config(write(study_folder, text.replace("chat = true", "chat = false")))


def test_a_hub_dataset_with_a_local_copy(study_folder, model_loads):
    text = STUDY.replace('path = "data/test.jsonl"', 'hub = "openai/gsm8k"\nsubset = "main"\npath = "data/test.jsonl"')
    study = load_study_config(write(study_folder, text))
    assert (study.dataset.hub, study.dataset.subset, study.dataset.split) == ("openai/gsm8k", "main", "test")
    assert study.dataset.id_prefix == "gsm8k-test"
    missing_copy = text.replace('path = "data/test.jsonl"', 'path = "data/absent.jsonl"')
    assert load_study_config(write(study_folder, missing_copy)).dataset.path == str(study_folder / "data" / "absent.jsonl")
    with pytest.raises(StudyConfigError, match=r"^dataset\.hub: 'gsm8k' is not a hub dataset name"):
        load_study_config(write(study_folder, text.replace('hub = "openai/gsm8k"', 'hub = "gsm8k"')))
    with pytest.raises(StudyConfigError, match=r"^dataset: give either sample"):
        load_study_config(write(study_folder, text.replace('subset = "main"', 'subset = "main"\nsample = "gsm8k"')))


def test_answers_from_the_solution_give_the_probe_each_problem_s_reference_solution(study_folder, tiny_llama):
    study = load_study_config(write(study_folder, STUDY.replace('answers_from = "dataset"', 'answers_from = "solution"')))
    assert study.probes["mi"].answers_from == "solution"
    solved = [dataclasses.replace(p, solution=f"Worked out: {p.answer}.") for p in PROBLEMS]
    assert study.build_probes(tiny_llama, solved)["mi"].config.answers == ("Worked out: 8.", "Worked out: 56.")
    with pytest.raises(ValueError, match=r'probes\.mi: answers_from = "solution", but problem p0 has no reference'):
        study.build_probes(tiny_llama, PROBLEMS)
