"""Every public name imports, and every __all__ is sorted."""

import importlib

import pytest

PACKAGES = ["surgery", "surgery.kernels", "interventions", "probes"]
MODULES = [
    "surgery.blocks", "surgery.engine", "surgery.loading", "surgery.model", "surgery.sites", "surgery.step",
    "surgery.trace", "surgery.triggers", "surgery.kernels.reference", "surgery.cli", "surgery.demo",
    "surgery.text_match", "surgery.thoughts", "interventions.steering", "interventions.token_mask",
    "interventions.thinking_tokens", "interventions.recycling",
    "probes.mi", "probes.graph", "probes.thought_classifier", "surgery.results", "surgery.capture",
    "interventions.residual_add", "probes.record",
]


@pytest.mark.parametrize("name", PACKAGES + MODULES)
def test_all_is_sorted_and_importable(name):
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if name in PACKAGES:
        assert exported, f"{name} has no __all__"
    if exported:
        assert list(exported) == sorted(exported), f"{name}.__all__ is not sorted"
        for public in exported:
            assert getattr(module, public) is not None


def test_layers_point_one_way():
    """surgery imports neither interventions nor probes (checked in a fresh interpreter, so the
    modules already imported here keep their identity)."""
    import subprocess
    import sys

    code = "import sys, surgery; print(sorted(n for n in sys.modules if n.startswith(('interventions', 'probes'))))"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert found == "[]"
