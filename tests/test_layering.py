"""The rooms of surgery/ import one way; no module of surgery/, interventions/, probes/ is in a circle.

A module's room is its folder: ``surgery/<room>/...`` is in ``<room>``, a module directly in
``surgery/`` is in the core. Each room imports its own modules and those of the rooms below it:

=========  ==========================================================  ===================
room       holds                                                       may also import
=========  ==========================================================  ===================
kernels    hot ops: torch reference, Triton kernels, the backend        nothing of surgery
core       model, sites, step, blocks, triggers, signals, text          kernels
           matching, prompts, capture, thoughts, config JSON
files      the file format, saved blocks, saved probe results          core
decode     engine, forward, caches, partial re-run, sampling,          core, kernels
           stopping, records, the Trace
hosts      loading, wrapping, TransformerLens, nnsight, the adapters   core, decode
=========  ==========================================================  ===================

``surgery/__init__.py`` (the public API) may import every room. Every import counts, at module
level and inside functions alike: a lazy import is still a dependency, it only waits to bite.
"""

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SURGERY = ROOT / "surgery"
PACKAGES = ("surgery", "interventions", "probes")

#: room -> the other rooms its modules may import (the table above).
ALLOWED = {
    "kernels": set(),
    "core": {"kernels"},
    "files": {"core"},
    "decode": {"core", "kernels"},
    "hosts": {"core", "decode"},
}


def module_paths() -> dict[str, Path]:
    """Dotted name -> file, for every module of surgery/, interventions/ and probes/."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = module_paths()


def imported_modules(name: str) -> set[str]:
    """The modules of :data:`MODULES` that ``name`` imports anywhere in its file (``from a
    import b`` counts as importing ``a.b`` when that is a module, else ``a``)."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    wanted = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            wanted |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            wanted |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    found = set()
    for target in wanted:
        while target and target not in MODULES:  # a name inside a module: the module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def room_of(name: str) -> str:
    """``package`` for surgery/__init__.py, ``core`` for surgery/<module>.py, else the folder."""
    relative = MODULES[name].relative_to(SURGERY)
    if relative == Path("__init__.py"):
        return "package"
    return "core" if len(relative.parts) == 1 else relative.parts[0]


SURGERY_MODULES = sorted(name for name in MODULES if name.split(".")[0] == "surgery" and name != "surgery")


def test_every_room_is_in_the_table_and_the_table_is_the_layout():
    folders = {path.parent.name for path in SURGERY.glob("*/__init__.py")}
    assert folders == set(ALLOWED) - {"core"}, (
        f"surgery/ has the rooms {sorted(folders)}, the table in tests/test_layering.py {sorted(set(ALLOWED) - {'core'})}: "
        "a new room goes into the table with the rooms it may import"
    )


@pytest.mark.parametrize("name", SURGERY_MODULES)
def test_rooms_import_only_the_rooms_below_them(name):
    room = room_of(name)
    crossing = sorted(
        f"{target} ({room_of(target)})"
        for target in imported_modules(name)
        if target.split(".")[0] == "surgery" and room_of(target) not in {room} | ALLOWED[room]
    )
    assert not crossing, (
        f"{name} is in the {room} room, which may import {sorted(ALLOWED[room]) or 'no other room'}, "
        f"but imports {crossing}: move the import (or what it needs) into a room below"
    )


def test_no_import_circles():
    graph = nx.DiGraph()
    for name in MODULES:
        graph.add_node(name)
        graph.add_edges_from((name, target) for target in imported_modules(name))
    circles = sorted(" -> ".join([*cycle, cycle[0]]) for cycle in nx.simple_cycles(graph))
    assert not circles, f"import circles (module-level and function-level imports both count): {circles}"
