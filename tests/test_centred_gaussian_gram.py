"""Tests for centred_gaussian_gram: the torch reference, the Triton kernel against it, the dispatcher.

Mirrors surgery/kernels/centred_gaussian_gram.py, with the pieces of the op beside it
(reference.py's centred_gaussian_gram and triton_centred_gaussian_gram.py), as one test file per
kernel op. Without a GPU the Triton kernel runs in the interpreter on CPU tensors (conftest.py
sets TRITON_INTERPRET=1 before triton is imported).
"""

import doctest
import importlib

import numpy as np
import pytest
import torch
from conftest import reference_nhsic
from tolerance import assert_close

import surgery.kernels as kernels
from surgery.kernels import centred_gaussian_gram, kernel_backend, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Leading batch shapes and widths: batch 1, no batch, two batch dims; widths below one tile, odd
# and non-power-of-two, wider than the kernel's 32-row tile and 64-column block.
SHAPES = [(1, 1), (5,), (3, 33), (2, 130), (2, 2, 70)]
DTYPES = [torch.float64, torch.float32]
SCALES = [1.0, 40.0, 1000.0]  # residual-like spreads around σ = 50, and far beyond it


@pytest.fixture
def needs_triton():
    pytest.importorskip("triton")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("SURGERY_KERNELS", raising=False)


def _v(shape, dtype, scale=40.0, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    v[..., :1] *= 10  # an outlier coordinate, as residual streams have
    return v.to(dtype=dtype, device=device)


# --- Triton kernel vs reference -------------------------------------------------------------


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(needs_triton, shape, dtype, scale):
    v = _v(shape, dtype, scale)
    before = v.clone()

    out = centred_gaussian_gram(v, 50.0, backend="triton")
    expected = reference.centred_gaussian_gram(v, 50.0)

    assert out.shape == (*shape, shape[-1]) and out.dtype == torch.float64 and out.device == v.device
    # float64 rounding: expm1 and the row sums round differently, by a few ulps of the largest
    # entry; the suite's float64 tolerance (1e-9) holds with a wide margin
    assert_close(out, expected)
    assert float((out - expected).abs().max()) <= 1e-14 * max(float(expected.abs().max()), 1e-300)
    assert torch.equal(v, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_reads_half_inputs_exactly(needs_triton, dtype):
    v = _v((2, 70), dtype)
    assert_close(centred_gaussian_gram(v, 50.0, backend="triton"), reference.centred_gaussian_gram(v, 50.0))


def test_triton_wide_float64_rows(needs_triton):
    # 577 columns: nine column blocks with a partial last one, nineteen row tiles
    v = _v((1, 577), torch.float64, seed=4)
    out = centred_gaussian_gram(v, 50.0, backend="triton")
    assert_close(out, reference.centred_gaussian_gram(v, 50.0))
    assert float(out.sum(-1).abs().max()) < 1e-12  # K H has zero row sums


def test_triton_non_contiguous_input(needs_triton):
    base = _v((6, 2 * 45), torch.float64, seed=2)
    v = base.t()[::2]  # [45, 6]
    assert not v.is_contiguous()
    assert_close(centred_gaussian_gram(v, 30.0, backend="triton"), reference.centred_gaussian_gram(v, 30.0))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0,)], ids=str)
def test_triton_empty(needs_triton, shape):
    v = torch.zeros(shape, dtype=torch.float64, device=DEVICE)
    out = centred_gaussian_gram(v, 50.0, backend="triton")
    assert out.shape == (*shape, shape[-1]) and out.dtype == torch.float64


def test_triton_expm1_is_accurate_to_a_few_ulps(needs_triton):
    """Triton has no expm1 that runs in the interpreter; the kernel's own agrees with torch's to
    1e-15 relative, on both sides of its switch from the series to exp(x) - 1 at |x| = 0.3."""
    from surgery.kernels.triton_centred_gaussian_gram import expm1_triton

    f64 = dict(dtype=torch.float64, device=DEVICE)
    x = torch.cat([
        torch.linspace(-1.0, 1.0, 20001, **f64),
        -torch.logspace(-300, 2.5, 3000, **f64),  # the kernel's arguments are <= 0
        torch.logspace(-300, 2.5, 3000, **f64),
        -torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(DEVICE) * 40,
        torch.tensor([0.3, -0.3], **f64).nextafter(torch.zeros(2, **f64)),
        torch.tensor([0.3, -0.3, 5e-324, -5e-324], **f64),
    ])
    got, want = expm1_triton(x), torch.expm1(x)
    assert float(((got - want).abs() / want.abs()).max()) < 1e-15
    special = torch.tensor([0.0, -0.0, -800.0, float("-inf"), float("inf"), float("nan")], **f64)
    got = expm1_triton(special)
    assert got[:5].tolist() == [0.0, -0.0, -1.0, -1.0, float("inf")] and bool(got[5].isnan())
    assert got[1].signbit() and not got[0].signbit()


def test_the_kernel_uses_the_one_dtype_list(needs_triton):
    triton_module = importlib.import_module("surgery.kernels.triton_centred_gaussian_gram")
    dispatcher = importlib.import_module("surgery.kernels.centred_gaussian_gram")

    assert callable(triton_module.centred_gaussian_gram_triton)
    assert kernels.centred_gaussian_gram is centred_gaussian_gram
    assert triton_module.TRITON_V_DTYPES is dispatcher.TRITON_V_DTYPES


def test_nhsic_on_the_triton_backend_equals_the_transcription(needs_triton, monkeypatch):
    # probes.hsic builds every centred kernel through this op: Ry for the answer, and K̃x on the
    # exact path (spread-out states, so the pivoted Cholesky gives up).
    from probes.hsic import nhsic

    monkeypatch.setenv("SURGERY_KERNELS", "triton")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 40, generator=g, dtype=torch.float64) * 1000
    y = torch.randn(40, generator=g, dtype=torch.float64) * 30
    want = torch.tensor([reference_nhsic(xi, y) for xi in x], dtype=torch.float64)
    assert_close(nhsic(x, y), want, rtol=1e-4)  # Ry truncated at 1e-12, as in test_hsic.py


# --- dispatcher (the backend choice itself: tests/test_backend.py) ---------------------------


def test_env_torch_forces_torch(monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "torch")
    v = _v((2, 8), torch.float64)
    assert kernel_backend(v) == "torch"
    calls = []
    real = reference.centred_gaussian_gram
    monkeypatch.setattr(reference, "centred_gaussian_gram", lambda *a: calls.append(a) or real(*a))
    out = centred_gaussian_gram(v, 50.0)
    assert len(calls) == 1 and torch.equal(out, real(v, 50.0))


def test_env_triton_forces_triton(needs_triton, monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "triton")
    v = _v((2, 8), torch.float64)
    monkeypatch.setattr(reference, "centred_gaussian_gram", lambda *a: pytest.fail("used torch"))
    assert centred_gaussian_gram(v, 50.0).shape == (2, 8, 8)


def test_a_bad_env_value_reaches_the_dispatcher(monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "bogus")
    with pytest.raises(ValueError, match="SURGERY_KERNELS"):
        centred_gaussian_gram(_v((1, 4), torch.float64), 50.0)


def test_default_backend_is_the_reference_on_cpu(no_env):
    v = _v((3, 40), torch.float32, device=torch.device("cpu"))
    assert torch.equal(centred_gaussian_gram(v, 50.0), reference.centred_gaussian_gram(v, 50.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_float64_cuda_tensors_get_the_triton_kernel(needs_triton, no_env):
    # The op's own dtype list: float64 has a kernel here, unlike masked_add's TRITON_DTYPES.
    v = torch.zeros(2, 8, dtype=torch.float64, device="cuda")
    assert kernel_backend(v) == "torch"
    assert kernel_backend(v, dtypes=importlib.import_module("surgery.kernels.centred_gaussian_gram").TRITON_V_DTYPES) == "triton"


def test_reference_semantics():
    # K H from its definition: exp, an explicit H, float64
    v = torch.tensor([[0.0, 1.0, 4.0, -2.5]])
    k = torch.exp(-((v[0, :, None] - v[0, None, :]) ** 2).double() / (2 * 1.5**2))
    h = torch.eye(4, dtype=torch.float64) - 1 / 4
    assert_close(reference.centred_gaussian_gram(v, 1.5)[0], k @ h)
    # expm1 keeps the small entries that exp rounds away next to 1: (v_i - v_j)² / 2σ² ~ 1e-20
    tiny = reference.centred_gaussian_gram(torch.tensor([0.0, 1e-8], dtype=torch.float64), 50.0)
    assert float(tiny[0, 1]) == pytest.approx(np.expm1(-1e-16 / 5000) / 2, rel=1e-12)


# --- input checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("v", "sigma", "message"),
    [
        (torch.zeros(4), 0.0, "sigma must be a positive finite bandwidth"),
        (torch.zeros(4), -1.0, "sigma must be a positive finite bandwidth"),
        (torch.zeros(4), float("inf"), "sigma must be a positive finite bandwidth"),
        (torch.zeros(4), float("nan"), "sigma must be a positive finite bandwidth"),
        (torch.tensor(1.0), 50.0, "v.reshape(1)"),
        (torch.zeros(4, dtype=torch.long), 50.0, "v.double()"),
    ],
    ids=["sigma-0", "sigma-negative", "sigma-inf", "sigma-nan", "v-0d", "v-int"],
)
def test_input_errors(no_env, v, sigma, message):
    with pytest.raises(ValueError) as info:
        centred_gaussian_gram(v, sigma)
    assert message in str(info.value)


def test_bad_backend_and_sigma_types(no_env):
    v = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="backend must be"):
        centred_gaussian_gram(v, 50.0, backend="cuda")
    for sigma in (True, torch.tensor(50.0)):
        # ours outside pytest, jaxtyping's (the annotations are checked under pytest) here
        with pytest.raises(TypeError, match="sigma"):
            centred_gaussian_gram(v, sigma)


def test_triton_rejects_a_dtype_it_lacks(needs_triton, no_env):
    float8 = getattr(torch, "float8_e4m3fn", None)
    if float8 is None:
        pytest.skip("this torch has no float8")
    with pytest.raises(ValueError, match="no torch.float8_e4m3fn version"):
        centred_gaussian_gram(torch.zeros(2, 4).to(float8), 50.0, backend="triton")


def test_docstring_examples(no_env):
    for module in (importlib.import_module("surgery.kernels.centred_gaussian_gram"), reference):
        result = doctest.testmod(module, verbose=False)
        assert result.failed == 0 and result.attempted > 0
