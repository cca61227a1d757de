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
