"""Tests for masked_add: the torch reference, the Triton kernel against it, the checked dispatcher.

Mirrors surgery/kernels/masked_add.py, with the pieces of the op beside it (reference.py's
masked_add and triton_masked_add.py), as one test file per kernel op. Without a GPU the Triton
kernel runs in the interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1 before triton
is imported).
"""

import doctest
import importlib

import pytest
import torch
from tolerance import assert_close

import surgery.kernels as kernels
from surgery.kernels import backend, kernel_backend, masked_add, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Odd and non-power-of-two widths; 2500 is wider than the kernel's largest BLOCK (1024), so the
# kernel loops over d_model with a partial last block.
SHAPES = [(1, 1, 1), (3, 7, 576), (2, 5, 33), (4, 3, 1000), (2, 3, 2500)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALPHAS = [0.0, 1.0, -2.5]
MASKS = ["random", "none", "all"]


@pytest.fixture
def needs_triton():
    pytest.importorskip("triton")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("SURGERY_KERNELS", raising=False)


def _inputs(shape, dtype, mask_kind="random", seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    batch, pos, d_model = shape
    hidden = (3 * torch.randn(shape, generator=gen)).to(dtype=dtype, device=device)
    vector = torch.randn(d_model, generator=gen).to(dtype=dtype, device=device)
    if mask_kind == "random":
        mask = torch.rand(batch, pos, generator=gen) < 0.5
    elif mask_kind == "none":
        mask = torch.zeros(batch, pos, dtype=torch.bool)
    else:
        mask = torch.ones(batch, pos, dtype=torch.bool)
    return hidden, mask.to(device), vector


# --- Triton kernel vs reference -------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(needs_triton, shape, dtype, mask_kind, alpha):
    hidden, mask, vector = _inputs(shape, dtype, mask_kind)
    before = hidden.clone()

    out = masked_add(hidden, mask, vector, alpha, backend="triton")
    expected = reference.masked_add(hidden, mask, vector, alpha)

    assert out.shape == hidden.shape and out.dtype == dtype and out.device == hidden.device
    assert_close(out, expected)  # the suite's tolerance for the dtype
    # Unmasked positions are copied bit for bit; the input is untouched; the output is new.
    assert torch.equal(out[~mask], hidden[~mask])
    assert torch.equal(hidden, before)
    assert out.data_ptr() != hidden.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_bitwise_equal_to_reference(needs_triton, dtype):
    # Stronger than assert_close: the kernel rounds alpha * vector to the storage dtype and then
    # the sum, with round-to-nearest-even, exactly as torch does.
    hidden, mask, vector = _inputs((3, 5, 777), dtype, seed=1)
    for alpha in (0.1, -2.5, 1e-3, 7.77):
        out = masked_add(hidden, mask, vector, alpha, backend="triton")
        assert torch.equal(out, reference.masked_add(hidden, mask, vector, alpha))


def test_triton_non_contiguous_inputs(needs_triton):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(7, 3, 2 * 65, generator=gen).to(DEVICE)
    hidden = base.transpose(0, 1)[:, :, ::2]  # [3, 7, 65], strided in every dim
    mask = (torch.rand(7, 3, generator=gen) < 0.5).to(DEVICE).t()
    vector = torch.randn(2 * 65, generator=gen).to(DEVICE)[::2]
    assert not hidden.is_contiguous() and not mask.is_contiguous()
    assert not vector.is_contiguous()
    before = hidden.clone()

    out = masked_add(hidden, mask, vector, -2.5, backend="triton")

    assert_close(out, reference.masked_add(hidden, mask, vector, -2.5))
    assert torch.equal(out[~mask], hidden[~mask])
    assert torch.equal(hidden, before)


# --- one vector per row (a per-row parameter table) -------------------------------------------


def _per_row(shape, dtype, seed=3):
    hidden, mask, _ = _inputs(shape, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    table = torch.randn(shape[0], shape[2], generator=gen).to(dtype=dtype, device=DEVICE)
    return hidden, mask, table


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_per_row_vectors_equal_each_row_alone(dtype):
    hidden, mask, table = _per_row((4, 3, 33), dtype)
    out = reference.masked_add(hidden, mask, table, 0.5)
    for row in range(4):  # row r gets masked_add with its own vector, bit for bit
        alone = reference.masked_add(hidden[row : row + 1], mask[row : row + 1], table[row], 0.5)
        assert torch.equal(out[row : row + 1], alone)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 3, 33), (3, 1, 2500)], ids=str)
def test_triton_per_row_vectors_bitwise_equal_to_reference(needs_triton, shape, dtype):
    hidden, mask, table = _per_row(shape, dtype)
    for alpha in (1.0, -2.5):
        out = masked_add(hidden, mask, table, alpha, backend="triton")
        assert torch.equal(out, reference.masked_add(hidden, mask, table, alpha))


def test_per_row_vectors_need_one_row_per_batch_row():
    hidden, mask, table = _per_row((4, 3, 8), torch.float32)
    with pytest.raises(ValueError, match="one row per batch row, got 3 rows for a batch of 4"):
        masked_add(hidden, mask, table[:3])
    with pytest.raises(ValueError, match=r"\[d_model\] \(one for every row\) or \[batch, d_model\]"):
        masked_add(hidden, mask, table[:, None, :])


@pytest.mark.parametrize("shape", [(0, 3, 16), (2, 0, 16), (0, 0, 8)], ids=str)
def test_triton_empty(needs_triton, shape):
    hidden, mask, vector = _inputs(shape, torch.float32)
    out = masked_add(hidden, mask, vector, 1.0, backend="triton")
    assert out.shape == hidden.shape and out.dtype == hidden.dtype


def test_triton_rejects_unsupported_dtype(needs_triton):
    hidden, mask, vector = _inputs((2, 3, 8), torch.float64)
    with pytest.raises(ValueError, match="no torch.float64"):
        masked_add(hidden, mask, vector, backend="triton")


def test_the_kernel_uses_the_one_dtype_list(needs_triton):
    triton_masked_add = importlib.import_module("surgery.kernels.triton_masked_add")

    assert callable(triton_masked_add.masked_add_triton)
    assert kernels.masked_add is masked_add
    # stated once, in backend.py: the choice of backend and the kernel agree by construction
    assert triton_masked_add.TRITON_DTYPES is backend.TRITON_DTYPES


# --- dispatcher (the backend choice itself: tests/test_backend.py) ---------------------------


def test_env_torch_forces_torch(monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "torch")
    hidden, mask, vector = _inputs((2, 3, 8), torch.float32)
    assert kernel_backend(hidden) == "torch"

    calls = []
    real = reference.masked_add

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "masked_add", spy)
    out = masked_add(hidden, mask, vector, 2.0)
    assert len(calls) == 1
    assert torch.equal(out, real(hidden, mask, vector, 2.0))


def test_env_triton_forces_triton(needs_triton, monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "triton")
    hidden, mask, vector = _inputs((2, 3, 8), torch.float32)
    assert kernel_backend(hidden) == "triton"
    monkeypatch.setattr(reference, "masked_add", lambda *a, **k: pytest.fail("used torch"))
    out = masked_add(hidden, mask, vector, 2.0)
    assert out.shape == hidden.shape


def test_a_bad_env_value_reaches_the_dispatcher(monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "bogus")
    hidden, mask, vector = _inputs((1, 2, 4), torch.float32)
    with pytest.raises(ValueError, match="SURGERY_KERNELS"):
        masked_add(hidden, mask, vector)


def test_default_backend_matches_reference_exactly(no_env):
    hidden, mask, vector = _inputs((3, 7, 576), torch.float32, device=torch.device("cpu"))
    out = masked_add(hidden, mask, vector, -2.5)
    assert torch.equal(out, reference.masked_add(hidden, mask, vector, -2.5))
    assert out.data_ptr() != hidden.data_ptr()


def test_reference_semantics():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    mask = torch.tensor([[False, True]])
    out = reference.masked_add(hidden, mask, torch.tensor([10.0, 20.0]), alpha=0.5)
    assert torch.equal(out, torch.tensor([[[1.0, 2.0], [8.0, 14.0]]]))
    assert torch.equal(hidden, torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]))


# --- input checks ---------------------------------------------------------------------------


def _bad(hidden=None, mask=None, vector=None):
    h, m, v = _inputs((2, 3, 8), torch.float32, device=torch.device("cpu"))
    return (
        h if hidden is None else hidden,
        m if mask is None else mask,
        v if vector is None else vector,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (_bad(vector=torch.zeros(7)), "vector width 7 does not match hidden's last dim d_model=8"),
        (_bad(vector=torch.zeros(1, 8)), "vector.reshape(-1)"),
        (_bad(mask=torch.ones(3, 2, dtype=torch.bool)), "mask shape (3, 2) does not match"),
        (_bad(mask=torch.ones(2, 3, dtype=torch.long)), "mask.bool()"),
        (_bad(hidden=torch.zeros(3, 8)), "hidden.unsqueeze(0)"),
        (_bad(hidden=torch.zeros(2, 3, 8, dtype=torch.long)), "floating dtype"),
        (_bad(vector=torch.zeros(8, dtype=torch.float16)), "vector.to(hidden.dtype)"),
        (_bad(vector=torch.zeros(8, device="meta")), "vector.to(hidden.device)"),
        (_bad(mask=torch.ones(2, 3, dtype=torch.bool, device="meta")), "mask.to(hidden.device)"),
    ],
    ids=["width", "vector-2d", "mask-shape", "mask-dtype", "hidden-2d", "hidden-int",
         "vector-dtype", "vector-device", "mask-device"],
)
def test_input_errors(no_env, args, message):
    with pytest.raises(ValueError) as info:
        masked_add(*args)
    assert message in str(info.value)


def test_bad_backend_and_alpha(no_env):
    hidden, mask, vector = _bad()
    with pytest.raises(ValueError, match="backend must be"):
        masked_add(hidden, mask, vector, backend="cuda")
    with pytest.raises(TypeError, match="alpha"):
        masked_add(hidden, mask, vector, torch.tensor(2.0))


def test_docstring_examples(no_env):
    for module in (importlib.import_module("surgery.kernels.masked_add"), reference):
        result = doctest.testmod(module, verbose=False)
        assert result.failed == 0 and result.attempted > 0
