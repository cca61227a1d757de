"""Every public name imports, every __all__ is sorted, and the house rules on modules hold.

Modules are discovered (no hand-kept list): a new module is checked as soon as it exists.
"""

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import experiments
import interventions
import probes
import surgery

PACKAGES = [surgery, interventions, probes, experiments]
ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
MOST_LINES = 380  # "no module above about 350 lines"


def all_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package.__name__)
        names += [info.name for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".")]
    return sorted(names)


@pytest.mark.parametrize("name", all_modules())
def test_all_is_sorted_and_importable(name):
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if hasattr(module, "__path__"):
        assert exported, f"{name} is a package without __all__"
    if exported:
        assert list(exported) == sorted(exported), f"{name}.__all__ is not sorted"
        for public in exported:
            assert getattr(module, public) is not None


def test_discovery_finds_the_modules_of_the_block_packages():
    assert "interventions.steering" in all_modules() and "probes.mi" in all_modules()
    assert {"SteeringVector", "TokenMask"} <= set(interventions.__all__)
    assert {"MIEstimator", "ReasoningGraph"} <= set(probes.__all__)


@pytest.mark.parametrize("package", ["interventions", "probes"])
def test_every_block_module_has_its_test_file(package):
    """A block is one module and one test file: tests/test_<module>.py mirrors <package>/<module>.py."""
    modules = [info.name for info in pkgutil.iter_modules([str(ROOT / package)]) if not info.name.startswith("_")]
    missing = [m for m in modules if not (TESTS / f"test_{m}.py").exists()]
    assert not missing, f"no tests/test_<module>.py for {package} modules {missing}"


def test_modules_stay_small():
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for package in ("surgery", "interventions", "probes", "experiments", "benchmarks")
        for path in (ROOT / package).rglob("*.py")
    }
    large = {path: n for path, n in sizes.items() if n > MOST_LINES}
    assert not large, f"modules over {MOST_LINES} lines (split them by idea): {large}"


def test_layers_point_one_way():
    """surgery imports neither interventions nor probes, those two not each other, and nothing
    below experiments imports it (checked in fresh interpreters, so the modules already imported
    here keep their identity)."""
    checks = {
        "surgery": ("interventions", "probes", "experiments"),
        "interventions": ("probes", "experiments"),
        "probes": ("interventions", "experiments"),
    }
    for package, forbidden in checks.items():
        code = f"import sys, {package}; print(sorted(n for n in sys.modules if n.startswith({forbidden!r})))"
        found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        assert found == "[]", f"{package} imports {found}"
