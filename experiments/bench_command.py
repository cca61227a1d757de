"""``surgery bench``: run the project's benchmarks, each a script in ``benchmarks/`` of a checkout.

Each benchmark is one command that times the things it compares side by side in one process
and prints medians and ratios (see ``benchmarks/RESULTS.md``). :func:`benchmark_scripts` finds
them (``bench_<name>.py``: the name is what ``surgery bench`` takes), and
:func:`run_benchmarks` runs the chosen ones in turn, each in its own Python process (so one
benchmark's warm caches and threads do not time the next), passing on extra arguments.

The scripts are part of a source checkout, not of an installed wheel: without ``benchmarks/``
beside the package, the error says where they were looked for.

Example:
    >>> sorted(benchmark_scripts())[:2]                                       # doctest: +SKIP
    ['backends', 'engine']
    >>> run_benchmarks(["kernels"], ["--reps", "5"])                           # doctest: +SKIP
    0
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BENCHMARKS_FOLDER", "benchmark_scripts", "run_benchmarks"]

BENCHMARKS_FOLDER = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_scripts(folder: Path = BENCHMARKS_FOLDER) -> dict[str, Path]:
    """Name -> script of each ``bench_<name>.py`` in ``folder``, sorted by name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no benchmarks folder at {folder}: the benchmarks come with a source checkout "
                                "of the project (git clone), not with an installed package")
    return {path.stem.removeprefix("bench_"): path for path in sorted(folder.glob("bench_*.py"))}


def run_benchmarks(names: Sequence[str] = (), extra: Sequence[str] = (), folder: Path = BENCHMARKS_FOLDER) -> int:
    """Run the named benchmarks (all when none is named), each with ``extra`` arguments.

    Returns:
        0 when every benchmark exited 0, else the first non-zero exit status (the others still run).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    scripts = benchmark_scripts(folder)
    unknown = [name for name in names if name not in scripts]
    if unknown:
        raise ValueError(f"no benchmark named {', '.join(map(repr, unknown))}; there are: {', '.join(scripts)}")
    status = 0
    for name in names or list(scripts):
        print(f"\n=== surgery bench {name}: {scripts[name].name} {' '.join(extra)}".rstrip(), flush=True)
        code = subprocess.call([sys.executable, str(scripts[name]), *extra])
        if code and not status:
            status = code
    return status
