"""run_study_on_ray: two Ray actors on a local cluster store what one process stores, greedy and
sampled, each (problem, condition) once, also when a failed worker (named) stopped the run and a
rerun finished it; without Ray, a clear message.

One local Ray cluster (2 CPUs) for the module: starting one takes about ten seconds here."""

import logging
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_runner import QUESTIONS, assert_same_results, by_key, write_study
from tolerance import assert_close

from experiments.cli import main
from experiments.runner import run_study
from experiments.store import ResultStore
from experiments.study_config import load_study_config
from experiments.workers import run_study_on_ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


def one_and_two_workers(folder, **study):
    """The same study written to ``folder/one`` and ``folder/two``; the results of one process in
    ``one/out``, and the two configs (run ``two`` as the test needs)."""
    (folder / "one").mkdir()
    (folder / "two").mkdir()
    one = load_study_config(write_study(folder / "one", **study))
    two = load_study_config(write_study(folder / "two", **study))
    return by_key(run_study(one, progress=False)), two


def assert_same_records(got: dict, want: dict, got_folder, want_folder) -> None:
    """Every field of every record equal (the wall time aside; floats within float32 tolerance, since
    each worker runs on one thread and the single process on two), and the sidecar tensors too."""
    assert_same_results(got, want)
    for key in want:
        a, b = dict(got[key]), dict(want[key])
        for payload in (a, b):
            payload.pop("seconds")
            payload["probes"] = {name: dict(summary) for name, summary in payload["probes"].items()}
        mi = a["probes"]["mi"].pop("stats"), b["probes"]["mi"].pop("stats")
        assert mi[0].keys() == mi[1].keys()
        for stat in mi[1]:
            if isinstance(mi[1][stat], float):
                assert_close(torch.tensor(mi[0][stat]), torch.tensor(mi[1][stat]), precision=torch.float32)
            else:
                assert mi[0][stat] == mi[1][stat], (key, stat)
        a["probes"]["mi"].pop("values"), b["probes"]["mi"].pop("values")  # compared by assert_same_results
        assert a == b, key
        tensors = load_file(got_folder / a["tensors"]), load_file(want_folder / b["tensors"])
        assert tensors[0].keys() == tensors[1].keys()
        for name in tensors[1]:
            assert_close(tensors[0][name], tensors[1][name], precision=torch.float32)


GREEDY = ["plain", "seal", "tts"]  # a vector file read by every worker, and inserted tokens


@pytest.fixture(scope="module")
def greedy(ray_cluster, tmp_path_factory):
    """A greedy study run by one process, and by two workers until worker 1 fails on its last row
    (the tensors of problem 3 under the last condition cannot be written: a folder is in the way),
    then finished by a rerun on three workers (more than the cluster's two CPUs: the third waits
    for the first to finish): (the workers' results, one process's, folder, config)."""
    folder = tmp_path_factory.mktemp("greedy")
    want, config = one_and_two_workers(folder, conditions=GREEDY)
    blocked = Path(config.output) / "tensors" / GREEDY[-1] / "problems-3.safetensors"
    blocked.mkdir(parents=True)
    with pytest.raises(RuntimeError, match=r"worker 1 of 2 .*failed.*run the same command again to resume"):
        run_study_on_ray(config, workers=2, progress=False)
    stored = by_key(ResultStore(config.output, config.to_dict()))
    assert ("problems-1", "plain") in stored and ("problems-3", GREEDY[-1]) not in stored
    deadline = time.monotonic() + 30
    while ray_cluster.available_resources().get("CPU", 0) < 2:  # both actors were killed: their CPUs are free
        assert time.monotonic() < deadline, ray_cluster.available_resources()
        time.sleep(0.1)
    blocked.rmdir()
    got = by_key(run_study_on_ray(config, workers=3, progress=False))  # the rerun does only what is missing
    return got, want, folder, config


@pytest.mark.slow
def test_two_workers_store_what_one_process_stores_also_after_a_failure(ray_cluster, greedy, monkeypatch):
    got, want, folder, config = greedy
    assert sorted(got) == sorted((f"problems-{i}", c) for i in range(len(QUESTIONS)) for c in GREEDY)
    lines = (folder / "two" / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(got)  # each (problem, condition) exactly once
    assert_same_records(got, want, folder / "two" / "out", folder / "one" / "out")
    assert ray_cluster.is_initialized()  # a Ray session it did not start is left running
    monkeypatch.setattr(ray_cluster, "remote", lambda *a, **k: pytest.fail("a worker started with nothing to do"))
    assert by_key(run_study_on_ray(config, workers=2, progress=False)) == got


@pytest.mark.slow
def test_two_workers_sample_what_one_process_samples_from_the_command(ray_cluster, greedy, tmp_path, monkeypatch):
    want, config = one_and_two_workers(tmp_path, conditions=["plain", "tts"], do_sample=True, temperature=1.5, seed=3)
    # as from a shell: no Ray session yet, so the command starts one and shuts it down (here the
    # module's cluster stands in for the new one: one start per module)
    calls, first = [], iter([False])
    monkeypatch.setattr(ray_cluster, "is_initialized", lambda: next(first, True))  # Ray asks it too
    monkeypatch.setattr(ray_cluster, "init", lambda **options: calls.append(("init", options)))
    monkeypatch.setattr(ray_cluster, "shutdown", lambda: calls.append(("shutdown", {})))
    assert main(["run", config.source, "--workers", "2", "--no-progress"]) == 0
    assert [name for name, _ in calls] == ["init", "shutdown"] and calls[0][1]["address"] is None
    got = by_key(ResultStore(config.output, config.to_dict()))
    assert len((tmp_path / "two" / "out" / "results.jsonl").read_text().splitlines()) == len(got) == 2 * len(QUESTIONS)
    assert_same_records(got, want, tmp_path / "two" / "out", tmp_path / "one" / "out")
    plain = [key for key in got if key[1] == "plain"]
    assert any(got[key]["token_ids"] != greedy[1][key]["token_ids"] for key in plain)  # it did sample


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return write_study(tmp_path_factory.mktemp("study"), conditions=["plain"])


def test_without_ray_the_error_says_how_to_install_it(study, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[study\]'"):
        run_study_on_ray(load_study_config(study), workers=2, progress=False)
    assert main(["run", str(study), "--workers", "2", "--no-progress"]) == 2
    assert "[study]" in capsys.readouterr().err
    calls = []

    def run_study(config, **options):
        calls.append(options)
        return ResultStore(config.output, config.to_dict())

    monkeypatch.setattr("experiments.workers.run_study", run_study)
    run_study_on_ray(load_study_config(study), workers=1, progress=False)  # one worker: this process, no Ray
    assert calls == [{"progress": False}]


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_workers_must_be_a_whole_number_from_1(study, workers):
    error = ValueError if isinstance(workers, int) and not isinstance(workers, bool) else TypeError
    with pytest.raises(error, match="workers"):  # ours, or for a wrong type the test run's type checker
        run_study_on_ray(load_study_config(study), workers=workers)


@pytest.mark.parametrize("workers", ["0", "-2", "two"])
def test_the_command_refuses_bad_worker_counts(study, capsys, workers):
    with pytest.raises(SystemExit) as exit:
        main(["run", str(study), "--workers", workers])
    assert exit.value.code == 2
    assert "--workers" in capsys.readouterr().err


def test_the_command_help_names_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "--workers N" in printed and "--ray-address ADDR" in printed and "pip install -e '.[study]'" in printed
