"""Saving and loading probe results: ``result.save(path)``, ``Type.load(path)``, no pickle.

Probe results are typed dataclasses holding tensors, numpy arrays, networkx graphs, nested
dataclasses and plain values. :meth:`SavedResult.save` writes one ``.safetensors`` file
(:mod:`surgery.files.storage`): every tensor and array as a named tensor, everything else as JSON in
the header (graphs in networkx's node-link form, nested dataclasses by their registered type
name). Loading builds only the types registered here (every :class:`SavedResult` subclass, and
the dataclasses marked :func:`result_part`), so a results file cannot make the reader run code.

Example:
    >>> import tempfile, torch
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Found(SavedResult):
    ...     values: torch.Tensor
    ...     note: str
    >>> path = Found(torch.arange(3), "three").save(tempfile.mkdtemp() + "/found.safetensors")
    >>> Found.load(path)
    Found(values=tensor([0, 1, 2]), note='three')
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from surgery.files import storage

__all__ = ["SavedResult", "result_part"]

FORMAT = "surgery.result"
VERSION = 1

_TYPES: dict[str, type] = {}


def _register(cls: type) -> type:
    name = cls.__qualname__
    existing = _TYPES.get(name)
    if existing is not None and existing.__module__ != cls.__module__:
        raise ValueError(f"two result types are called {name}: {existing.__module__} and {cls.__module__}; rename one")
    _TYPES[name] = cls
    return cls


def result_part(cls: type) -> type:
    """Class decorator: a dataclass that may appear inside a saved result (e.g. per-row statistics)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"@result_part expects a dataclass, got {cls!r}")
    return _register(cls)


class SavedResult:
    """Mixin for result dataclasses: :meth:`save` and :meth:`load` (see the module docstring)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _register(cls)

    def save(self, path: str | Path) -> Path:
        """Write this result to ``path`` (a ``.safetensors`` file; parent folders are created)."""
        tensors: dict[str, Tensor] = {}
        document = {"type": type(self).__qualname__, "result": _encode(self, tensors, "result")}
        return storage.write(path, FORMAT, VERSION, document, tensors)

    @classmethod
    def load(cls, path: str | Path):
        """Read a result written by :meth:`save`; the file must hold a ``cls`` (tensors come back on the CPU)."""
        document, tensors = storage.read(path, FORMAT, VERSION)
        if document.get("type") != cls.__qualname__:
            raise ValueError(f"{path} holds a {document.get('type')}, not a {cls.__qualname__}")
        return _decode(document["result"], tensors, path)


def _encode(value, tensors: dict[str, Tensor], key: str):
    """JSON for ``value``; tensors and arrays go into ``tensors`` under ``key``-derived names."""
    if isinstance(value, Tensor):
        tensors[key] = value
        return {"$tensor": key}
    if isinstance(value, np.ndarray):
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
        return {"$ndarray": key}
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__qualname__
        if _TYPES.get(name) is not type(value):
            raise TypeError(f"{name} cannot be saved in a result: mark it @surgery.files.results.result_part")
        fields = {f.name: _encode(getattr(value, f.name), tensors, f"{key}.{f.name}") for f in dataclasses.fields(value)}
        return {"$type": name, "fields": fields}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) and not k.startswith("$") for k in value):
            raise TypeError(f"result dicts need string keys not starting with '$', got {list(value)[:5]}")
        return {k: _encode(v, tensors, f"{key}.{k}") for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    import networkx as nx

    if isinstance(value, nx.Graph):
        return {"$graph": nx.node_link_data(value, edges="edges")}
    raise TypeError(f"a {type(value).__name__} cannot be saved in a result (at {key})")


def _decode(value, tensors: dict[str, Tensor], path):
    if isinstance(value, list):
        return [_decode(v, tensors, path) for v in value]
    if not isinstance(value, dict):
        return value
    if "$tensor" in value or "$ndarray" in value:
        name = value.get("$tensor", value.get("$ndarray"))
        if name not in tensors:
            raise ValueError(f"{path} names a tensor {name!r} it does not hold: the file is damaged, save it again")
        return tensors[name] if "$tensor" in value else tensors[name].numpy()
    if "$tuple" in value:
        return tuple(_decode(v, tensors, path) for v in value["$tuple"])
    if "$graph" in value:
        import networkx as nx

        return nx.node_link_graph(value["$graph"], edges="edges")
    if "$type" in value:
        cls = _TYPES.get(value["$type"])
        if cls is None:
            raise ValueError(
                f"{path} holds a {value['$type']!r}, which this version of surgery does not know: "
                "import the package that defines it (e.g. probes) before loading, or upgrade surgery"
            )
        fields = {k: _decode(v, tensors, path) for k, v in value["fields"].items()}
        return cls(**fields)
    return {k: _decode(v, tensors, path) for k, v in value.items()}
