"""Finding a package's public names without a hand-kept list.

``interventions`` and ``probes`` export every public name of every module they hold, so a new
block is one module (and its test file): nothing else to edit. Importing the modules also runs
their ``@register_block`` decorators, so every block is in the registry once its package is
imported.

Example:
    >>> import interventions
    >>> "SteeringVector" in interventions.__all__
    True
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable

__all__ = ["export_modules", "public_modules"]


def public_modules(package: str, path: Iterable[str]) -> list[str]:
    """Dotted names of the modules directly inside ``package`` whose names do not start with ``_``."""
    return sorted(f"{package}.{info.name}" for info in pkgutil.iter_modules(list(path)) if not info.name.startswith("_"))


def export_modules(package: str, path: Iterable[str], namespace: dict) -> list[str]:
    """Import every public module of ``package`` and copy the names in its ``__all__`` into ``namespace``.

    Args:
        package: the package's ``__name__``.
        path: its ``__path__``.
        namespace: its ``globals()``.

    Returns:
        The exported names, sorted: the package's ``__all__``.

    Raises:
        ImportError: two modules export the same name (rename one of them).
    """
    exported: dict[str, str] = {}
    for name in public_modules(package, path):
        module = importlib.import_module(name)
        for public in getattr(module, "__all__", ()):
            if public in exported and namespace[public] is not getattr(module, public):
                raise ImportError(f"{name} and {exported[public]} both export {public!r}: rename one of them")
            exported[public] = name
            namespace[public] = getattr(module, public)
    return sorted(exported)
