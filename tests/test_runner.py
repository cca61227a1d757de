"""run_study: every (problem, condition) once, graded and summarised; an interrupted, resumed or
sharded run stores what an uninterrupted one stores (tiny random Llama saved to a folder, offline)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tokenizer, tiny_model
from safetensors.torch import load_file
from tolerance import assert_close

import surgery
from experiments.runner import run_study, study_problems, tensor_path
from experiments.store import ResultStore
from experiments.study_config import load_study_config
from experiments.study_sections import ModelSpec
from interventions import SteeringVector

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [("Tom has 3 apples and buys 5. How many?", "8"), ("What is 7 * 8?", "56"),
             ("A train goes 60 miles in 2 hours. Speed?", "30"), ("Half of 32?", "16"),
             ("Wait, 2 + 2?", "4")]
CONDITIONS = ["plain", "seal", "mask", "tts", "rr"]


def write_study(folder: Path, output: str = "out", max_new_tokens: int = 12, conditions=CONDITIONS, **generation) -> Path:
    """A tiny model and tokenizer saved to ``folder/model``, five GSM8K-style problems, a SEAL vector
    file, and a study over ``conditions`` (of the five, or the closed-loop ``rr_peaks``) with all
    three probes."""
    tokenizer = build_tokenizer()
    model = tiny_model("llama", tokenizer)
    # a second EOS id that a row emits early, so some rows stop and thinking-token insertion acts
    plain = surgery.generate(model, [question for question, _ in QUESTIONS], 8)
    model.module.generation_config.eos_token_id = [2, plain.token_ids[1][3]]
    model.module.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    with open(folder / "problems.jsonl", "w") as file:
        for question, answer in QUESTIONS:
            file.write(json.dumps({"question": question, "answer": f"Some steps.\n#### {answer}"}) + "\n")
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)) * 4
    SteeringVector(vector, layer=1, when=surgery.OnText("\n")).save(folder / "seal.safetensors")
    # RR fires when the greedy next token is one of its words: many common words of this vocabulary
    words = sorted({t.strip() for t in model.vocabulary_texts if t.strip().isalpha()})[:64]
    blocks = {
        "plain": "",
        "seal": '{ type = "steering_vector", from = "seal.safetensors" }',
        "mask": '{ type = "token_mask", words = ["e", "."], penalty = -5.0 }',
        "tts": '{ type = "thinking_token_insertion", words = [" Wait"], budget = 4, answer_prompt = " So", answer_tokens = 2 }',
        "rr": f'{{ type = "representation_recycling", layer = 1, trigger_words = {json.dumps(words)} }}',
        # closed loop: recycling where the MI probe of [probes] measures a peak
        "rr_peaks": '{ type = "representation_recycling", layer = 1, when = { kind = "signal", source = "mi_estimator", signal = "peak" } }',
    }
    tables = "".join(f"[conditions.{name}]\nblocks = [{blocks[name]}]\n" for name in conditions)
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in generation.items())
    (folder / "study.toml").write_text(f'''
name = "tiny"
output = "{output}"
[model]
name = "model"
device = "cpu"
[dataset]
path = "problems.jsonl"
format = "gsm8k"
[prompt]
template = "{{question}}"
chat = false
[generation]
max_new_tokens = {max_new_tokens}
batch_size = 2
{extra}
{tables}[probes]
mi = {{ type = "mi_estimator", answers_from = "dataset", warmup = 3 }}
thoughts = {{ type = "thought_classifier", site = "resid_pre.2" }}
graph = {{ type = "reasoning_graph", n_clusters = 2, min_chars = 1 }}
''')
    return folder / "study.toml"


def by_key(store: ResultStore) -> dict:
    return {(r["problem"], r["condition"]): r["payload"] for r in store.records()}


def only(results: dict, conditions) -> dict:
    return {key: payload for key, payload in results.items() if key[1] in conditions}


def assert_same_results(got: dict, want: dict) -> None:
    """Same keys; identical tokens, texts, grades and firing; probe values within float32 tolerance."""
    assert sorted(got) == sorted(want)
    for key in want:
        a, b = got[key], want[key]
        for field in ("text", "token_ids", "stop_reason", "grade", "fired"):
            assert a[field] == b[field], (key, field)
        assert a["probes"]["thoughts"] == b["probes"]["thoughts"], key
        assert a["probes"]["mi"]["peaks"] == b["probes"]["mi"]["peaks"], key
        assert_close(torch.tensor(a["probes"]["mi"]["values"]), torch.tensor(b["probes"]["mi"]["values"]),
                     precision=torch.float32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of the study (the reference of the other tests)."""
    folder = tmp_path_factory.mktemp("study")
    config = load_study_config(write_study(folder))
    return folder, config, by_key(run_study(config, progress=False))


def test_every_problem_and_condition_is_stored_once_graded_and_summarised(reference):
    folder, config, results = reference
    assert ResultStore(config.output, config.to_dict()).config_hash == config.fingerprint()  # one hash
    assert sorted(results) == sorted((f"problems-{i}", c) for i in range(len(QUESTIONS)) for c in CONDITIONS)
    problems = {p.id: p for p in study_problems(config)}
    for (problem_id, condition), payload in results.items():
        assert payload["grade"]["reference"] == problems[problem_id].answer
        assert payload["n_tokens"] == len(payload["token_ids"]) > 0
        assert set(payload["fired"]) == {"plain": set(), "seal": {"steering_vector"}, "mask": {"token_mask"},
                                         "tts": {"thinking_token_insertion"}, "rr": {"representation_recycling"}}[condition]
        mi = payload["probes"]["mi"]
        assert len(mi["values"]) == payload["n_tokens"] and len(mi["peak_tokens"]) == len(mi["peaks"])
        assert mi["stats"]["count"] == len(mi["peaks"])
        tensors = load_file(folder / "out" / payload["tensors"])
        assert tensors["graph.steps"].shape[0] == payload["probes"]["graph"]["n_steps"]
        assert tensors["thoughts.states"].shape[0] == len(payload["probes"]["thoughts"]["labels"])
        assert Path(folder / "out" / payload["tensors"]) == tensor_path(folder / "out", condition, problem_id)
    # the blocks acted somewhere (the test is not vacuous)
    for condition in ("seal", "mask", "rr"):
        assert any(any(p["fired"][n] for n in p["fired"]) for (_, c), p in results.items() if c == condition), condition
    tts = [p for (_, c), p in results.items() if c == "tts"]
    assert any(p["fired"]["thinking_token_insertion"] for p in tts)


def test_one_slot_pool_for_every_condition_stores_what_per_condition_batches_store(reference, tmp_path, monkeypatch):
    """The default run (every condition's pairs through one pool of 2 slots, mixed stacks) against
    batches of one condition at a time: the same records, tensors within float32 tolerance."""
    _, _, pooled = reference
    calls = []
    from experiments import runner

    monkeypatch.setattr(runner, "run_pool", lambda *args: calls.append(args) or pytest.fail("pooled"))
    config = load_study_config(write_study(tmp_path))
    batched = by_key(run_study(config, progress=False, continuous=False))
    assert not calls
    assert_same_results(pooled, batched)
    for key in batched:
        ours = load_file(Path(reference[0]) / "out" / pooled[key]["tensors"])
        theirs = load_file(tmp_path / "out" / batched[key]["tensors"])
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert_close(ours[name], theirs[name], precision=torch.float32, path=f"{key} {name}")


def test_one_pool_for_the_study_and_each_record_appended_while_other_rows_still_run(tmp_path, monkeypatch):
    from experiments import runner

    pools, models, saved = [], [], []
    real_pool, real_save = runner.run_pool, runner._save

    def pool(config, pairs, model, on_row=None):
        pools.append(sorted({condition for _, condition in pairs}))
        models.append(model)
        return real_pool(config, pairs, model, on_row=on_row)

    def save(store, problem, condition, row):
        saved.append(models[0]._active_trace is not None)  # the generation is still running
        real_save(store, problem, condition, row)

    monkeypatch.setattr(runner, "run_pool", pool)
    monkeypatch.setattr(runner, "_save", save)
    config = load_study_config(write_study(tmp_path, conditions=["plain", "seal", "mask"]))
    store = run_study(config, progress=False)
    assert pools == [["mask", "plain", "seal"]]  # 15 pairs, one generation through 2 slots
    assert len(saved) == 15 and all(saved)  # every record appended inside the generation, as its row ended
    assert len(list(store.records())) == 15


def test_conditions_whose_draws_depend_on_their_batch_keep_their_own_batches(tmp_path):
    from experiments.runner import poolable

    study = write_study(tmp_path, conditions=["plain", "tts"])
    text = study.read_text().replace("[probes]", '[conditions.rr_released]\nblocks = [{ type = "representation_recycling", '
                                      'layer = 1, coin = "released" }]\n[probes]')
    study.write_text(text)
    config = load_study_config(study)
    model = config.model.load()
    assert [poolable(config, c, model) for c in ("plain", "tts", "rr_released")] == [True, True, False]


def test_a_stopped_run_resumes_and_a_finished_one_does_nothing(reference, tmp_path, monkeypatch):
    _, _, want = reference
    config = load_study_config(write_study(tmp_path))
    problems = study_problems(config)
    run_study(config, problems=problems[:3], progress=False)  # as if stopped after three problems
    assert len(by_key(ResultStore(config.output, config.to_dict()))) == 3 * len(CONDITIONS)
    store = run_study(config, progress=False)
    assert_same_results(by_key(store), want)
    lines = (Path(config.output) / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(want)
    monkeypatch.setattr(ModelSpec, "load", lambda self: pytest.fail("nothing was left to do, yet the model loaded"))
    run_study(config, progress=False)
    assert (Path(config.output) / "results.jsonl").read_text().splitlines() == lines


def test_shards_into_one_folder_equal_one_process(reference, tmp_path):
    _, _, want = reference
    config = load_study_config(write_study(tmp_path))
    run_study(config, shard=(1, 2), progress=False)
    run_study(config, shard=(0, 2), progress=False)
    assert_same_results(by_key(ResultStore(config.output, config.to_dict())), want)


def test_sampled_runs_do_not_depend_on_the_batch_or_the_shard(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sampled = dict(conditions=["plain", "tts"], do_sample=True, temperature=1.5, seed=3)
    one = load_study_config(write_study(tmp_path / "a", **sampled))
    two = load_study_config(write_study(tmp_path / "b", **sampled))
    full = by_key(run_study(one, progress=False))
    run_study(two, shard=(0, 3), progress=False)
    run_study(two, shard=(2, 3), progress=False)
    run_study(two, shard=(1, 3), progress=False)
    assert_same_results(by_key(ResultStore(two.output, two.to_dict())), full)


def test_another_study_in_the_same_folder_is_refused(reference, tmp_path):
    config = load_study_config(write_study(tmp_path, max_new_tokens=12, conditions=["plain"]))
    run_study(config, problems=study_problems(config)[:1], progress=False)
    changed = load_study_config(write_study(tmp_path, max_new_tokens=13, conditions=["plain"]))
    with pytest.raises(ValueError, match="generation"):
        run_study(changed, progress=False)


KILLED_RUN = """
import sys, time
from experiments import runner
from experiments.study_config import load_study_config
real_save = runner._save
def slow_save(*args):  # a row's record, then time for the kill to land while other rows run
    real_save(*args)
    time.sleep(0.3)
runner._save = slow_save
runner.run_study(load_study_config(sys.argv[1]), progress=False)
"""


def test_kill_9_in_the_middle_then_the_same_command_finishes_the_study(reference, tmp_path):
    want = only(reference[2], ["plain", "seal"])
    study = write_study(tmp_path, conditions=["plain", "seal"])
    command = [sys.executable, "-c", KILLED_RUN, str(study)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    results = tmp_path / "out" / "results.jsonl"
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while (not results.exists() or len(results.read_bytes().splitlines()) < 4) and process.poll() is None:
        assert time.monotonic() < deadline, "the study wrote nothing in 5 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    stored = len(results.read_bytes().splitlines())
    assert 4 <= stored < len(want)  # killed in the middle (at most one line cut)
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    config = load_study_config(study)
    assert_same_results(by_key(ResultStore(config.output, config.to_dict())), want)


def test_a_hub_dataset_reads_its_local_copy_offline_and_a_condition_keeps_its_own_token_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    study = write_study(tmp_path, conditions=["plain", "mask"], max_new_tokens=6)
    text = study.read_text().replace('path = "problems.jsonl"', 'hub = "openai/gsm8k"\nsubset = "main"\npath = "problems.jsonl"')
    study.write_text(text.replace("[conditions.mask]\n", "[conditions.mask]\nmax_new_tokens = 2\n"))
    config = load_study_config(study)
    with pytest.warns(UserWarning, match="reading its local copy"):
        problems = study_problems(config)
    assert [p.id for p in problems] == [f"gsm8k-test-{i}" for i in range(len(QUESTIONS))]  # the hub's ids
    store = run_study(config, problems=problems[:2], progress=False)
    lengths = {(r["problem"], r["condition"]): r["payload"]["n_tokens"] for r in store.records()}
    assert all(n <= 2 for (_, condition), n in lengths.items() if condition == "mask")
    assert any(n > 2 for (_, condition), n in lengths.items() if condition == "plain")
