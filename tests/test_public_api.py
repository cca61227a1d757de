"""Every public name imports, and every __all__ is sorted."""

import importlib

import pytest

PACKAGES = ["surgery", "surgery.kernels", "interventions", "probes"]
MODULES = [
    "surgery.blocks", "surgery.engine", "surgery.loading", "surgery.model", "surgery.sites", "surgery.step",
    "surgery.trace", "surgery.triggers", "surgery.kernels.reference", "surgery.cli", "surgery.demo",
    "surgery.text_match", "surgery.thoughts", "interventions.steering", "interventions.token_mask",
    "interventions.thinking_tokens", "interventions.recycling",
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
    import sys

    for name in list(sys.modules):
        if name.startswith(("interventions", "probes")):
            del sys.modules[name]
    importlib.import_module("surgery")
    assert not [n for n in sys.modules if n.startswith(("interventions", "probes"))]
