"""nHSIC, the paper's per-token MI estimator, and plain HSIC across examples.

Paper: Qian et al., "Demystifying Reasoning Dynamics with Mutual Information: Thinking Tokens are
Information Peaks in LLM Reasoning", arXiv 2506.02867, section 3 (the nHSIC estimator). The
formulas we follow are in ``../shared/METHODS.md`` section 2.

:func:`nhsic` is the paper-compatible score ``tr(Rx Ry)`` between two vectors whose d
coordinates are taken as d paired scalar samples; :func:`hsic_across_examples` is HSIC in the
usual sense, across examples (not the paper's score). :class:`probes.mi.MIEstimator` calls the
two halves of :func:`nhsic` itself: ``_answer_factors`` once per problem (``Ry``) and
``_nhsic_given_factors`` for every token.

Deviations from the released code:

- float64 throughout (the release is float32): the kernel matrices are nearly all ones and the
  ridge system is ill-conditioned, so float32 is off by 1e-2 to 1e-1 relative from an exact
  float64 transcription on width 64 and 576 vectors (measured); float64 matches it to ~1e-8.
  ``K - 1`` is computed with ``expm1`` so the centred kernel keeps its small entries exactly.
- the same value, computed cheaper: ``Ry`` is computed once per problem (by the probe, when it
  is bound) and kept as its SVD truncated at singular values below ``1e-12`` of the largest (it
  is numerically low-rank, r ≈ 20–300 of d = 576–1536). The token side is low-rank too: a
  batched pivoted Cholesky gives ``Kx ≈ L Lᵀ`` (rank q ≈ 24 on real SmolLM2 states, stopped at a
  residual of 1e-13), and ``tr(K̃x (K̃x + εmI)⁻¹ Ry) = tr((Gᵀ L + εmI)⁻¹ (Gᵀ Uy)(Vyᵀ L))`` with
  ``G = H L`` (push-through identity): ``O(d·q² + d·q·r + q³)`` per token instead of ≈ 12·d³.
  When q would exceed ``min(KX_MAX_RANK, d/3)`` the step falls back to one exact batched LU. The
  tests check both paths against the literal float64 formula to 1e-4 relative.

``precision="float32"`` (:data:`PRECISIONS`) is the released estimator's precision, for checking
published series: the released ``mi_estimators.hsic_normalized_cca`` op for op, in float32, one
vector at a time (:func:`_released_ratio_float32`). Its values differ from float64 by ~1e-2
absolute and may be negative, and they move by as much when the states move by float32 rounding
(a batched or cached forward, another device): a published float32 series is reproducible to
~1e-2, not bit for bit. It costs ≈ 6·d³ FLOPs per token (no low-rank shortcut).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from surgery.kernels import centred_gaussian_gram

__all__ = ["PRECISIONS", "RY_RANK_TOLERANCE", "hsic_across_examples", "nhsic", "nhsic_sync_free"]

PRECISIONS = ("float64", "float32")
"""How nHSIC is computed.

- ``"float64"`` (default): the formula in float64, cheaper but equal (module docstring).
- ``"float32"``: the released estimator's precision, for checking published series: the
  operations of ChnQ/MI-Peaks ``src/mi_estimators.py`` (commit bcee82c) in their order, in
  float32, with ``torch.inverse`` (:func:`_released_ratio_float32`).
"""


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision must be one of {PRECISIONS}, got {precision!r}: 'float64' (default) computes the formula "
            "exactly, 'float32' as the released code does (to check published series)"
        )


def _centred_kernel(v: Float[Tensor, "*batch d"], sigma: float) -> Float[Tensor, "*batch d d"]:
    """Right-centred Gaussian kernel ``K H`` over the coordinates of ``v``, float64.

    ``K H = (K - 1) H`` because ``1 1ᵀ H = 0``; ``K - 1`` from ``expm1`` keeps the small entries
    that ``exp`` rounds away next to 1, and right-multiplying by ``H`` subtracts row means. One
    fused op (:func:`surgery.kernels.centred_gaussian_gram`, a Triton kernel on CUDA).
    """
    return centred_gaussian_gram(v, sigma)


def _ridge(centred: Float[Tensor, "*batch d d"], epsilon: float) -> Float[Tensor, "*batch d d"]:
    """``K̃ + ε·m·I`` (a new tensor)."""
    m = centred.shape[-1]
    return centred + (epsilon * m) * torch.eye(m, dtype=centred.dtype, device=centred.device)


def _ratio_matrix(v: Float[Tensor, "*batch d"], sigma: float, epsilon: float) -> Float[Tensor, "*batch d d"]:
    """``R = K̃ (K̃ + ε·m·I)⁻¹`` in float64 (the per-problem ``Ry``)."""
    centred = _centred_kernel(v.to(torch.float64), sigma)
    return torch.linalg.solve(_ridge(centred, epsilon), centred, left=False)


# Ry's singular values decay exponentially (1-D Gaussian kernels are numerically low-rank);
# those below this fraction of the largest are float64 noise-level and are dropped.
RY_RANK_TOLERANCE = 1e-12


def _answer_factors(
    y: Float[Tensor, "*ybatch d"], sigma: float, epsilon: float
) -> tuple[Float[Tensor, "*ybatch d r"], Float[Tensor, "*ybatch d r"]]:
    """``(left, right)`` with ``Ry ≈ left @ rightᵀ`` (truncated SVD, float64), once per problem.

    Rows of a batch share the largest kept rank ``r``; a row's extra columns are zeros.
    """
    u, s, vh = torch.linalg.svd(_ratio_matrix(y, sigma, epsilon))
    keep = s > RY_RANK_TOLERANCE * s[..., :1]
    r = max(int(keep.sum(dim=-1).max()), 1)
    return u[..., :r] * (s * keep)[..., None, :r], vh[..., :r, :].transpose(-1, -2)


# Pivoted Cholesky stops when the largest residual diagonal entry of Kx falls below this; the
# low-rank path is used only when every token of a step gets there within KX_MAX_RANK columns.
KX_TOLERANCE = 1e-13
KX_MAX_RANK = 160


def _kernel_factor(v: Float[Tensor, "n d"], sigma: float, max_rank: int) -> Float[Tensor, "n d q"] | None:
    """``L`` with ``Kx ≈ L Lᵀ`` (pivoted Cholesky, float64, batched over rows), or None.

    1-D Gaussian kernels are numerically low-rank: ``q`` grows with the spread of the
    coordinates over σ, not with ``d``. Returns None when some row needs more than
    ``max_rank`` columns (the caller then solves exactly).
    """
    factor, residual = _pivoted_cholesky(v, sigma, max_rank, stop_early=True)
    return None if bool((residual >= KX_TOLERANCE).any()) else factor


def _pivoted_cholesky(v: Float[Tensor, "n d"], sigma: float, rank: int, stop_early: bool) -> tuple[Tensor, Tensor]:
    """Up to ``rank`` pivoted-Cholesky columns of each row's Gaussian kernel: ``(L, residual)``
    with ``residual`` the largest remaining diagonal entry per row. ``stop_early``: ask the host
    every 8 columns whether every row is below :data:`KX_TOLERANCE`, and stop there; otherwise
    compute all ``rank`` columns (a row's columns after it converged are zeros)."""
    n, d = v.shape
    rows = torch.arange(n, device=v.device)
    factor = torch.zeros(n, d, rank, dtype=torch.float64, device=v.device)
    residual = torch.ones(n, d, dtype=torch.float64, device=v.device)  # diag(Kx - L Lᵀ)
    scale = -0.5 / sigma**2
    for j in range(rank):
        largest, pivot = residual.max(dim=-1)
        if stop_early and j % 8 == 0 and bool((largest < KX_TOLERANCE).all()):  # one sync per 8 columns
            return factor[..., :j], largest
        live = largest >= KX_TOLERANCE
        column = torch.exp((v - v[rows, pivot][:, None]).square() * scale)
        column = column - torch.einsum("ndj,nj->nd", factor[..., :j], factor[rows, pivot, :j])
        column = torch.where(live[:, None], column / largest.clamp(min=KX_TOLERANCE).sqrt()[:, None], 0.0)
        factor[..., j] = column
        residual = residual - column.square()
    return factor, residual.max(dim=-1).values


def _kernel_factor_fixed(v: Float[Tensor, "n d"], sigma: float, rank: int) -> tuple[Float[Tensor, "n d q"], Tensor]:
    """:func:`_kernel_factor` without asking the host anything: exactly ``rank`` columns.

    Returns ``(L, converged)``: a row's columns after its residual fell below
    :data:`KX_TOLERANCE` are zeros (which leave :func:`_nhsic_low_rank` unchanged), so a
    converged row's factor is the early-stopping one padded with zeros; ``converged[i]`` is
    False for a row that still had residual after ``rank`` columns (its ``L`` is the best rank
    ``rank`` pivoted factor, an approximation). Fixed work per call, no data-dependent branch:
    what a probe publishing a signal inside a captured step needs.
    """
    factor, residual = _pivoted_cholesky(v, sigma, rank, stop_early=False)
    return factor, residual < KX_TOLERANCE


def nhsic_sync_free(
    x: Float[Tensor, "n d"], left: Float[Tensor, "*rbatch d r"], right: Float[Tensor, "*rbatch d r"], sigma: float,
    epsilon: float, rank: int | None = None,
) -> tuple[Float[Tensor, " n"], Tensor]:
    """``tr(Rx Ry)`` per row with ``Ry = left @ rightᵀ`` and no host sync: ``(values, converged)``.

    The low-rank path of :func:`_nhsic_given_factors` with a fixed number of pivoted-Cholesky
    columns (``rank``, default ``min(KX_MAX_RANK, d // 3)``, :func:`_kernel_factor_fixed`):
    equal to it for every converged row (tested); a row whose kernel needs more columns gets
    the value of its rank-``rank`` approximation and ``converged`` False.
    """
    rank = min(KX_MAX_RANK, max(x.shape[-1] // 3, 1)) if rank is None else rank
    factor, converged = _kernel_factor_fixed(x.to(torch.float64), sigma, rank)
    left = left.to(device=x.device, dtype=torch.float64)
    right = right.to(device=x.device, dtype=torch.float64)
    return _nhsic_low_rank(factor, left, right, epsilon), converged


def _nhsic_low_rank(
    factor: Float[Tensor, "n d q"], left: Float[Tensor, "*rbatch d r"], right: Float[Tensor, "*rbatch d r"], epsilon: float
) -> Float[Tensor, " n"]:
    """``tr(K̃x (K̃x + cI)⁻¹ Ry)`` for ``K̃x = L (H L)ᵀ``, ``c = ε·m``, by the push-through identity:
    ``L Gᵀ (L Gᵀ + cI)⁻¹ = L (Gᵀ L + cI)⁻¹ Gᵀ`` with ``G = H L``, so the trace is
    ``tr((Gᵀ L + cI)⁻¹ (Gᵀ left)(rightᵀ L))``: ``O(d·q·r + q³)`` per token instead of ``O(d³)``."""
    d, q = factor.shape[-2:]
    centred = factor - factor.mean(dim=-2, keepdim=True)  # G = H L
    gram = centred.transpose(-1, -2) @ factor + (epsilon * d) * torch.eye(q, dtype=factor.dtype, device=factor.device)
    inner = (centred.transpose(-1, -2) @ left) @ (right.transpose(-1, -2) @ factor)
    solved, _ = torch.linalg.solve_ex(gram, inner)
    return solved.diagonal(dim1=-2, dim2=-1).sum(-1)


def _nhsic_given_factors(
    x: Float[Tensor, "*batch d"],
    left: Float[Tensor, "*rbatch d r"],
    right: Float[Tensor, "*rbatch d r"],
    sigma: float,
    epsilon: float,
) -> Float[Tensor, "*batch"]:
    """``tr(Rx Ry)`` with ``Ry = left @ rightᵀ``: one batched LU solve, float64, no host sync.

    ``tr(K̃x (K̃x + εmI)⁻¹ left rightᵀ) = Σ (K̃x Z) ∘ right`` with ``Z = (K̃x + εmI)⁻¹ left``:
    an LU (⅔·d³) and ``O(d²·r)`` per token, instead of the ≈ 12·d³ of the released code.
    """
    left = left.to(device=x.device, dtype=torch.float64)
    right = right.to(device=x.device, dtype=torch.float64)
    if x.ndim == 2 and left.ndim in (2, 3):
        factor = _kernel_factor(x.to(torch.float64), sigma, min(KX_MAX_RANK, x.shape[-1] // 3))
        if factor is not None:
            return _nhsic_low_rank(factor, left, right, epsilon)
    centred = _centred_kernel(x.to(torch.float64), sigma)
    shape = centred.shape[:-2] + left.shape[-2:]
    solved, _ = torch.linalg.solve_ex(_ridge(centred, epsilon), left.expand(shape))  # solve_ex: no sync
    return ((centred @ solved) * right).sum(dim=(-2, -1))


def _released_ratio_float32(v: Float[Tensor, "*batch d"], sigma: float, epsilon: float) -> Float[Tensor, "*batch d d"]:
    """``R = K̃ (K̃ + ε·m·I)⁻¹`` as the released code computes it, in float32, one vector at a time.

    The operations of ``kernelmat`` and ``hsic_normalized_cca`` in ChnQ/MI-Peaks
    ``src/mi_estimators.py`` (commit bcee82c), in their order: squared distances by the
    expansion ``x_i² - 2·x_i·x_j + x_j²`` (its cancellation included) then ``abs``; the kernel
    ``exp(-D / (2σ²))``; centring as a product with an explicit ``H = I - (1/m)·11ᵀ``; the
    ridge added as ``(ε·m)·I``; ``torch.inverse`` (here its sync-free twin
    :func:`torch.linalg.inv_ex`, the same LU); ``K̃ @ inverse``.

    Each vector is its own call, as released: the ridge system is so ill-conditioned in float32
    that a batched inversion (another LAPACK path) moves the score by ~1e-2 relative, so the
    batch is a loop. On one CPU this equals the released computation on the same vectors (tested
    against a transcription); another LAPACK path (a GPU, other threads) may differ by as much
    as batched and single inversion do on one CPU (~1e-2 relative, measured).
    Matrix products follow PyTorch's float32 setting (TF32 off by default; keep it off here).
    """
    v = v.to(torch.float32)
    m = v.shape[-1]
    eye = torch.eye(m, dtype=torch.float32, device=v.device)
    centring = eye - (1.0 / m) * torch.ones(m, m, dtype=torch.float32, device=v.device)

    def one(vector: Tensor) -> Tensor:
        column = vector[:, None]  # the released code reshapes the vector to m samples of width 1
        squares = (column * column).sum(1, keepdim=True)
        distance = (squares - 2 * (column @ column.T) + squares.T).abs()
        kernel = torch.exp(-distance / (2.0 * sigma * sigma * 1))  # the release scales by the sample width, 1
        centred = kernel @ centring
        inverse, _ = torch.linalg.inv_ex(centred + epsilon * m * eye)
        return centred @ inverse

    flat = v.reshape(-1, m)
    return torch.stack([one(vector) for vector in flat]).reshape(*v.shape, m)


def _nhsic_released_float32(
    x: Float[Tensor, "*xbatch d"], ry: Float[Tensor, "*rbatch d d"], sigma: float, epsilon: float
) -> Float[Tensor, "..."]:
    """``sum(Rx ∘ Ryᵀ)`` in float32, as released, given the answers' ``Ry`` (float32, from
    :func:`_released_ratio_float32`, computed once per problem; leading dimensions broadcast
    against ``x``'s). No host sync; one pair at a time (see :func:`_released_ratio_float32`)."""
    rx = _released_ratio_float32(x, sigma, epsilon)
    rx, ry = torch.broadcast_tensors(rx, ry.to(device=x.device, dtype=torch.float32))
    pairs = zip(rx.reshape(-1, *rx.shape[-2:]), ry.reshape(-1, *ry.shape[-2:]))
    return torch.stack([(a * b.T).sum() for a, b in pairs]).reshape(rx.shape[:-2])


def nhsic(
    x: Float[Tensor, "*xbatch d"], y: Float[Tensor, "*ybatch d"], sigma: float = 50.0, epsilon: float = 1e-5,
    precision: str = "float64",
) -> Float[Tensor, "..."]:
    """Paper-compatible normalised HSIC between two vectors, as in arXiv 2506.02867 section 3.

    The ``d`` coordinates of ``x`` and ``y`` are ``m = d`` paired scalar samples. With Gaussian
    kernels ``K[i, j] = exp(-(v_i - v_j)² / (2σ²))``, ``H = I - 11ᵀ/m``, ``K̃ = K H`` and
    ``R = K̃ (K̃ + ε·m·I)⁻¹``, the score is ``tr(Rx Ry)``. Computed in float64 (see the module
    docstring for why) as one batched solve; leading dimensions of ``x`` and ``y`` broadcast.

    Args:
        x: ``[..., d]``, e.g. one per-token state per row.
        y: ``[d]`` (one answer state) or ``[..., d]`` broadcastable against ``x``.
        sigma: kernel bandwidth (the paper uses 50, grid 50–400).
        epsilon: ridge (1e-5 in the paper).
        precision: ``"float64"`` (default) or ``"float32"``, the released estimator's precision,
            for checking published series: the released code's operations in float32
            (:data:`PRECISIONS`; ~1e-2 absolute from float64, sometimes negative).

    Returns:
        tensor of the broadcast leading shape, float64 (float32 with ``precision="float32"``).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(3, 64, generator=g) * 30, torch.randn(64, generator=g) * 30
        >>> nhsic(x, y).shape
        torch.Size([3])
        >>> bool(nhsic(y, y) > nhsic(x[0], y))        # a vector depends most on itself
        True
        >>> released = nhsic(x, y, precision="float32")   # the released code's float32 computation
        >>> released.dtype, bool((released.double() - nhsic(x, y)).abs().max() < 0.1)
        (torch.float32, True)
    """
    _check_precision(precision)
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"nhsic pairs coordinates: x has width {x.shape[-1]}, y has {y.shape[-1]}; they must match")
    if precision == "float32":  # one pair at a time, as released (see _released_ratio_float32)
        return _nhsic_released_float32(x, _released_ratio_float32(y.to(x.device), sigma, epsilon), sigma, epsilon)
    return _nhsic_given_factors(x, *_answer_factors(y.to(x.device), sigma, epsilon), sigma, epsilon)


def hsic_across_examples(
    X: Float[Tensor, "n dx"], Y: Float[Tensor, "n dy"], sigma: float | None = None
) -> float:
    """Plain biased HSIC across ``n`` paired examples: MI in the usual sense.

    This is the distribution-level dependence between two random vectors, measured across
    examples (e.g. states at one position over many problems vs their answer states), *not* the
    paper's per-token score (:func:`nhsic`, which treats the coordinates of one pair as samples).
    ``HSIC_b = tr(K H L H) / (n - 1)²`` (Gretton et al. 2005) with Gaussian kernels on whole
    vectors, ``exp(-‖a - b‖² / (2σ²))``; when ``sigma`` is None each side uses the median
    heuristic (σ = median pairwise distance between distinct examples). Float64.

    Args:
        X: ``[n, dx]`` samples of the first variable.
        Y: ``[n, dy]`` the paired samples of the second.
        sigma: one bandwidth for both kernels, or None for the median heuristic per side.

    Returns:
        HSIC ≥ 0 (0 for independent variables, up to an O(1/n) bias).
    """
    n = X.shape[0]
    if Y.shape[0] != n or n < 2:
        raise ValueError(f"hsic_across_examples needs n >= 2 paired rows, got X with {n} and Y with {Y.shape[0]}")

    def kernel(v: Tensor) -> Tensor:
        dist2 = torch.cdist(v, v).square()
        if sigma is None:
            off = dist2[~torch.eye(n, dtype=torch.bool, device=v.device)]
            width = off.sqrt().median().clamp(min=torch.finfo(torch.float64).tiny)
        else:
            width = dist2.new_tensor(float(sigma))
        return torch.exp(-dist2 / (2 * width**2))

    k, l_ = kernel(X.to(torch.float64)), kernel(Y.to(torch.float64))
    kc = k - k.mean(dim=0, keepdim=True)  # H K
    lc = l_ - l_.mean(dim=0, keepdim=True)  # H L
    return float((kc * lc).sum() / (n - 1) ** 2)  # tr(HKHL) = tr(HK · HL) = Σ (HK)_ij (HL)_ij (symmetric)
