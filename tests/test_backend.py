"""Tests for surgery.kernels.backend: which implementation runs, and the SURGERY_KERNELS override."""

import doctest

import pytest
import torch

from surgery.kernels import backend
from surgery.kernels.backend import kernel_backend, require_triton, triton_available


@pytest.fixture
def needs_triton():
    pytest.importorskip("triton")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("SURGERY_KERNELS", raising=False)


@pytest.mark.parametrize("value", [None, "", "auto"])
def test_backend_cpu_tensor_is_torch(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("SURGERY_KERNELS", raising=False)
    else:
        monkeypatch.setenv("SURGERY_KERNELS", value)
    assert kernel_backend(torch.zeros(2, 3, 4)) == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_backend_cuda_tensor_is_triton_when_available(no_env):
    expected = "triton" if triton_available() else "torch"
    assert kernel_backend(torch.zeros(2, 3, 4, device="cuda")) == expected
    assert kernel_backend(torch.zeros(2, 3, 4, device="cuda", dtype=torch.float64)) == "torch"


def test_env_forces_either_backend(needs_triton, monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "torch")
    assert kernel_backend(torch.zeros(2, 3, 4)) == "torch"
    monkeypatch.setenv("SURGERY_KERNELS", "triton")
    assert kernel_backend(torch.zeros(2, 3, 4)) == "triton"


def test_env_is_read_at_each_call(monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "torch")
    assert kernel_backend(torch.zeros(1)) == "torch"
    monkeypatch.setenv("SURGERY_KERNELS", "bogus")
    with pytest.raises(ValueError):
        kernel_backend(torch.zeros(1))


@pytest.mark.parametrize("value", ["bogus", "Triton", "cuda", " torch"])
def test_bad_env_value(monkeypatch, value):
    monkeypatch.setenv("SURGERY_KERNELS", value)
    with pytest.raises(ValueError, match="allowed values are"):
        kernel_backend(torch.zeros(1))


def test_triton_requested_but_missing_says_how_to_fix_it(monkeypatch):
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="pip install triton"):
        require_triton()
    monkeypatch.setenv("SURGERY_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="SURGERY_KERNELS=torch or auto"):
        kernel_backend(torch.zeros(1))
    monkeypatch.setenv("SURGERY_KERNELS", "auto")
    assert kernel_backend(torch.zeros(1)) == "torch"


def test_triton_dtypes_are_the_floating_storage_dtypes():
    assert backend.TRITON_DTYPES == (torch.float16, torch.bfloat16, torch.float32)


def test_docstring_examples(no_env):
    result = doctest.testmod(backend, verbose=False)
    assert result.failed == 0 and result.attempted > 0
