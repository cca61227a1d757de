"""The replication studies under studies/replications/: every one passes `surgery run --check`, and
every one runs end to end offline (random weights of the paper model's config, the real R1-Distill
tokenizer, 2 problems, 4 tokens) through `surgery run` itself, into a temporary folder; --check's
errors name the field and the fix."""

import json
from pathlib import Path

import pytest
import torch

from experiments.cli import main
from experiments.store import ResultStore
from interventions import SteeringVector
from interventions.released_ttts import RELEASED_TTTS_WORDS

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "studies" / "replications"
SHARED = ROOT.parent / "shared" / "data"
MATH500 = SHARED / "math500" / "test.jsonl"
ALL = sorted(path.name for path in STUDIES.glob("*.toml"))
# the ones run end to end on their own (seal-math-train-traces runs inside seal-math500, by its recipe)
SMOKE = [name for name in ALL if name != "seal-math-train-traces.toml"]
OFFLINE = ["--random-weights", "--limit", "2", "--max-new-tokens", "4", "--no-progress"]

pytestmark = pytest.mark.skipif(not (SHARED / "r1-distill-qwen-tokenizer").is_dir(),
                                reason="needs ../shared/data beside the checkout (the real tokenizer, MATH500, GSM8K)")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on the development machines, without the network probe


def test_the_studies_are_the_ones_the_docs_name():
    assert {"seal-math500.toml", "seal-math-train-traces.toml", "mi-peaks.toml", "rr-aime24.toml", "ttts.toml",
            "reasoning-graphs.toml"} <= set(ALL)
    readme = (STUDIES / "README.md").read_text()
    assert all(name in readme for name in ALL)


@pytest.mark.parametrize("name", ALL)
def test_every_study_passes_check(name, capsys):
    assert main(["run", str(STUDIES / name), "--check"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "every field, block, site and layer checked" in printed and f"OK: {STUDIES / name}" in printed
    head = (STUDIES / name).read_text().split("\nname = ")[0]
    assert "Target" in head and "Released settings" in head and "cannot match exactly" in head  # the header says it


def test_check_says_what_it_checked_for_seal(capsys):
    assert main(["run", str(STUDIES / "seal-math500.toml"), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "qwen2, 28 blocks, d_model 1536, vocabulary 151936" in printed
    assert "widths divided by 12: d_model 128, 1 head(s)" in printed
    assert "151665 entries, chat template" in printed and "500 problems read" in printed
    # the released prompt: one BOS, the system message, the user turn, the generation prompt
    assert "'<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Answer the following questions." in printed
    assert "steering_vector (site 'resid_pre.20', alpha 1.0)" in printed
    assert "first 500 correct + first 500 incorrect rows of seal-math-train-traces.toml" in printed
    assert "  | dataset    DigitalLearningGmbH/MATH-lighteval (train) from the hub" in printed  # the traces study, checked


def test_check_says_when_a_tokenizer_is_a_substitute(capsys):
    assert main(["run", str(STUDIES / "rr-aime24.toml"), "--check"]) == 0
    assert "NOT this model's tokenizer (151665 entries > its vocabulary of 128256)" in capsys.readouterr().out


def copy_study(name: str, folder: Path, *replacements: tuple[str, str]) -> Path:
    """A copy of a study in ``folder``, its relative paths made absolute, with ``replacements``."""
    text = (STUDIES / name).read_text()
    for relative in ('"models/', '"../../../shared/', '"data/', '"seal-math-train-traces.toml"'):
        text = text.replace(relative, f'"{STUDIES}/{relative[1:]}')
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path = folder / name
    path.write_text(text)
    return path


# (study, (old, new), the field named, words of the fix), each checked without any weights
BAD = {
    "layer out of range": ("seal-math500.toml", ("layer = 20, correct", "layer = 40, correct"),
                           "conditions.seal.blocks[0].extract.layer", "has 28 blocks, so the block index must be in 0..27"),
    "probe site out of range": ("seal-math500.toml", ('site = "resid_pre.20"', 'site = "resid_pre.28"'),
                                "probes.thoughts.site", "has 28 blocks"),
    "missing dataset": ("reasoning-graphs.toml", [('hub = "openai/gsm8k"\n', ""), ("gsm8k/test.jsonl", "gsm8k/tset.jsonl")],
                        "dataset.path", "tset.jsonl (paths start from the TOML file's folder)"),
    "bad hub name": ("seal-math500.toml", ('hub = "HuggingFaceH4/MATH-500"', 'hub = "MATH-500"'), "dataset.hub",
                     "write owner/name"),
    "shrink that does not divide": ("mi-peaks.toml", ("smoke_shrink = 32", "smoke_shrink = 5"), "model.smoke_shrink",
                                    "divide by 1, 2, 4, 8, 16, 32"),
    "missing config": ("ttts.toml", ("deepseek-r1-distill-llama-8b/config.json", "no-such-model/config.json"),
                       "model.config", "no model config at"),
    "traces study runs another model": ("seal-math500.toml", ('dtype = "float32"', 'dtype = "bfloat16"'),
                                        "conditions.seal.blocks[0].extract.study", "runs another model"),
    "from and extract": ("seal-math500.toml", ("alpha = 1.0\n", 'alpha = 1.0\nfrom = "x.safetensors"\n'),
                         "conditions.seal.blocks[0].from", "not both"),
    "unknown recipe key": ("seal-math500.toml", ("correct = 500,", "corect = 500,"), "conditions.seal.blocks[0].extract.corect",
                           "Did you mean 'correct'?"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_check_errors_name_the_field_and_the_fix(case, tmp_path, capsys):
    name, replacements, field, fix = BAD[case]
    replacements = replacements if isinstance(replacements, list) else [replacements]
    assert main(["run", str(copy_study(name, tmp_path, *replacements)), "--check"]) == 1
    error = capsys.readouterr().err
    assert f"surgery run --check: {field}: " in error and fix in error, error


def test_an_offline_check_needs_the_local_copy_of_a_hub_dataset(tmp_path, capsys):
    study = str(STUDIES / "mi-peaks.toml")
    assert main(["run", study, "--check"]) == 0  # with a hub, MATH train is downloaded
    assert "so the run needs the hub" in capsys.readouterr().out
    assert main(["run", study, "--check", "--random-weights"]) == 1  # offline: no local copy of MATH train
    error = capsys.readouterr().err
    assert "dataset.path: a --random-weights run is offline and its local copy" in error and "--dataset FILE" in error
    assert main(["run", study, "--check", "--random-weights", "--dataset", str(MATH500)]) == 0


def run_offline(name: str, output: Path, *extra: str) -> str:
    args = ["run", str(STUDIES / name), *OFFLINE, "--output", str(output), "--dataset", str(MATH500), *extra]
    assert main(args) == 0
    return (output / "results.jsonl").read_text()


def rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_seal_runs_offline_with_its_vector_made_first(tmp_path, capsys):
    real = ROOT / "runs" / "replications" / "seal-math-train-traces"
    existed = real.exists()
    out = tmp_path / "seal"
    run_offline("seal-math500.toml", out)
    printed = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in printed and "making conditions.seal.blocks[0]'s vector" in printed
    records = rows(out)
    assert sorted((r["condition"], r["problem"]) for r in records) == [
        (c, f"test-{i}") for c in ("plain", "seal") for i in (0, 1)]  # --dataset: ids from that file
    assert all(len(r["payload"]["token_ids"]) == 4 for r in records)
    traces = out / "recipes" / "seal-math-train-traces"  # the traces study ran first, into this run's folder
    assert len(rows(traces)) == 2
    vector = SteeringVector.load(traces / "vector-layer20-correct500-incorrect500.safetensors")
    assert vector.config.site == "resid_pre.20" and vector.vector.shape == (128,)  # the shrunk width
    assert vector.metadata["source"]["used"] == {"correct": 0, "incorrect": 2}  # a random model solves nothing
    config = json.loads((out / "config.json").read_text())["config"]
    seal = config["conditions"]["seal"][0]
    assert seal["from"] == str(traces / "vector-layer20-correct500-incorrect500.safetensors") and seal["from_sha256"]
    assert config["model"]["random_weights"] is True and config["model"]["smoke_shrink"] == 12
    assert real.exists() == existed  # a smoke run never writes into the real traces folder
    # rerun: nothing left to do, the vector is not made again
    before = (out / "results.jsonl").read_text()
    assert run_offline("seal-math500.toml", out) == before
    assert "making" not in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in SMOKE if name != "seal-math500.toml"])
def test_every_other_study_runs_offline(name, tmp_path):
    out = tmp_path / "out"
    run_offline(name, out, *(["--limit", "1", "--max-new-tokens", "2"] if name == "ttts.toml" else []))  # 19 conditions
    store = ResultStore.of_folder(out)
    conditions = list(store.config["conditions"])
    records = list(store.records())
    assert len(records) == (1 if name == "ttts.toml" else 2) * len(conditions)
    assert all(0 < len(r["payload"]["token_ids"]) <= 4 for r in records)
    assert store.config["model"]["random_weights"] is True
    if "mi_estimator" in json.dumps(store.config["probes"]):
        spec = next(iter(store.config["probes"].values()))
        mi = spec["config"]
        assert (mi["peak_rule"], mi["top_k"], mi["precision"]) == ("top_k", 20, "float32")
        assert (mi["ratio_steps"], spec["answers_from"]) == ("released_total_tokens", "solution")
    if "reasoning_graph" in json.dumps(store.config["probes"]):
        assert next(iter(store.config["probes"].values()))["config"]["steps"] == "released"
    if name == "rr-aime24.toml":
        assert store.config["conditions"]["rr"][0]["config"]["coin"] == "released"
    if name == "ttts.toml":  # the released passes, each capped by --max-new-tokens, their texts kept
        passes = [r["payload"]["released_ttts"] for r in records if r["condition"].startswith("tts_")]
        assert len(passes) == 18 and {p["word"] for p in passes} == set(RELEASED_TTTS_WORDS)
        assert all(p["first_tokens"] <= 2 and p["answer_tokens"] <= 2 for p in passes)
        assert all("released_ttts" not in r["payload"] for r in records if r["condition"] == "plain")
    assert (out / "report.html").is_file()


def test_the_llama_studies_build_a_random_model_on_a_substitute_tokenizer():
    from experiments.run_overrides import RunOverrides
    from experiments.study_config import load_study_config

    config = load_study_config(STUDIES / "rr-aime24.toml", RunOverrides(random_weights=True, dataset=str(MATH500)))
    assert config.output.endswith("rr-aime24-random-weights")  # never the real run's folder
    with pytest.warns(UserWarning, match="it is not this model's tokenizer"):
        model = config.model.load()
    # the exact depth; one head of 128; the vocabulary widened from 128,256 to the substitute's entries
    assert (model.n_layers, model.d_model, model.vocab_size) == (32, 128, 151665)
    assert model.architecture.name == "llama" and model.dtype == torch.float32 and "random weights" in model.name
    assert model.module.config.eos_token_id == model.tokenizer.eos_token_id == 151643  # the substitute's ids


def test_the_readme_names_every_replication_study_and_how_to_check_it():
    readme = (STUDIES.parents[1] / "README.md").read_text()
    section = readme.split("## Reproducing the papers")[1].split("\n## ")[0]
    for path in ALL:
        assert Path(path).stem.removesuffix("-base").removesuffix("-qwen-7b").removesuffix("-qwen-14b") in section, path
    assert "--check" in section and "--random-weights --limit 2 --max-new-tokens 8" in section
