r"""Problems from files: GSM8K- and MATH-style JSONL, local json/csv/parquet, the hub when it answers.

:func:`load_problems` reads one source into a list of :class:`~experiments.problems.Problem`:

- a ``.jsonl`` file, read line by line here (errors name the line);
- a ``.json``, ``.csv`` or ``.parquet`` file, read through Hugging Face ``datasets``
  (``load_dataset("csv", data_files=...)``; install the ``study`` extra);
- a hub name such as ``"openai/gsm8k"`` (with ``subset="main"``), tried only after
  :func:`surgery.hosts.loading.hub_unreachable` says the hub answers: offline it reads ``fallback``, a
  local copy (e.g. ``../shared/data/gsm8k/test.jsonl``), when one is given (with a warning), and
  otherwise fails at once and says to pass a local file. Give ``name`` so that the ids are the
  same whichever copy is read.

Three record formats, inferred from the first record when ``format`` is not given:

- ``"gsm8k"``: ``question`` and ``answer``, the answer a worked solution ending in ``#### 72``.
  The reference is the text after the last ``####`` with thousands commas removed (``1,600`` ->
  ``1600``), as GSM8K's own ``extract_answer`` does; the text before it is the solution.
- ``"math"``: ``problem`` and ``solution``; the reference is what the solution's last
  ``\boxed{...}`` (or ``\fbox{...}``) holds, nested braces included (:func:`~experiments.boxed.last_boxed`).
- ``"plain"``: the answer field holds the final answer itself, kept as it is (stripped).

``question_field`` and ``answer_field`` name other fields; with them the format is read from the
answer (``####``: gsm8k, a box: math, else plain). Other fields of a record go to ``meta``
(MATH's ``level`` and ``type``). Ids are ``"<name>-<index>"``: ``name`` defaults to the file's
stem, and the index is the record's 0-based line (or row) in the file, counted before
``offset`` and ``limit``, so the first 20 problems keep their ids in a larger run.

Example:
    >>> from experiments.datasets import load_problems, sample_problems, SAMPLE_GSM8K
    >>> problems = load_problems(SAMPLE_GSM8K, offset=1, limit=2)
    >>> [(p.id, p.answer) for p in problems]
    [('gsm8k_sample-1', '3'), ('gsm8k_sample-2', '70000')]
    >>> sample_problems(limit=1)[0].id
    'gsm8k-test-0'
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from experiments.boxed import last_boxed
from experiments.problems import Problem

__all__ = ["SAMPLE_GSM8K", "load_problems", "sample_problems"]

SAMPLE_GSM8K = Path(__file__).resolve().parent / "data" / "gsm8k_sample.jsonl"
"""The first 60 problems of the GSM8K test set, shipped with the package (MIT, see data/README.md)."""

_FORMATS = ("gsm8k", "math", "plain")
_DEFAULT_FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution"), "plain": ("question", "answer")}
_DATASETS_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}  # .jsonl is read here
_SUFFIXES = (".jsonl", *_DATASETS_BUILDERS)
_HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_SAMPLE_HINT = "the package ships a GSM8K sample: experiments.load_problems(experiments.SAMPLE_GSM8K)"

_Record = tuple[int, dict, str]  # (index in the source, the record, where it is, for errors)


def _jsonl_records(path: Path) -> Iterator[_Record]:
    with path.open(encoding="utf-8") as file:
        for index, line in enumerate(file):
            if not line.strip():
                continue
            where = f"{path} line {index + 1}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{where} is not JSON ({error.msg}, column {error.colno}): {line.strip()[:80]!r}. "
                    "Each line of a .jsonl file must be one JSON object: fix or delete that line."
                ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{where} is JSON but not an object ({type(record).__name__}): each line must be {{...}}.")
            yield index, record, where


def _import_datasets():
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "reading .json, .csv, .parquet files or hub datasets needs Hugging Face datasets: "
            "pip install 'reasoning-surgery[study]' (or pass a .jsonl file, read without it)"
        ) from error
    return datasets


def _datasets_records(path: Path) -> Iterator[_Record]:
    table = _import_datasets().load_dataset(_DATASETS_BUILDERS[path.suffix], data_files=str(path), split="train")
    for index, record in enumerate(table):
        yield index, dict(record), f"{path} row {index + 1}"


def _hub_records(name: str, subset: str | None, split: str) -> Iterator[_Record]:
    from surgery.hosts.loading import hub_unreachable

    reason = hub_unreachable()
    if reason is not None:
        raise OSError(
            f"could not load {name!r}: there is no local file {str(Path(name).resolve())!r}, and the Hugging "
            f"Face hub cannot be reached to download it ({reason}). Pass a local file instead, e.g. "
            "load_problems('path/to/test.jsonl') (.jsonl, .json, .csv or .parquet), downloaded elsewhere "
            f"(`hf download {name} --repo-type dataset --local-dir DIR`); {_SAMPLE_HINT}."
        )
    table = _import_datasets().load_dataset(name, subset, split=split)
    for index, record in enumerate(table):
        yield index, dict(record), f"{name} ({split}) row {index + 1}"


def _infer_format(record: dict, question_field: str | None, answer_field: str | None, where: str) -> str:
    if question_field is None and answer_field is None:
        if {"problem", "solution"} <= record.keys():
            return "math"
        if {"question", "answer"} <= record.keys():
            return "gsm8k" if "####" in str(record["answer"]) else "plain"
        raise ValueError(
            f"{where}: cannot tell the format from the fields {sorted(record)}. GSM8K records have 'question' "
            "and 'answer' ('... #### 72'), MATH records 'problem' and 'solution' (with \\boxed{...}). Name "
            "yours: load_problems(..., question_field='...', answer_field='...'), and format= if needed."
        )
    answer = str(record.get(answer_field or "answer", ""))
    return "gsm8k" if "####" in answer else "math" if last_boxed(answer) is not None else "plain"


def _problem(record: dict, index: int, where: str, format: str, fields: tuple[str, str], name: str) -> Problem:
    missing = [field for field in fields if field not in record]
    if missing:
        raise ValueError(
            f"{where}: no field {' or '.join(map(repr, missing))} for the {format} format; the record has the "
            f"fields {sorted(record)}. Pass question_field='...' and answer_field='...' naming the fields that "
            "hold the question and the answer."
        )
    question, text = str(record[fields[0]]), str(record[fields[1]])
    if format == "gsm8k":
        solution, marker, final = text.rpartition("####")
        if not marker or not final.strip():
            raise ValueError(
                f"{where}: a GSM8K answer ends with '#### <final answer>', and this one has no "
                f"{'####' if not marker else 'answer after ####'}: ...{text[-60:]!r}. If the field holds only the "
                "final answer, pass format='plain'."
            )
        answer, solution = _THOUSANDS_COMMA.sub("", final.strip()), solution.strip()
    elif format == "math":
        boxed = last_boxed(text)
        if boxed is None:
            raise ValueError(
                f"{where}: a MATH solution gives its final answer in \\boxed{{...}}, and this one has no closed "
                f"\\boxed{{}} or \\fbox{{}}: ...{text[-60:]!r}. If the field holds only the final answer, pass "
                "format='plain'."
            )
        answer, solution = boxed, text
    else:
        answer, solution = text.strip(), ""
    meta = {key: value for key, value in record.items() if key not in fields}
    return Problem(id=f"{name}-{index}", question=question, answer=answer, solution=solution, meta=meta)


def _records(source: str | os.PathLike, subset: str | None, split: str) -> tuple[Iterator[_Record], str]:
    """The records of ``source`` and the default id prefix."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".jsonl":
            return _jsonl_records(path), path.stem
        if path.suffix in _DATASETS_BUILDERS:
            return _datasets_records(path), path.stem
        raise ValueError(f"cannot read {path}: the supported files are {', '.join(_SUFFIXES)}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: pass one file of problems ({', '.join(_SUFFIXES)})")
    if isinstance(source, str) and path.suffix not in _SUFFIXES and _HUB_NAME.fullmatch(source):
        return _hub_records(source, subset, split), f"{source.rsplit('/', 1)[-1]}-{split}"
    raise FileNotFoundError(
        f"no such file: {str(path.resolve())!r}. Pass the path of a file of problems ({', '.join(_SUFFIXES)}), "
        f"or a hub name such as 'openai/gsm8k' when the hub is reachable; {_SAMPLE_HINT}."
    )


def load_problems(
    source: str | os.PathLike,
    *,
    format: str | None = None,
    limit: int | None = None,
    offset: int = 0,
    question_field: str | None = None,
    answer_field: str | None = None,
    name: str | None = None,
    split: str = "test",
    subset: str | None = None,
    fallback: str | os.PathLike | None = None,
) -> list[Problem]:
    """Read problems from a file or a hub dataset.

    Args:
        source: a ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file, or a hub name (``"openai/gsm8k"``).
        format: ``"gsm8k"``, ``"math"`` or ``"plain"`` (see the module); None infers it from the first record.
        limit: at most this many problems (None: all).
        offset: skip this many records first. Ids count from the start of the source either way.
        question_field: the field holding the question (default ``question``, or ``problem`` for MATH).
        answer_field: the field holding the answer or solution (default ``answer``, ``solution`` for MATH).
        name: the id prefix (default: the file's stem; for the hub, the dataset's name and split).
        split: the hub split (local files have one table and ignore it).
        subset: the hub configuration, e.g. ``"main"`` for ``openai/gsm8k``.
        fallback: a local copy of the hub dataset ``source`` names, read instead when the hub
            cannot be reached or ``datasets`` is not installed (a warning says which and why).

    Returns:
        The problems in source order, ids ``f"{name}-{index}"``.

    Raises:
        FileNotFoundError: no such file (and not a hub name).
        ValueError: a line that is not JSON, a record without the needed fields, a GSM8K answer
            without ``####``, a MATH solution without ``\\boxed{}``, an unknown format or suffix.
        OSError: a hub name while the hub cannot be reached (at most a few seconds to find out).
    """
    if format is not None and format not in _FORMATS:
        raise ValueError(f"unknown format {format!r}: choose one of {', '.join(_FORMATS)} (or None to infer it)")
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError(f"offset and limit must not be negative, got offset={offset}, limit={limit}")
    source = _reachable(source, fallback)
    records, default_name = _records(source, subset, split)
    problems: list[Problem] = []
    fields: tuple[str, str] | None = None
    for position, (index, record, where) in enumerate(records):
        if limit is not None and len(problems) >= limit:
            break
        if fields is None:  # the first record fixes the format and the fields for all
            format = format or _infer_format(record, question_field, answer_field, where)
            default_question, default_answer = _DEFAULT_FIELDS[format]
            fields = (question_field or default_question, answer_field or default_answer)
        if position >= offset:
            problems.append(_problem(record, index, where, format, fields, name or default_name))
        if limit is not None and len(problems) >= limit:
            break  # now, not after reading one more line: a bad line past the limit does not matter
    return problems


def _reachable(source, fallback):
    """``source``, or ``fallback`` when ``source`` is a hub name that cannot be read now."""
    if fallback is None or not isinstance(source, str) or Path(source).exists() or not _HUB_NAME.fullmatch(source):
        return source
    from importlib.util import find_spec

    from surgery.hosts.loading import hub_unreachable

    reason = "Hugging Face datasets is not installed" if find_spec("datasets") is None else hub_unreachable()
    if reason is None:
        return source
    if not Path(fallback).is_file():
        raise FileNotFoundError(
            f"could not load {source!r}: the hub cannot be reached ({reason}), and its local copy {str(fallback)!r} "
            f"does not exist. Download it there (`hf download {source} --repo-type dataset`, then convert the split "
            "to .jsonl), or pass another local file."
        )
    warnings.warn(f"{source}: {reason}; reading its local copy {fallback}", stacklevel=3)
    return fallback


def sample_problems(limit: int | None = None) -> list[Problem]:
    """The GSM8K sample shipped with the package, ids ``gsm8k-test-<line>`` as in the full test set.

    Args:
        limit: at most this many of its 60 problems (None: all).
    """
    return load_problems(SAMPLE_GSM8K, format="gsm8k", limit=limit, name="gsm8k-test")
