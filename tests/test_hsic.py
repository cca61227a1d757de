"""nHSIC and HSIC across examples, against a float64 numpy transcription of the paper's formula.

The reference (``reference_nhsic`` in conftest) uses an explicit H and inverse, one vector pair
at a time.
"""

import math

import pytest
import torch
from conftest import reference_nhsic
from tolerance import assert_close

from probes.hsic import hsic_across_examples, nhsic


@pytest.mark.parametrize("d", [64, 576])
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
def test_batched_nhsic_equals_float64_transcription(d, scale):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(3, d, generator=g) * scale
    x[:, 0] *= 20  # an outlier coordinate, as residual streams have
    y = torch.randn(d, generator=g) * scale
    got = nhsic(x, y)
    want = torch.tensor([reference_nhsic(xi, y) for xi in x], dtype=torch.float64)
    assert_close(got, want, rtol=1e-4)  # low-rank factorisations truncated at 1e-12 / 1e-13


@pytest.mark.parametrize("scale, low_rank", [(30.0, True), (1000.0, False)])
def test_both_token_side_paths_equal_the_transcription(scale, low_rank):
    """Residual-like vectors take the low-rank (pivoted Cholesky) path; very spread ones fall
    back to the exact LU solve. Both must give the formula's value."""
    from probes.hsic import KX_MAX_RANK, _kernel_factor

    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 576, generator=g, dtype=torch.float64) * scale
    x[:, :3] *= 15  # a few outlier coordinates
    y = torch.randn(576, generator=g, dtype=torch.float64) * 30
    assert (_kernel_factor(x, 50.0, KX_MAX_RANK) is not None) == low_rank
    want = torch.tensor([reference_nhsic(xi, y) for xi in x], dtype=torch.float64)
    assert_close(nhsic(x, y), want, rtol=1e-4)  # low-rank factorisations truncated at 1e-12 / 1e-13


@pytest.mark.parametrize("d, scale", [(64, 1.0), (576, 3.0), (576, 30.0)])
def test_the_sync_free_path_equals_the_early_stopping_one(d, scale):
    """nhsic_sync_free computes a fixed number of columns (zeros after a row converged): the same
    values as the path that stops when every row has converged, and the formula's."""
    from probes.hsic import _answer_factors, _nhsic_given_factors, nhsic_sync_free

    g = torch.Generator().manual_seed(d)
    x = torch.randn(5, d, generator=g, dtype=torch.float64) * scale
    x[:, 0] *= 20
    y = torch.randn(d, generator=g, dtype=torch.float64) * scale
    factors = _answer_factors(y, 50.0, 1e-5)
    values, converged = nhsic_sync_free(x, *factors, 50.0, 1e-5, rank=64)
    assert converged.all()
    assert_close(values, _nhsic_given_factors(x, *factors, 50.0, 1e-5), rtol=1e-9)
    assert_close(values, torch.tensor([reference_nhsic(xi, y) for xi in x], dtype=torch.float64), rtol=1e-4)
    _, too_few = nhsic_sync_free(x * 40, *factors, 50.0, 1e-5, rank=4)  # a spread-out kernel needs more columns
    assert not too_few.any()


def test_nhsic_broadcasts_a_batch_of_answers():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 48, generator=g) * 20, torch.randn(4, 48, generator=g) * 20
    want = torch.tensor([reference_nhsic(a, b) for a, b in zip(x, y)], dtype=torch.float64)
    assert_close(nhsic(x, y), want, rtol=1e-4)  # low-rank factorisations truncated at 1e-12 / 1e-13
    with pytest.raises((ValueError, TypeError)):  # jaxtyping's TypeError under pytest, ours otherwise
        nhsic(x, y[:, :10])


def _gaussian_pairs(rho, n=300, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, rho * x + math.sqrt(1 - rho**2) * noise


def test_hsic_across_examples_grows_with_correlation_and_vanishes_when_independent():
    scores = [hsic_across_examples(*_gaussian_pairs(rho)) for rho in (0.0, 0.3, 0.6, 0.9)]
    assert scores == sorted(scores) and len(set(scores)) == 4, scores
    assert scores[0] < 0.005 < scores[3], scores  # bias O(1/n) ≈ 0.003 at n = 300
    x, y = _gaussian_pairs(0.0, seed=3)
    assert hsic_across_examples(x, y, sigma=1.0) < 0.005
    assert hsic_across_examples(x, x, sigma=1.0) > 0.05


# ---- precision="float32": the released estimator ------------------------------------------


def released_nhsic_float32(x, y, sigma=50.0, epsilon=1e-5):
    """Reference, in our words, for ChnQ/MI-Peaks ``src/mi_estimators.py`` (commit bcee82c) on one
    pair of vectors, all in float32 on the CPU, one step at a time as the release orders them:

    each vector becomes m samples of width one; squared distances are expanded as
    ``x_i² - 2 x_i x_j + x_j²`` (a matrix product for the cross term) and made non-negative with
    ``abs``; the kernel is ``exp(-D / (2 σ² · width))``; it is centred by a product with an
    explicit ``I - 11ᵀ/m``; the ridge ``ε·m`` times the identity is added and the sum inverted
    with ``torch.inverse``; ``R`` is the centred kernel times that inverse; the score is the sum
    of the element-wise product of ``Rx`` with ``Ry`` transposed.
    """

    def ratio(v):
        samples = v.to(torch.float32).reshape(-1, 1)
        m, width = samples.shape
        norms = torch.sum(samples * samples, 1).reshape(-1, 1)
        cross = torch.mm(samples, samples.t())
        distances = torch.abs(norms.expand_as(cross) - 2 * cross + norms.t().expand_as(cross))
        kernel = torch.exp(-distances / (2.0 * sigma * sigma * width))
        centred = torch.mm(kernel, torch.eye(m) - (1.0 / m) * torch.ones([m, m]))
        return centred.mm(torch.inverse(centred + epsilon * m * torch.eye(m)))

    return torch.sum(torch.mul(ratio(x), ratio(y).t()))


@pytest.mark.parametrize("d, scale", [(64, 1.0), (64, 30.0), (576, 3.0), (576, 30.0)])
def test_float32_precision_equals_the_released_computation(d, scale):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2, d, generator=g) * scale
    x[:, 0] *= 20  # an outlier coordinate, as residual streams have
    y = torch.randn(d, generator=g) * scale
    got = nhsic(x, y, precision="float32")
    assert got.dtype == torch.float32
    assert_close(got, torch.stack([released_nhsic_float32(xi, y) for xi in x]))
    # a batch of answers pairs row with row, each against its own
    ys = torch.randn(2, d, generator=g) * scale
    assert_close(nhsic(x, ys, precision="float32"), torch.stack([released_nhsic_float32(a, b) for a, b in zip(x, ys)]))


def test_float64_stays_the_default_and_differs_from_float32():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 576, generator=g) * 3, torch.randn(576, generator=g) * 3
    default = nhsic(x, y)
    assert default.dtype == torch.float64
    assert torch.equal(nhsic(x, y, precision="float64"), default)
    want = torch.tensor([reference_nhsic(xi, y) for xi in x], dtype=torch.float64)
    assert_close(default, want, rtol=1e-4)  # low-rank factorisations truncated at 1e-12 / 1e-13
    # the released precision is far off on residual-like vectors (~1e-2 absolute, METHODS.md §2)
    assert (nhsic(x, y, precision="float32").double() - want).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"precision must be one of \('float64', 'float32'\)"):
        nhsic(x, y, precision="fp32")
