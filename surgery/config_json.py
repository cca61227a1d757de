"""A block's frozen config dataclass to JSON and back: triggers as dicts, tuples as lists.

:meth:`surgery.blocks.Block.to_dict` and :meth:`~surgery.blocks.Block.from_dict` use these two
functions; the type hints of the config's fields say what each JSON value becomes again.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Config:
    ...     words: tuple[str, ...] = ()
    ...     penalty: float | None = -3.0
    >>> data = config_to_json(Config(words=("wait",)))
    >>> data
    {'words': ['wait'], 'penalty': -3.0}
    >>> config_from_json(Config, data) == Config(words=("wait",))
    True

A config's type hints must resolve in the module that defines it (a trigger field needs
``Trigger`` imported there).
"""

from __future__ import annotations

import dataclasses
import types
import typing

__all__ = ["config_from_json", "config_to_json"]


def config_to_json(config) -> dict:
    """The fields of a config dataclass as JSON-serialisable values (``to_dict()`` for triggers)."""
    return _jsonable({f.name: getattr(config, f.name) for f in dataclasses.fields(config)})


def config_from_json(config_class: type, data: dict):
    """Rebuild ``config_class`` from :func:`config_to_json`'s output.

    Raises ValueError naming the fields it has when ``data`` holds one it does not.
    """
    from surgery.triggers import Trigger

    hints = typing.get_type_hints(config_class)
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{config_class.__name__} has no field(s) {unknown}: expected some of {sorted(known)}")

    def rebuild(hint, value):
        kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if isinstance(value, dict) and "kind" in value and Trigger in kinds:
            return Trigger.from_dict(value)
        if isinstance(value, list) and any(k is tuple or typing.get_origin(k) is tuple for k in kinds):
            return tuple(value)
        return value

    return config_class(**{name: rebuild(hints[name], value) for name, value in data.items()})


def _jsonable(value):
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
