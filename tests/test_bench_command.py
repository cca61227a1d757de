"""surgery bench: finds the benchmarks of the checkout, runs the named ones in their own processes
with the extra arguments, reports the first failure, and names the known ones on a typo."""

import pytest

from experiments.bench_command import BENCHMARKS_FOLDER, benchmark_scripts, run_benchmarks
from experiments.cli import main


def test_the_checkout_benchmarks_are_found_by_name():
    scripts = benchmark_scripts()
    assert {"engine", "interventions", "kernels", "mi", "graph", "backends", "closed_loop"} <= set(scripts)
    assert scripts["engine"] == BENCHMARKS_FOLDER / "bench_engine.py"


def test_named_benchmarks_run_with_the_extra_arguments_and_a_failure_is_reported(tmp_path, capfd):
    (tmp_path / "bench_echo.py").write_text("import sys\nprint('echo got', sys.argv[1:])\n")
    (tmp_path / "bench_fails.py").write_text("raise SystemExit(3)\n")
    (tmp_path / "helper.py").write_text("raise SystemExit('not a benchmark')\n")
    assert list(benchmark_scripts(tmp_path)) == ["echo", "fails"]
    assert run_benchmarks(["echo"], ["--reps", "2"], folder=tmp_path) == 0
    assert "echo got ['--reps', '2']" in capfd.readouterr().out
    assert run_benchmarks([], [], folder=tmp_path) == 3  # all of them; the failure's status
    with pytest.raises(ValueError, match="no benchmark named 'eco'; there are: echo, fails"):
        run_benchmarks(["eco"], folder=tmp_path)
    with pytest.raises(FileNotFoundError, match="source checkout"):
        benchmark_scripts(tmp_path / "missing")


def test_the_command_lists_and_refuses_unknown_names(capsys):
    assert main(["bench", "--list"]) == 0
    assert "kernels" in capsys.readouterr().out
    assert main(["bench", "no-such-bench"]) == 2
    assert "no benchmark named 'no-such-bench'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "study.toml", "--", "--reps", "2"])
    assert "for `surgery bench` only" in capsys.readouterr().err
