"""The `surgery` command: `run` checks the study before any model loads, runs it, resumes it, and
ends with the per-condition table; `--help` reads well."""

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
