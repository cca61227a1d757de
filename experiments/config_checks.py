"""Checking values read from a study's TOML file, with errors that name the field and the fix.

Every error is a :class:`StudyConfigError` whose message starts with the field's TOML path
(``conditions.seal.blocks[0].alpha``), says what was wrong and what to write instead.
:func:`check_keys` refuses unknown keys with a "did you mean"; :func:`check_value` checks a
value against a type hint (the ones block configs use: ``str``, ``int``, ``float``, ``bool``,
``dict``, ``tuple[str, ...]``, unions, :class:`~surgery.triggers.Trigger`) and returns it in
the JSON form :func:`surgery.config_json.config_from_json` rebuilds (ints as floats where a
float is expected, so ``alpha = 1`` and ``alpha = 1.0`` are the same study).

Example:
    >>> check_value("generation.temperature", 1, float)
    1.0
    >>> check_keys("generation", {"max_new_token": 8}, ["max_new_tokens", "seed"])
    Traceback (most recent call last):
    ...
    experiments.config_checks.StudyConfigError: generation.max_new_token: unknown key. Did you mean 'max_new_tokens'? Known keys: max_new_tokens, seed
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable

from surgery.triggers import Trigger

__all__ = ["StudyConfigError", "check_keys", "check_value", "field_path"]


class StudyConfigError(ValueError):
    """A study's TOML file is wrong; ``field`` is the TOML path of the culprit.

    The message is ``"{field}: {what is wrong}. {how to fix it}"``.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


def field_path(parent: str, key: str | int) -> str:
    """``parent.key``, or ``parent[key]`` for a list index.

    Example:
        >>> field_path(field_path("conditions.seal", "blocks"), 0)
        'conditions.seal.blocks[0]'
    """
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def check_keys(parent: str, table: dict, known: Iterable[str]) -> None:
    """Refuse keys of ``table`` that are not in ``known``, suggesting the closest known key."""
    known = sorted(known)
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise StudyConfigError(
                field_path(parent, key), f"unknown key.{hint} Known keys: {', '.join(known) or 'none'}"
            )


def check_value(path: str, value, hint):
    """``value`` if it fits the type ``hint`` (in its JSON form), else a StudyConfigError naming ``path``.

    TOML has no null: a field whose hint allows None is written only to give another value.
    """
    problem = _mismatch(value, hint)
    if problem is not None:
        raise StudyConfigError(path, problem)
    return _normalised(value, hint)


def _arms(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _describe(hint) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table",
             type(None): "nothing (leave it out)"}
    if hint in names:
        return names[hint]
    if isinstance(hint, type) and issubclass(hint, Trigger):
        return 'a trigger table, e.g. { kind = "text", text = "\\n\\n" }'
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return "a table"
    return getattr(hint, "__name__", str(hint))


def _mismatch(value, hint) -> str | None:
    """Why ``value`` does not fit ``hint``, or None when it does."""
    arms = _arms(hint)
    if len(arms) > 1:
        problems = [_mismatch(value, arm) for arm in arms if arm is not type(None)]
        if any(p is None for p in problems):
            return None
        wanted = " or ".join(_describe(arm) for arm in arms if arm is not type(None))
        return problems[0] if len(problems) == 1 else f"expected {wanted}, got {value!r}"
    if hint is typing.Any:
        return None
    if isinstance(hint, type) and issubclass(hint, Trigger):
        if not isinstance(value, dict):
            return f"expected {_describe(hint)}, got {value!r}"
        try:
            Trigger.from_dict(value)
        except (TypeError, ValueError) as error:
            return f"not a trigger ({error}). Write {_describe(hint)}"
        return None
    origin = typing.get_origin(hint) or hint
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return f"expected {_describe(hint)}, got {value!r}"
        args = typing.get_args(hint)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if args and len(items) != len(value):
            return f"expected {len(items)} items, got {len(value)}"
        for index, (item, item_hint) in enumerate(zip(value, items)):
            problem = _mismatch(item, item_hint)
            if problem is not None:
                return f"item {index}: {problem}"
        return None
    accepted = {bool: (bool,), int: (int,), float: (int, float), str: (str,), dict: (dict,)}.get(origin)
    if accepted is None:
        return None  # a hint these checks do not know: the block's constructor checks it
    if isinstance(value, accepted) and (origin is bool or not isinstance(value, bool)):
        return None
    return f"expected {_describe(origin)}, got {value!r}"


def _normalised(value, hint):
    """Ints where a float is expected become floats (also inside lists)."""
    arms = _arms(hint)
    if float in arms and int not in arms and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    for arm in arms:
        if typing.get_origin(arm) in (tuple, list) and isinstance(value, (list, tuple)):
            args = typing.get_args(arm)
            items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args or (typing.Any,) * len(value)
            return [_normalised(item, item_hint) for item, item_hint in zip(value, items)]
    return value
