"""Tests for nearest_centroid: the torch reference, the Triton kernel against it, the dispatcher.

Mirrors surgery/kernels/nearest_centroid.py, with the pieces of the op beside it (reference.py's
nearest_centroid and triton_nearest_centroid.py), as one test file per kernel op. Without a GPU
the Triton kernel runs in the interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1
before triton is imported).

Both backends use the expanded form ``||x||² - 2 x·c + ||c||²`` in float32 but sum in different
orders, so their distances agree to float32 rounding of ``||x||² + ||c||²`` (the ``scale`` of
the suite's tolerance policy), and their labels wherever the two nearest centers are further
apart than that; elsewhere each label must be *a* nearest center within the tolerance. On
integer data every sum is exact, and there the two agree bit for bit, ties included.
"""

import doctest
import importlib

import pytest
import torch
from tolerance import RTOL, assert_close

import surgery.kernels as kernels
from surgery.kernels import backend, kernel_backend, nearest_centroid, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (n, k, d): a single point; odd sizes; n over one block of points (64), k over one tile of
# centers (64), d over one tile of dims (32 for float32, 64 for 16-bit); a model's width.
SHAPES = [(1, 1, 1), (130, 70, 33), (200, 300, 100), (5, 3, 129), (3, 65, 576)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def needs_triton():
    pytest.importorskip("triton")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("SURGERY_KERNELS", raising=False)


def _inputs(n, k, d, dtype, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    centers = 2 * torch.randn(k, d, generator=gen)
    # points near random centers (as in K-means), plus an offset from the origin
    points = centers[torch.randint(k, (n,), generator=gen)] + torch.randn(n, d, generator=gen) + 1.5
    return points.to(dtype=dtype, device=device), centers.to(dtype=dtype, device=device)


def _exact_sq_distances(points, centers):
    """[n, k] squared distances of the stored values, in float64, the direct form."""
    diff = points.double()[:, None, :] - centers.double()[None, :, :]
    return (diff * diff).sum(-1)


def _check_against_exact(labels, sq_distances, points, centers):
    """Distances within tolerance of the exact ones; each label a nearest center within it;
    labels exact where the two nearest centers are further apart than the tolerance."""
    exact = _exact_sq_distances(points, centers)
    scale = float((points.double() ** 2).sum(1).max() + (centers.double() ** 2).sum(1).max())
    tol = RTOL[torch.float32] * scale
    best, best_label = exact.min(1)
    assert_close(sq_distances.double(), best, precision=torch.float32, scale=scale)
    chosen = exact.gather(1, labels[:, None].cpu())[:, 0]
    assert bool((chosen <= best + tol).all())
    if exact.shape[1] > 1:
        gap = exact.topk(2, dim=1, largest=False).values.diff(dim=1)[:, 0]
        clear = gap > 2 * tol
        assert torch.equal(labels.cpu()[clear], best_label[clear])
        return int(clear.sum())
    assert bool((labels == 0).all())
    return len(labels)


# --- Triton kernel vs reference -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference(needs_triton, shape, dtype):
    points, centers = _inputs(*shape, dtype)
    before = points.clone()

    labels, sq_distances = nearest_centroid(points, centers, backend="triton")
    expected_labels, expected = reference.nearest_centroid(points, centers)

    assert labels.shape == (shape[0],) and labels.dtype == torch.int64 and labels.device == points.device
    assert sq_distances.dtype == torch.float32 == expected.dtype
    scale = float((points.float() ** 2).sum(1).max() + (centers.float() ** 2).sum(1).max())
    assert_close(sq_distances, expected, precision=torch.float32, scale=scale)
    # both are right against the exact distances, and agree wherever the answer is clear
    clear = _check_against_exact(labels, sq_distances, points, centers)
    _check_against_exact(expected_labels, expected, points, centers)
    assert clear >= 0.9 * shape[0]  # the data leave few near ties: the label check means something
    assert torch.equal(points, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_bitwise_equal_on_integer_data_and_ties_go_to_the_lowest_index(needs_triton, dtype):
    gen = torch.Generator().manual_seed(1)
    centers = torch.randint(-3, 4, (70, 40), generator=gen).float()
    centers[40:50] = centers[:10]  # duplicates, in a later tile of centers
    centers[69] = centers[3]
    points = torch.cat([centers[torch.randint(70, (90,), generator=gen)],
                        torch.randint(-3, 4, (60, 40), generator=gen).float()])
    points, centers = points.to(dtype=dtype, device=DEVICE), centers.to(dtype=dtype, device=DEVICE)

    labels, sq_distances = nearest_centroid(points, centers, backend="triton")
    expected_labels, expected = reference.nearest_centroid(points, centers)

    assert torch.equal(labels, expected_labels) and torch.equal(sq_distances, expected)
    assert not bool(((labels >= 40) & (labels < 50)).any()) and not bool((labels == 69).any())
    assert bool((sq_distances[:90] == 0).all())


def test_triton_non_contiguous_inputs(needs_triton):
    points, centers = _inputs(100, 20, 2 * 45, torch.float32, seed=2)
    points, centers = points[::2, ::2], centers.t().contiguous().t()[:, ::2]  # strided
    assert not points.is_contiguous() and not centers.is_contiguous()
    labels, sq_distances = nearest_centroid(points, centers, backend="triton")
    _check_against_exact(labels, sq_distances, points, centers)


def test_triton_empty_and_no_width(needs_triton):
    points, centers = _inputs(0, 3, 8, torch.float32)
    labels, sq_distances = nearest_centroid(points, centers, backend="triton")
    assert labels.shape == (0,) and sq_distances.shape == (0,)
    labels, sq_distances = nearest_centroid(torch.zeros(4, 0, device=DEVICE), torch.zeros(2, 0, device=DEVICE),
                                            backend="triton")
    assert labels.tolist() == [0] * 4 and sq_distances.tolist() == [0.0] * 4


def test_triton_rejects_unsupported_dtype(needs_triton):
    points, centers = _inputs(4, 2, 3, torch.float64)
    with pytest.raises(ValueError, match="no torch.float64"):
        nearest_centroid(points, centers, backend="triton")


def test_the_kernel_uses_the_one_dtype_list(needs_triton):
    triton_nearest_centroid = importlib.import_module("surgery.kernels.triton_nearest_centroid")

    assert callable(triton_nearest_centroid.nearest_centroid_triton)
    assert kernels.nearest_centroid is nearest_centroid
    assert triton_nearest_centroid.TRITON_DTYPES is backend.TRITON_DTYPES


# --- dispatcher (the backend choice itself: tests/test_backend.py) ---------------------------


def test_env_torch_forces_torch(monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "torch")
    points, centers = _inputs(10, 3, 4, torch.float32)
    assert kernel_backend(points) == "torch"

    calls = []
    real = reference.nearest_centroid

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "nearest_centroid", spy)
    labels, _ = nearest_centroid(points, centers)
    assert len(calls) == 1
    assert torch.equal(labels, real(points, centers)[0])


def test_env_triton_forces_triton(needs_triton, monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "triton")
    points, centers = _inputs(10, 3, 4, torch.float32)
    assert kernel_backend(points) == "triton"
    monkeypatch.setattr(reference, "nearest_centroid", lambda *a, **k: pytest.fail("used torch"))
    labels, _ = nearest_centroid(points, centers)
    assert labels.shape == (10,)


def test_a_bad_env_value_reaches_the_dispatcher(monkeypatch):
    monkeypatch.setenv("SURGERY_KERNELS", "bogus")
    points, centers = _inputs(3, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="SURGERY_KERNELS"):
        nearest_centroid(points, centers)


def test_default_backend_matches_reference_exactly(no_env):
    points, centers = _inputs(50, 7, 12, torch.float32, device=torch.device("cpu"))
    labels, sq_distances = nearest_centroid(points, centers)
    expected_labels, expected = reference.nearest_centroid(points, centers)
    assert torch.equal(labels, expected_labels) and torch.equal(sq_distances, expected)


def test_reference_semantics():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    centers = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 4.0]])
    labels, sq_distances = reference.nearest_centroid(points, centers)
    assert labels.tolist() == [0, 0, 2]  # point 0 ties centers 0 and 1: the lowest index
    assert sq_distances.tolist() == [1.0, 0.0, 9.0]
    # float64 stays float64; 16-bit inputs are computed (and returned) in float32
    labels64, sq64 = reference.nearest_centroid(points.double(), centers.double())
    assert sq64.dtype == torch.float64 and torch.equal(labels64, labels)
    assert reference.nearest_centroid(points.bfloat16(), centers.bfloat16())[1].dtype == torch.float32
    points, centers = _inputs(300, 40, 16, torch.float64)
    _check_against_exact(*reference.nearest_centroid(points, centers), points, centers)


def test_float64_runs_in_torch_by_default(no_env):
    points, centers = _inputs(20, 4, 6, torch.float64)
    assert kernel_backend(points) == "torch"
    labels, sq_distances = nearest_centroid(points, centers)
    assert sq_distances.dtype == torch.float64
    assert torch.equal(labels, reference.nearest_centroid(points, centers)[0])


# --- input checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("points", "centers", "message"),
    [
        (torch.zeros(5, 4), torch.zeros(3, 5), "centers width 5 does not match points width d=4"),
        (torch.zeros(4), torch.zeros(3, 4), "points.unsqueeze(0)"),
        (torch.zeros(5, 4), torch.zeros(4), "centers.unsqueeze(0)"),
        (torch.zeros(5, 4), torch.zeros(0, 4), "pass at least one center"),
        (torch.zeros(5, 4, dtype=torch.long), torch.zeros(3, 4), "points.float()"),
        (torch.zeros(5, 4), torch.zeros(3, 4, dtype=torch.float64), "centers.to(points.dtype)"),
        (torch.zeros(5, 4), torch.zeros(3, 4, device="meta"), "centers.to(points.device)"),
    ],
    ids=["width", "points-1d", "centers-1d", "no-centers", "points-int", "dtype", "device"],
)
def test_input_errors(no_env, points, centers, message):
    with pytest.raises(ValueError) as info:
        nearest_centroid(points, centers)
    assert message in str(info.value)


def test_bad_backend_and_types(no_env):
    points, centers = _inputs(3, 2, 4, torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be"):
        nearest_centroid(points, centers, backend="cuda")
    with pytest.raises(TypeError, match="centers"):  # ours outside pytest, jaxtyping's under it
        nearest_centroid(points, centers.tolist())


def test_docstring_examples(no_env):
    for module in (importlib.import_module("surgery.kernels.nearest_centroid"), reference):
        result = doctest.testmod(module, verbose=False)
        assert result.failed == 0 and result.attempted > 0
