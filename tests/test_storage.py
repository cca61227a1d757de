"""The one file format: what is written comes back, and nothing else is read (no pickle, ever)."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from surgery.files import storage


class Tripwire:
    """Unpickling this writes a file: proof that a reader unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_round_trip_and_atomic_write(tmp_path):
    tensors = {"a": torch.arange(6).reshape(2, 3), "b": torch.zeros(0, 4), "c": torch.tensor([True, False])}
    path = storage.write(tmp_path / "deep" / "x.safetensors", "surgery.test", 1, {"k": [1, "two", None]}, tensors)
    document, back = storage.read(path, "surgery.test", 1)
    assert document == {"k": [1, "two", None]}
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]  # no staging file left


def test_an_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = storage.write(tmp_path / "x.safetensors", "surgery.test", 1, {"v": 1}, {})

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        storage.write(path, "surgery.test", 1, {"v": 2}, {})
    assert storage.read(path, "surgery.test", 1)[0] == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickled_files_are_refused_without_being_unpickled(tmp_path, how):
    marker, path = tmp_path / "unpickled", tmp_path / "evil.safetensors"
    payload = {"format": "surgery.test", "x": Tripwire(marker)}
    if how == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    pickle.loads(pickle.dumps(Tripwire(tmp_path / "control")))  # the tripwire works
    assert (tmp_path / "control").exists()
    with pytest.raises(ValueError, match="never unpickles"):
        storage.read(path, "surgery.test", 1)
    assert not marker.exists()


def test_truncated_foreign_newer_and_other_kinds_are_clear_errors(tmp_path):
    path = storage.write(tmp_path / "x.safetensors", "surgery.test", 1, {"v": 1}, {"t": torch.ones(100)})
    data = path.read_bytes()
    for cut in (len(data) - 10, 20, 4):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated|not a safetensors file"):
            storage.read(tmp_path / "cut.safetensors", "surgery.test", 1)
    save_file({"w": torch.ones(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="not a surgery file"):
        storage.read(tmp_path / "weights.safetensors", "surgery.test", 1)
    storage.write(tmp_path / "new.safetensors", "surgery.test", 7, {}, {})
    with pytest.raises(ValueError, match="newer version of surgery .*version 7; this version reads up to 1"):
        storage.read(tmp_path / "new.safetensors", "surgery.test", 1)
    with pytest.raises(ValueError, match="holds a surgery.test file, not a surgery.other file"):
        storage.read(path, "surgery.other", 1)
    (tmp_path / "text.safetensors").write_text(json.dumps({"not": "ours"}))
    with pytest.raises(ValueError, match="not a readable surgery file"):
        storage.read(tmp_path / "text.safetensors", "surgery.test", 1)
    with pytest.raises(FileNotFoundError):
        storage.read(tmp_path / "missing.safetensors", "surgery.test", 1)
