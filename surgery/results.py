"""Saving and loading probe results: ``result.save(path)``, ``Type.load(path)``.

Probe results are typed dataclasses (tensors, numpy arrays, networkx graphs, nested
dataclasses). They are written with ``torch.save`` inside a small envelope naming the format and
the result type, and read back with a check of both. Loading unpickles: open only files you
trust (as with any pickle).

Example::

    found = mi.result(out)            # any probe result
    found.save("runs/mi.pt")
    again = MIResult.load("runs/mi.pt")
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["SavedResult"]

_FORMAT = "surgery.result/1"


class SavedResult:
    """Mixin for result dataclasses: :meth:`save` and :meth:`load`."""

    def save(self, path: str | Path) -> Path:
        """Write this result to ``path`` (parent folders are created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": _FORMAT, "type": type(self).__qualname__, "result": self}, path)
        return path

    @classmethod
    def load(cls, path: str | Path):
        """Read a result written by :meth:`save`; the file must hold a ``cls``."""
        data = torch.load(Path(path), map_location="cpu", weights_only=False)
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a saved surgery result")
        if not isinstance(data["result"], cls):
            raise ValueError(f"{path} holds a {data['type']}, not a {cls.__qualname__}")
        return data["result"]
