"""The one file format of the toolkit: tensors as safetensors, everything else as JSON in its header.

Saved blocks (:mod:`surgery.files.saving`) and probe results (:mod:`surgery.files.results`) are each one
``.safetensors`` file. Its tensors are plain named tensors; its header holds three strings:
``format`` (what the file is, e.g. ``"surgery.result"``), ``version`` (an integer, raised when the
layout changes) and ``json`` (the rest of the document). Reading never unpickles anything, so
opening a file someone sent you runs none of their code; a pickle, a ``torch.save`` archive, a
truncated file or a file from a newer version is refused with an error that says which.

Files are written to a temporary name beside the target, flushed to disk and renamed into place
(:func:`atomic_path`), so an interrupted save leaves the previous file (or none), never half of
one. Other file formats of the toolkit (a study's ``config.json``) are written the same way.

Example:
    >>> import tempfile, torch
    >>> path = write(tempfile.mkdtemp() + "/x.safetensors", "surgery.example", 1, {"a": 1}, {"t": torch.ones(2)})
    >>> document, tensors = read(path, "surgery.example", 1)
    >>> document, tensors["t"].tolist()
    ({'a': 1}, [1.0, 1.0])
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor

__all__ = ["atomic_path", "read", "write"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the new file at: when the block ends cleanly the
    file is flushed to disk (``os.fsync``) and renamed over ``path`` (``os.replace``, atomic), then
    the folder is flushed too; when it raises (or is interrupted) the temporary file is removed and
    ``path`` is left as it was. Parent folders are created.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "note.txt"
        >>> with atomic_path(target) as staging:
        ...     _ = staging.write_text("hello")
        >>> target.read_text(), [p.name for p in target.parent.iterdir()]
        ('hello', ['note.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        yield Path(staging)
        _fsync(staging, os.O_RDONLY)
        os.replace(staging, path)
        _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))  # the rename itself
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def _fsync(path: str | os.PathLike, flags: int) -> None:
    """Flush a file's (or a folder's) data to disk."""
    handle = os.open(path, flags)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write(path: str | os.PathLike, kind: str, version: int, document: dict, tensors: dict[str, Tensor]) -> Path:
    """Write ``document`` (JSON-serialisable) and ``tensors`` to ``path`` atomically; returns the path.

    Tensors are copied to the CPU first (views and shared storage are fine). Parent folders are
    created.
    """
    from safetensors.torch import save_file

    path = Path(path)
    header = {"format": kind, "version": str(int(version)), "json": json.dumps(document)}
    plain = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}
    with atomic_path(path) as staging:
        save_file(plain, str(staging), metadata=header)
    return path


def _not_safetensors(path: Path, error: Exception) -> ValueError:
    """A clear error for a file that safetensors cannot open, naming what it looks like."""
    with path.open("rb") as file:
        start = file.read(8)
    size = path.stat().st_size
    if start[:4] == b"PK\x03\x04":
        what = "a zip archive, as torch.save writes (it holds pickled objects, which surgery never unpickles)"
    elif start[:1] == b"\x80":
        what = "a pickle (surgery never unpickles files: they can run code)"
    elif len(start) == 8 and 8 + struct.unpack("<Q", start)[0] > size or "not fully covered" in str(error):
        what = "truncated (an interrupted write or copy?)"
    else:
        what = f"not a safetensors file ({error})"
    return ValueError(f"{path} is not a readable surgery file: it is {what}. Save it again with surgery.")


def read(path: str | os.PathLike, kind: str, version: int) -> tuple[dict, dict[str, Tensor]]:
    """Read a file written by :func:`write` as ``kind``: ``(document, tensors)`` (tensors on the CPU).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not ours (a pickle, a ``torch.save`` archive, another safetensors
            file), is truncated, holds another kind, or was written by a newer version (format
            version above ``version``).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        with safe_open(str(path), framework="pt") as file:
            header = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except SafetensorError as error:
        raise _not_safetensors(path, error) from None
    found = header.get("format")
    if found is None or not found.startswith("surgery."):
        raise ValueError(f"{path} is a safetensors file but not a surgery file (its header names format {found!r})")
    if found != kind:
        raise ValueError(f"{path} holds a {found} file, not a {kind} file")
    written = int(header.get("version", "0"))
    if written > version:
        raise ValueError(
            f"{path} was written by a newer version of surgery ({kind} format version {written}; this version "
            f"reads up to {version}): upgrade surgery to read it"
        )
    try:
        document = json.loads(header["json"])
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is a {kind} file with a damaged header ({error}): save it again") from None
    return document, tensors
