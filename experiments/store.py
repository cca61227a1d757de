"""A study's results on disk, one JSON line per (problem id, condition), that survive ``kill -9``.

A study runs problems x conditions; :class:`ResultStore` keeps what finished in a folder::

    folder/
      config.json     {"config": {...}, "config_hash": "<sha256>", "format": "experiments.store", "version": 1}
      results.jsonl   {"condition": "baseline", "config_hash": "<sha256>", "payload": {...}, "problem": "gsm8k-test-0"}
      store.lock      empty; appends take an exclusive flock on it

``config.json`` holds the study's config (canonical JSON: keys sorted) and its hash, the sha256 of
the compact canonical JSON (:func:`config_hash`). Reopening the folder with the same config resumes
(``done()`` says what to skip); another config is refused, naming the top-level keys that differ:
results of two configs are never mixed.

Each record is one line, written with a single ``write`` of the whole line and its newline, then
``os.fsync``: a process killed at any moment leaves complete lines and at most one cut last line,
which the next open (or append) cuts off, so that record simply runs again. A complete line in the
middle that is not valid JSON is real corruption: an error with its line number.

Several processes (Ray workers, one per shard) may append to one store: each append, and each
repair of a cut tail, holds an exclusive ``fcntl.flock`` on ``store.lock``, so lines never
interleave, and a new line is checked against every line appended before it (each store reads
only the bytes added since its last read). The folder must be on a file system where ``flock``
works between the processes (a local disk; not every network file system).

Payloads are the runner's (texts, token ids, stop reasons, grades, probe summaries): dicts of JSON
values. NaN and infinity are refused, not encoded (JSON has no such numbers): store ``None`` or a
string instead. Tuples come back as lists.

Example:
    >>> import tempfile
    >>> config = {"model": "SmolLM2-135M-Instruct", "max_new_tokens": 64}
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     ResultStore(folder, config).append("gsm8k-test-0", "baseline", {"text": "56", "correct": True})
    ...     store = ResultStore(folder, config)  # a rerun: resumes
    ...     store.done(), [record["payload"] for record in store.records()]
    ({('gsm8k-test-0', 'baseline')}, [{'correct': True, 'text': '56'}])
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["ResultStore", "canonical_json", "config_hash"]


def canonical_json(value: object) -> str:
    """``value`` as compact JSON with sorted keys: equal values give equal text.

    Raises:
        ValueError: a NaN or an infinity anywhere in ``value`` (named by its path).
        TypeError: something JSON cannot hold (a tensor, a numpy integer, a set, a non-string key).

    Example:
        >>> canonical_json({"b": [1, 2.5], "a": None})
        '{"a":null,"b":[1,2.5]}'
    """
    _check_json(value, "value")
    return _dumps(value)


def config_hash(config: dict) -> str:
    """The sha256 (hex) of the canonical JSON of ``config``: what ties each record to its study.

    Example:
        >>> config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
        True
    """
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


class ResultStore:
    """The results of one study (one config) in ``folder``; see the module docstring.

    Args:
        folder: created when missing. A new folder gets ``config.json``; a folder of the same
            config resumes.
        config: the study's config, JSON values only (it is hashed; tuples count as lists).

    Raises:
        ValueError: the folder holds another config (the message names the top-level keys that
            differ), results without a readable ``config.json``, or corrupted results (the
            message names the line).
    """

    FORMAT = "experiments.store"
    VERSION = 1

    @classmethod
    def of_folder(cls, folder: str | os.PathLike) -> ResultStore:
        """The store of an existing study folder, opened with the config its ``config.json`` holds
        (what reading tools use: the report, vector extraction).

        Raises:
            FileNotFoundError: no ``config.json`` in ``folder`` (not a study's output folder).
            ValueError: a damaged ``config.json`` or results file.
        """
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a study's output folder: it has no config.json "
                                    "(run `surgery run` first)")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))["config"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is damaged ({error!r}): it cannot say which study wrote the results") from None
        return cls(folder, config)  # checks the config's hash and every record

    def __init__(self, folder: str | os.PathLike, config: dict) -> None:
        self.folder = Path(folder)
        self.config: dict = json.loads(canonical_json(config))
        self.config_hash = config_hash(config)
        self.config_path = self.folder / "config.json"
        self.results_path = self.folder / "results.jsonl"
        self.lock_path = self.folder / "store.lock"
        self._done: set[tuple[str, str]] = set()
        self._offset = 0  # bytes of results.jsonl read so far: complete lines only
        self._lines = 0  # lines read so far, for the line numbers of errors
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._open_config()
            with self.results_path.open("ab"):
                pass
            self._catch_up()

    def done(self) -> set[tuple[str, str]]:
        """The ``(problem id, condition)`` pairs stored so far, by any process: the ones to skip."""
        with self._locked():
            self._catch_up()
        return set(self._done)

    def append(self, problem_id: str, condition: str, payload: dict) -> None:
        """Store the result of ``problem_id`` under ``condition``: one line, on disk when this returns.

        Raises:
            ValueError: the pair is already stored (a record is written once: skip ``done()``),
                an id or condition is empty, or the payload holds NaN or infinity.
            TypeError: the payload holds something JSON cannot hold (the message names where).
        """
        key = (problem_id, condition)
        if not (isinstance(problem_id, str) and problem_id and isinstance(condition, str) and condition):
            raise ValueError(f"a record needs a non-empty problem id and condition, got {key!r}")
        if not isinstance(payload, dict):
            raise TypeError(f"the payload of {key!r} must be a dict, got {type(payload).__name__}")
        _check_json(payload, "payload")
        record = {"config_hash": self.config_hash, "problem": problem_id, "condition": condition, "payload": payload}
        line = (_dumps(record) + "\n").encode("utf-8")
        with self._locked():
            self._catch_up()
            if key in self._done:
                raise ValueError(
                    f"{key!r} is already stored in {self.results_path}: a record is appended once "
                    "(skip the pairs in done())"
                )
            handle = os.open(self.results_path, os.O_WRONLY | os.O_APPEND)
            try:
                written = os.write(handle, line)  # one write: the whole line or (killed) a cut tail
                if written != len(line):
                    os.ftruncate(handle, self._offset)
                    raise OSError(
                        f"only {written} of {len(line)} bytes of {key!r} reached {self.results_path} "
                        "(disk full?); the cut line was removed"
                    )
                os.fsync(handle)
            finally:
                os.close(handle)
            self._offset += len(line)
            self._lines += 1
            self._done.add(key)

    def records(self) -> Iterator[dict]:
        """The complete records in file order, each ``{"condition", "config_hash", "payload", "problem"}``.

        Reads without the lock: a line another process is writing now is not complete yet, and is
        left out.

        Raises:
            ValueError: a corrupted line (named by its number).
        """
        with self.results_path.open("rb") as file:
            for number, line in enumerate(file, start=1):
                if not line.endswith(b"\n"):
                    return
                yield self._parse(line, number)

    def _open_config(self) -> None:
        """Write ``config.json`` in a new folder, or check that the folder's is this store's config."""
        if not self.config_path.exists():
            if self.results_path.exists() and self.results_path.stat().st_size > 0:
                raise ValueError(
                    f"{self.folder} holds {self.results_path.name} but no {self.config_path.name}: nothing says "
                    "which study wrote those results, so they cannot be resumed. Restore config.json, or "
                    "delete the folder (or use another) to start over."
                )
            from surgery.files.storage import atomic_path

            document = {"format": self.FORMAT, "version": self.VERSION, "config_hash": self.config_hash,
                        "config": self.config}
            with atomic_path(self.config_path) as staging:
                staging.write_text(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            return
        stored = self._read_config()
        if stored["config_hash"] != self.config_hash:
            raise ValueError(
                f"{self.folder} holds the results of another config ({_difference(stored['config'], self.config)}; "
                f"hash {stored['config_hash'][:12]} there, {self.config_hash[:12]} here). Results of two "
                f"configs are never mixed: write this study to another folder, or delete {self.folder} to "
                "start over (its results are lost)."
            )

    def _read_config(self) -> dict:
        """The folder's ``config.json``, checked: a clear error when it is damaged or newer."""

        def damaged(why: str) -> ValueError:
            return ValueError(
                f"{self.config_path} is damaged ({why}): it cannot say which study wrote {self.results_path.name}. "
                f"Restore it, or delete {self.folder} to start over."
            )

        try:
            document = json.loads(self.config_path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise damaged(f"not JSON: {error}") from None
        if not isinstance(document, dict) or document.get("format") != self.FORMAT:
            raise damaged(f"not a {self.FORMAT} config")
        version = document.get("version")
        if not isinstance(version, int):
            raise damaged("no format version")
        if version > self.VERSION:
            raise ValueError(
                f"{self.config_path} was written by a newer version of experiments ({self.FORMAT} format version "
                f"{version}; this one reads up to {self.VERSION}): upgrade to resume it"
            )
        config, stored_hash = document.get("config"), document.get("config_hash")
        if not isinstance(config, dict) or not isinstance(stored_hash, str):
            raise damaged("no config or no config_hash")
        if config_hash(config) != stored_hash:
            raise damaged("its config does not match its config_hash: edited by hand?")
        return document

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the exclusive lock of the folder (released when the lock file closes, or its process dies)."""
        handle = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        finally:
            os.close(handle)

    def _catch_up(self) -> None:
        """Read the lines appended since the last read (the lock held), cutting off a last line without its newline.

        Every writer holds the lock while it writes, so a last line without its newline seen under
        the lock belongs to a process that died mid-write: it is truncated, and its record is not done.
        """
        with self.results_path.open("r+b") as file:
            size = os.fstat(file.fileno()).st_size
            if size < self._offset:
                raise ValueError(
                    f"{self.results_path} shrank from {self._offset} to {size} bytes while this store was "
                    "open: something other than a ResultStore edited it"
                )
            file.seek(self._offset)
            for line in file:  # line by line: a large file is never in memory at once
                if not line.endswith(b"\n"):
                    file.truncate(self._offset)
                    os.fsync(file.fileno())
                    return
                self._lines += 1
                record = self._parse(line, self._lines)
                key = (record["problem"], record["condition"])
                if key in self._done:
                    raise ValueError(
                        f"{self.results_path} line {self._lines} stores {key!r} a second time: the file is "
                        "corrupted (a record is appended once). Remove one of the two lines."
                    )
                self._done.add(key)
                self._offset += len(line)

    def _parse(self, line: bytes, number: int) -> dict:
        """One complete line as a record of this store's config, or an error naming the line."""
        where = f"{self.results_path} line {number}"
        try:
            record = json.loads(line, parse_constant=_refuse_constant)
        except ValueError as error:
            raise ValueError(
                f"{where} is not valid JSON ({error}): the file is corrupted in its middle (a last line cut "
                "by a kill is repaired on its own; this is not one). Fix or remove that line, or delete "
                f"{self.folder} to start over."
            ) from None
        if not (
            isinstance(record, dict)
            and isinstance(record.get("problem"), str)
            and isinstance(record.get("condition"), str)
            and isinstance(record.get("payload"), dict)
        ):
            raise ValueError(f"{where} is not a result record (problem, condition, payload): the file is corrupted")
        if record.get("config_hash") != self.config_hash:
            raise ValueError(
                f"{where} was written under another config (hash {str(record.get('config_hash'))[:12]}; this "
                f"store's is {self.config_hash[:12]}): the file mixes two studies. Delete {self.folder} to "
                "start over, or remove the foreign lines."
            )
        return record


def _dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _check_json(value: object, where: str) -> None:
    """Raise, naming where, unless ``value`` is made of JSON values only (finite numbers, string keys)."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(
                f"{where} is {value}: NaN and infinity are refused (JSON has no such numbers); store None or "
                "a string such as 'nan' instead"
            )
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has the key {key!r}: JSON keys are strings")
            _check_json(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}, which JSON cannot hold: convert it (tensor.tolist(), int(x), "
        "float(x), list(...))"
    )


def _difference(stored: dict, new: dict) -> str:
    """The top-level keys that differ between two configs, e.g. ``"changed: max_new_tokens; added: seed"``."""
    changed = sorted(key for key in stored.keys() & new.keys() if _dumps(stored[key]) != _dumps(new[key]))
    parts = [f"{what}: {', '.join(keys)}" for what, keys in
             (("changed", changed), ("added", sorted(new.keys() - stored.keys())),
              ("removed", sorted(stored.keys() - new.keys()))) if keys]
    return "; ".join(parts) or "the same keys and values, written differently"
