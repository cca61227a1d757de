"""The `surgery` command: `run` checks the study before any model loads, runs it, resumes it, and
ends with the per-condition table; `--help` reads well."""

import json
import subprocess
import sys

from test_runner import QUESTIONS, write_study

from experiments.cli import main


def test_run_prints_the_table_and_a_rerun_has_nothing_left_to_do(tmp_path, capsys):
    study = write_study(tmp_path, conditions=["plain", "mask"])
    assert main(["run", str(study), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert "results in" in printed and any(line.startswith("plain") for line in lines)
    mask = next(line for line in lines if line.startswith("mask"))
    assert f"{len(QUESTIONS):>5}" in mask
    results = (tmp_path / "out" / "results.jsonl").read_text()
    assert main(["run", str(study), "--no-progress"]) == 0
    assert (tmp_path / "out" / "results.jsonl").read_text() == results  # nothing done twice
    assert capsys.readouterr().out.splitlines()[-2:] == lines[-2:]


def test_a_bad_study_is_an_error_naming_the_field_before_any_model_loads(tmp_path, capsys, monkeypatch):
    study = write_study(tmp_path, conditions=["plain"])
    study.write_text(study.read_text().replace("max_new_tokens", "max_new_token"))
    monkeypatch.setattr("surgery.load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    assert main(["run", str(study)]) == 2
    error = capsys.readouterr().err
    assert "generation.max_new_token" in error and "max_new_tokens" in error


def test_help_names_the_commands():
    printed = subprocess.run([sys.executable, "-m", "experiments.cli", "--help"], capture_output=True, text=True,
                             check=True).stdout
    assert "run" in printed and "demo" in printed and "resumable" in printed
    printed = subprocess.run([sys.executable, "-m", "experiments.cli", "run", "--help"], capture_output=True,
                             text=True, check=True).stdout
    assert "TOML" in printed and "--no-progress" in printed
    assert all(option in printed for option in ("--check", "--random-weights", "--limit", "--max-new-tokens", "--dataset",
                                                "--output"))


def test_check_loads_no_model_and_says_what_it_checked(tmp_path, capsys, monkeypatch):
    study = write_study(tmp_path, conditions=["plain", "seal"])
    monkeypatch.setattr("surgery.load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    assert main(["run", str(study), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "every field, block, site and layer checked" in printed and "5 problems read" in printed
    assert "condition  seal: steering_vector (site 'resid_pre.1', alpha 1.0); 12 new tokens at most" in printed
    assert f"OK: {study} is ready" in printed and not (tmp_path / "out").exists()  # nothing written
    study.write_text(study.read_text().replace("batch_size = 2", "batch_size = 0"))
    assert main(["run", str(study), "--check"]) == 1
    error = capsys.readouterr().err
    assert "surgery run --check: generation.batch_size: must be at least 1, got 0" in error and "1 error(s)" in error


def test_limit_tokens_and_output_shrink_a_run(tmp_path, capsys):
    study = write_study(tmp_path, conditions=["plain"])
    elsewhere = tmp_path / "elsewhere"
    assert main(["run", str(study), "--no-progress", "--limit", "2", "--max-new-tokens", "3", "--output", str(elsewhere)]) == 0
    records = [json.loads(line) for line in (elsewhere / "results.jsonl").read_text().splitlines()]
    assert [r["problem"] for r in records] == ["problems-0", "problems-1"]
    assert all(len(r["payload"]["token_ids"]) <= 3 for r in records) and not (tmp_path / "out").exists()
    assert main(["run", str(study), "--check", "--random-weights"]) == 1  # the tiny study has no [model] config
    assert "model: random weights need the model's config and a local tokenizer" in capsys.readouterr().err
