"""The result store: round trip, resume, refusals, repair of a cut last line, and real kills.

The kill and concurrency tests run a worker script in subprocesses. It loads ``experiments/store.py``
alone (not the ``experiments`` package, which imports torch) so that it starts in a tenth of a
second; the folder is created here first (``start_worker``), so the worker never needs ``surgery``
(which writes a new folder's config.json).
"""

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.store import ResultStore, canonical_json, config_hash

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model": "tiny", "max_new_tokens": 8, "conditions": ["baseline", "steered"]}
KEYS = [(f"p{i:02d}", condition) for i in range(12) for condition in ("baseline", "steered")]

WORKER = r"""
import json, os, sys, time
sys.path.insert(0, os.path.join(sys.argv[1], "experiments"))  # store.py alone: no torch to import
from store import ResultStore

folder, mode, keys, config = sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), json.loads(sys.argv[5])
store = ResultStore(folder, config)
done = store.done()
for problem, condition in keys:
    if (problem, condition) in done:
        continue
    if mode == "cut" and len(store.done()) == 3:
        write = os.write

        def write_half_then_hang(handle, data):  # killed in the middle of writing a line
            write(handle, data[: len(data) // 2])
            open(os.path.join(folder, "half-written"), "w").close()
            time.sleep(60)

        os.write = write_half_then_hang
    payload = {"text": f"{problem} under {condition}", "token_ids": [len(problem), len(condition)], "correct": True}
    store.append(problem, condition, payload)
    if mode == "slow":
        time.sleep(0.05)
"""


def start_worker(folder, mode, keys, config=CONFIG):
    if not Path(folder, "config.json").exists():
        ResultStore(folder, config)  # created here: the worker never imports surgery
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    arguments = [str(ROOT), str(folder), mode, json.dumps(keys), json.dumps(config)]
    return subprocess.Popen([sys.executable, "-c", WORKER, *arguments], env=environment)


def run_worker(folder, mode="fast", keys=KEYS):
    process = start_worker(folder, mode, keys)
    assert process.wait(timeout=60) == 0


def wait_until(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def lines(folder):
    return Path(folder, "results.jsonl").read_bytes().split(b"\n")


def payload(key):
    return {"text": f"{key[0]} under {key[1]}", "token_ids": [len(key[0]), len(key[1])], "correct": True}


def test_round_trip(tmp_path):
    store = ResultStore(tmp_path / "study", CONFIG)
    assert store.done() == set() and list(store.records()) == []
    for key in KEYS[:3]:
        store.append(*key, {**payload(key), "pair": (1, 2.5), "stop": None})
    records = list(ResultStore(tmp_path / "study", CONFIG).records())
    assert [(r["problem"], r["condition"]) for r in records] == KEYS[:3]
    assert records[0]["payload"] == {**payload(KEYS[0]), "pair": [1, 2.5], "stop": None}  # tuples come back as lists
    assert {r["config_hash"] for r in records} == {config_hash(CONFIG)}
    assert store.done() == set(KEYS[:3])
    document = json.loads((tmp_path / "study" / "config.json").read_text())
    expected = {"format": "experiments.store", "version": 1, "config": CONFIG, "config_hash": config_hash(CONFIG)}
    assert document == expected
    assert config_hash(CONFIG) == hashlib.sha256(canonical_json(CONFIG).encode()).hexdigest()
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == ["config.json", "results.jsonl", "store.lock"]


def test_resume_with_the_same_config(tmp_path):
    ResultStore(tmp_path, CONFIG).append(*KEYS[0], payload(KEYS[0]))
    same = dict(reversed(list(CONFIG.items())))  # key order does not matter
    store = ResultStore(tmp_path, same)
    assert store.done() == {KEYS[0]}
    store.append(*KEYS[1], payload(KEYS[1]))
    assert [r["payload"] for r in ResultStore(tmp_path, CONFIG).records()] == [payload(KEYS[0]), payload(KEYS[1])]


def test_another_config_is_refused_naming_the_keys_that_differ(tmp_path):
    ResultStore(tmp_path, CONFIG).append(*KEYS[0], payload(KEYS[0]))
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())
    other = {**CONFIG, "max_new_tokens": 16, "seed": 0}
    del other["model"]
    with pytest.raises(ValueError, match="another config") as error:
        ResultStore(tmp_path, other)
    message = str(error.value)
    assert "changed: max_new_tokens" in message and "added: seed" in message and "removed: model" in message
    assert "another folder" in message and "delete" in message
    with pytest.raises(ValueError, match="changed: max_new_tokens"):
        ResultStore(tmp_path, {**CONFIG, "max_new_tokens": 8.0})  # 8.0 is not 8 in JSON
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == before  # nothing written


def test_results_without_a_readable_config_are_refused(tmp_path):
    ResultStore(tmp_path, CONFIG).append(*KEYS[0], payload(KEYS[0]))
    config_json = tmp_path / "config.json"
    text = config_json.read_text()
    config_json.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="config.json is damaged"):
        ResultStore(tmp_path, CONFIG)
    config_json.write_text(text.replace('"tiny"', '"other"'))  # edited by hand: no longer its hash
    with pytest.raises(ValueError, match="does not match its config_hash"):
        ResultStore(tmp_path, CONFIG)
    config_json.write_text(text.replace('"version": 1', '"version": 2'))
    with pytest.raises(ValueError, match="newer version"):
        ResultStore(tmp_path, CONFIG)
    config_json.unlink()
    with pytest.raises(ValueError, match="no config.json"):
        ResultStore(tmp_path, CONFIG)


def test_of_folder_opens_a_study_folder_with_the_config_it_holds(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a study's output folder: it has no config.json"):
        ResultStore.of_folder(tmp_path)
    store = ResultStore(tmp_path, CONFIG)
    store.append(*KEYS[0], payload(KEYS[0]))
    again = ResultStore.of_folder(tmp_path)
    assert again.config_hash == store.config_hash and again.done() == {KEYS[0]}
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="config.json is damaged"):
        ResultStore.of_folder(tmp_path)


def test_a_pair_is_stored_once(tmp_path):
    store = ResultStore(tmp_path, CONFIG)
    store.append(*KEYS[0], payload(KEYS[0]))
    with pytest.raises(ValueError, match="already stored"):
        store.append(*KEYS[0], payload(KEYS[0]))
    other = ResultStore(tmp_path, CONFIG)  # another process's store, opened before the append below
    store.append(*KEYS[1], payload(KEYS[1]))
    with pytest.raises(ValueError, match="already stored"):
        other.append(*KEYS[1], payload(KEYS[1]))  # it reads the lines appended since its last read
    assert other.done() == set(KEYS[:2]) and len(lines(tmp_path)) == 3
    (tmp_path / "results.jsonl").write_bytes(b"".join(line + b"\n" for line in lines(tmp_path)[:2] * 2))
    with pytest.raises(ValueError, match="line 3 stores .* a second time"):
        ResultStore(tmp_path, CONFIG)


def test_a_cut_last_line_is_cut_off_on_open_and_before_an_append(tmp_path):
    store = ResultStore(tmp_path, CONFIG)
    for key in KEYS[:2]:
        store.append(*key, payload(key))
    results = tmp_path / "results.jsonl"
    complete = results.read_bytes()
    with results.open("ab") as file:
        file.write(b'{"condition":"baseline","config_hash":"')  # a writer killed mid-line
    assert ResultStore(tmp_path, CONFIG).done() == set(KEYS[:2])
    assert results.read_bytes() == complete
    with results.open("ab") as file:
        file.write(b'{"condition":"baseline","config_hash":"')  # another worker died mid-line while this store is open
    store.append(*KEYS[2], payload(KEYS[2]))
    assert [(r["problem"], r["condition"]) for r in ResultStore(tmp_path, CONFIG).records()] == KEYS[:3]


def test_a_results_file_cut_short_behind_an_open_store_is_an_error(tmp_path):
    store = ResultStore(tmp_path, CONFIG)
    for key in KEYS[:2]:
        store.append(*key, payload(key))
    (tmp_path / "results.jsonl").write_bytes(lines(tmp_path)[0] + b"\n")
    with pytest.raises(ValueError, match="shrank"):
        store.append(*KEYS[2], payload(KEYS[2]))


def test_a_corrupted_line_in_the_middle_is_an_error_with_its_number(tmp_path):
    store = ResultStore(tmp_path, CONFIG)
    for key in KEYS[:3]:
        store.append(*key, payload(key))
    first, second, third, _ = lines(tmp_path)
    results = tmp_path / "results.jsonl"
    results.write_bytes(first + b"\n" + second[:-5] + b"\n" + third + b"\n")
    with pytest.raises(ValueError, match=r"results.jsonl line 2 is not valid JSON"):
        ResultStore(tmp_path, CONFIG)
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        list(store.records())
    foreign = second.replace(config_hash(CONFIG).encode(), b"0" * 64)
    results.write_bytes(first + b"\n" + foreign + b"\n" + third + b"\n")
    with pytest.raises(ValueError, match="line 2 was written under another config"):
        ResultStore(tmp_path, CONFIG)


def test_nan_and_infinity_are_refused_and_nothing_is_written(tmp_path):
    store = ResultStore(tmp_path, CONFIG)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"payload\['probe'\]\['mi'\]\[1\] is .*NaN and infinity are refused"):
            store.append("p", "c", {"probe": {"mi": [0.5, bad]}})
    with pytest.raises(TypeError, match=r"payload\['ids'\] is a set"):
        store.append("p", "c", {"ids": {1, 2}})
    with pytest.raises(TypeError, match="JSON keys are strings"):
        store.append("p", "c", {"by_layer": {3: 0.1}})
    with pytest.raises(ValueError, match="NaN"):
        ResultStore(tmp_path / "other", {"temperature": float("nan")})
    assert store.done() == set() and (tmp_path / "results.jsonl").read_bytes() == b""
    store.append("p", "c", {"mi": None})
    assert store.done() == {("p", "c")}


def test_appends_wait_for_the_lock(tmp_path):
    ResultStore(tmp_path, CONFIG)
    with open(tmp_path / "store.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        worker = start_worker(tmp_path, "fast", KEYS[:3])
        time.sleep(0.5)
        assert worker.poll() is None and lines(tmp_path) == [b""]  # blocked while the lock is held
    assert worker.wait(timeout=60) == 0 and len(lines(tmp_path)) == 4


def test_a_killed_run_resumes_to_what_an_uninterrupted_run_stores(tmp_path):
    run_worker(tmp_path / "uninterrupted")
    expected = list(ResultStore(tmp_path / "uninterrupted", CONFIG).records())
    assert [(r["problem"], r["condition"]) for r in expected] == KEYS

    worker = start_worker(tmp_path / "killed", "slow", KEYS)
    wait_until(lambda: len(lines(tmp_path / "killed")) > 5)
    os.kill(worker.pid, signal.SIGKILL)
    assert worker.wait(timeout=60) == -signal.SIGKILL
    assert 5 <= len(ResultStore(tmp_path / "killed", CONFIG).done()) < len(KEYS)
    run_worker(tmp_path / "killed")
    assert list(ResultStore(tmp_path / "killed", CONFIG).records()) == expected


def test_a_run_killed_in_the_middle_of_a_line_resumes(tmp_path):
    run_worker(tmp_path / "uninterrupted")
    expected = list(ResultStore(tmp_path / "uninterrupted", CONFIG).records())

    folder = tmp_path / "killed"
    worker = start_worker(folder, "cut", KEYS)
    wait_until(lambda: (folder / "half-written").exists())
    os.kill(worker.pid, signal.SIGKILL)
    assert worker.wait(timeout=60) == -signal.SIGKILL
    cut = lines(folder)
    assert len(cut) == 4 and cut[-1] and not cut[-1].endswith(b"}")  # three lines and half of the fourth
    run_worker(folder)
    assert list(ResultStore(folder, CONFIG).records()) == expected


def test_two_processes_append_disjoint_keys_to_one_store(tmp_path):
    keys = [(f"p{i:03d}", condition) for i in range(150) for condition in ("baseline", "steered")]
    ResultStore(tmp_path, CONFIG)
    workers = [start_worker(tmp_path, "fast", keys[shard::2]) for shard in range(2)]
    assert [worker.wait(timeout=60) for worker in workers] == [0, 0]
    written = lines(tmp_path)
    assert written[-1] == b"" and len(written) == len(keys) + 1
    records = [json.loads(line) for line in written[:-1]]  # every line well-formed
    assert sorted((r["problem"], r["condition"]) for r in records) == sorted(keys)
    assert all(r["payload"] == payload((r["problem"], r["condition"])) for r in records)
    assert ResultStore(tmp_path, CONFIG).done() == set(keys)
