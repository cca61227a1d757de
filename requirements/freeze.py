"""Print a pip constraints file of every distribution in this Python environment (``make lock``).

One ``name==version`` line per distribution, sorted, with local version labels dropped
(``torch==2.13.0+cpu`` becomes ``torch==2.13.0``: the build is TORCH_SPEC's choice, see the
Makefile). Left out: this project itself (installed editable) and pip's own tools.

    .venv/bin/python requirements/freeze.py torch triton > requirements/lock.txt

The arguments name the packages ``make lock`` kept at the lock's versions (its LOCK_KEEP).
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

# transformers needs packaging, so every environment this runs in has it
from packaging.utils import canonicalize_name as normalized  # the PEP 503 form of a name

PROJECT = "reasoning-surgery"
LEFT_OUT = {PROJECT, "pip", "setuptools", "wheel"}


def pins() -> list[str]:
    """``name==version`` for every distribution here but :data:`LEFT_OUT`, sorted by name."""
    found = {}
    for distribution in metadata.distributions():
        name = normalized(distribution.metadata["Name"])
        if name not in LEFT_OUT:
            found[name] = distribution.version.split("+")[0]
    return [f"{name}=={version}" for name, version in sorted(found.items())]


def main(kept: list[str]) -> None:
    python = f"{platform.python_implementation()} {platform.python_version()}, {platform.system()} {platform.machine()}"
    print("# The exact versions `make setup` installs (pip constraints), made by `make lock` on " + python + ".")
    print(f"# Kept at the versions chosen before (LOCK_KEEP): {', '.join(kept) or 'none'}. The rest is the newest")
    print("# release pyproject.toml's ranges allowed that day. Refresh: `make lock`, then `make clean test`.")
    for line in pins():
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
