"""MIEstimator: per-token mutual information with the answer, and its peaks (MI peaks).

Paper: Qian et al., "Demystifying Reasoning Dynamics with Mutual Information: Thinking Tokens are
Information Peaks in LLM Reasoning", arXiv 2506.02867, section 3 (MI along the reasoning
trajectory, nHSIC estimator; Tukey's upper fence for peaks) and section 4 (thinking tokens at the
peaks). The formulas we follow are in ``../shared/METHODS.md`` section 2.

Per generated token t, ``h_t`` is the site's value (default ``resid_post.-1``, the last block's
output before the final norm) at the position that *emits* token t: the prefill's last position
emits token 0, decode step k's fed position emits token k. ``h_y`` is the site's value at the last
token of the reference answer run alone through the model (one vector per problem). The
paper-compatible score is ``m_t = nHSIC(h_t, h_y)`` with the d coordinates taken as d paired
scalar samples (see :func:`nhsic`).

Deviations from the released code:

- float64 throughout (the release is float32): the kernel matrices are nearly all ones and the
  ridge system is ill-conditioned, so float32 is off by 1e-2 to 1e-1 relative from an exact
  float64 transcription on width 64 and 576 vectors (measured); float64 matches it to ~1e-8.
  ``K - 1`` is computed with ``expm1`` so the centred kernel keeps its small entries exactly.
- the same value, computed cheaper: ``Ry`` is computed once per problem when the probe is bound
  and kept as its SVD truncated at singular values below ``1e-12`` of the largest (it is
  numerically low-rank, r ≈ 20–300 of d = 576–1536). The token side is low-rank too: a batched
  pivoted Cholesky gives ``Kx ≈ L Lᵀ`` (rank q ≈ 24 on real SmolLM2 states, stopped at a residual
  of 1e-13), and ``tr(K̃x (K̃x + εmI)⁻¹ Ry) = tr((Gᵀ L + εmI)⁻¹ (Gᵀ Uy)(Vyᵀ L))`` with ``G = H L``
  (push-through identity): ``O(d·q² + d·q·r + q³)`` per token instead of ≈ 12·d³. When q would
  exceed ``min(KX_MAX_RANK, d/3)`` the step falls back to one exact batched LU. The tests check
  both paths against the literal float64 formula to 1e-4 relative.
- representation-recycling re-runs are not observed (the trace calls no probe for them): the
  first pass is kept.
- rows that have finished are still computed in the batched solve (no host sync per step) and
  dropped in :meth:`MIEstimator.result`; pass the generation output, ``result(out)``, to cut
  each row to exactly its generated tokens.

Example::

    import surgery
    from probes import MIEstimator
    model = surgery.load()
    mi = MIEstimator(answers=["56"])
    with surgery.trace(model, mi) as tr:
        out = tr.generate(["What is 7 * 8?"], max_new_tokens=64, chat=True)
    res = mi.result(out)
    res.values[0], res.peaks[0], res.stats[0]
    res.peak_token_texts(out, model.tokenizer)
    res.plot("mi.png")
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from surgery.blocks import Probe, register_block
from surgery.capture import states_at
from surgery.results import SavedResult
from surgery.step import Step

__all__ = [
    "MIEstimator",
    "MIEstimatorConfig",
    "MIResult",
    "PeakStats",
    "RY_RANK_TOLERANCE",
    "hsic_across_examples",
    "nhsic",
    "tukey_peaks",
]


# ---- the estimator -----------------------------------------------------------------------------
def _centred_kernel(v: Float[Tensor, "*batch d"], sigma: float) -> Float[Tensor, "*batch d d"]:
    """Right-centred Gaussian kernel ``K H`` over the coordinates of ``v``.

    ``K H = (K - 1) H`` because ``1 1ᵀ H = 0``; ``K - 1`` from ``expm1`` keeps the small entries
    that ``exp`` rounds away next to 1.
    """
    diff = v[..., :, None] - v[..., None, :]
    k1 = torch.expm1(diff.square_().mul_(-0.5 / sigma**2))
    return k1.sub_(k1.mean(dim=-1, keepdim=True))  # right-multiplying by H subtracts row means


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
    n, d = v.shape
    rows = torch.arange(n, device=v.device)
    factor = torch.zeros(n, d, max_rank, dtype=torch.float64, device=v.device)
    residual = torch.ones(n, d, dtype=torch.float64, device=v.device)  # diag(Kx - L Lᵀ)
    scale = -0.5 / sigma**2
    for j in range(max_rank):
        largest, pivot = residual.max(dim=-1)
        if j % 8 == 0 and bool((largest < KX_TOLERANCE).all()):  # one sync per 8 columns
            return factor[..., :j]
        live = largest >= KX_TOLERANCE
        column = torch.exp((v - v[rows, pivot][:, None]).square() * scale)
        column = column - torch.einsum("ndj,nj->nd", factor[..., :j], factor[rows, pivot, :j])
        column = torch.where(live[:, None], column / largest.clamp(min=KX_TOLERANCE).sqrt()[:, None], 0.0)
        factor[..., j] = column
        residual = residual - column.square()
    return None if bool((residual.max(dim=-1).values >= KX_TOLERANCE).any()) else factor


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


def nhsic(
    x: Float[Tensor, "*xbatch d"], y: Float[Tensor, "*ybatch d"], sigma: float = 50.0, epsilon: float = 1e-5
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

    Returns:
        float64 tensor of the broadcast leading shape.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(3, 64, generator=g) * 30, torch.randn(64, generator=g) * 30
        >>> nhsic(x, y).shape
        torch.Size([3])
        >>> bool(nhsic(y, y) > nhsic(x[0], y))        # a vector depends most on itself
        True
    """
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"nhsic pairs coordinates: x has width {x.shape[-1]}, y has {y.shape[-1]}; they must match")
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


# ---- peaks -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeakStats:
    """Summary of one sequence's MI values (METHODS.md section 2).

    Attributes:
        count: number of peaks.
        ratio: ``count / steps`` (steps = number of values).
        min_gap, max_gap, mean_gap: gaps (in tokens) between consecutive peaks; None with
            fewer than 2 peaks.
        mean: mean of ``m``.
        std: population standard deviation of ``m`` (``ddof = 0``, as numpy's default).
        aom: mean over peaks of ``|m_t - median| / IQR``; None without peaks or when IQR is 0.
    """

    count: int
    ratio: float
    min_gap: int | None
    max_gap: int | None
    mean_gap: float | None
    mean: float
    std: float
    aom: float | None


def tukey_peaks(values: Float[Tensor, " steps"]) -> tuple[Int[Tensor, " peaks"], PeakStats]:
    """Peaks by Tukey's upper fence: ``{t : m_t > Q3 + 1.5·IQR}``, and their statistics.

    Quartiles and the median come from :func:`torch.quantile` with its default linear
    interpolation (numpy's default ``"linear"`` too). Computed in float64.

    Args:
        values: one sequence's MI values, one per generated token.

    Returns:
        (peak indices ascending, :class:`PeakStats`).

    Example:
        >>> import torch
        >>> peaks, stats = tukey_peaks(torch.tensor([1.0, 2.0, 1.0, 9.0, 1.0, 2.0, 1.0, 8.0]))
        >>> peaks.tolist(), stats.count, stats.min_gap, stats.ratio
        ([3, 7], 2, 4, 0.25)
    """
    if values.numel() == 0:
        raise ValueError("tukey_peaks needs at least one value (got an empty sequence)")
    v = values.detach().to(torch.float64).cpu()
    q1, median, q3 = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    iqr = q3 - q1
    peaks = (v > q3 + 1.5 * iqr).nonzero().flatten()
    gaps = peaks.diff().tolist()
    count = len(peaks)
    aom = None
    if count and iqr > 0:
        aom = float(((v[peaks] - median).abs() / iqr).mean())
    stats = PeakStats(
        count=count,
        ratio=count / len(v),
        min_gap=min(gaps) if gaps else None,
        max_gap=max(gaps) if gaps else None,
        mean_gap=sum(gaps) / len(gaps) if gaps else None,
        mean=float(v.mean()),
        std=float(v.std(correction=0)),
        aom=aom,
    )
    return peaks, stats


# ---- the probe ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class MIEstimatorConfig:
    site: str = field(default="resid_post.-1", metadata={"help": "the site whose value is h_t (and h_y)"})
    answers: tuple[str, ...] | None = field(
        default=None, metadata={"help": "reference answer text per prompt row (h_y = its last token's state)"}
    )
    sigma: float = field(default=50.0, metadata={"help": "Gaussian kernel bandwidth (paper: 50, grid 50-400)"})
    epsilon: float = field(default=1e-5, metadata={"help": "ridge of the nHSIC estimator (paper: 1e-5)"})


@dataclass
class MIResult(SavedResult):
    """What :class:`MIEstimator` measured, one entry per prompt row.

    Attributes:
        values: float64 ``[n_tokens]`` per row: ``m_t`` for each generated token (CPU).
        peaks: int64 peak indices per row (Tukey's upper fence, see :func:`tukey_peaks`).
        stats: :class:`PeakStats` per row.
    """

    values: list[Tensor]
    peaks: list[Tensor]
    stats: list[PeakStats]

    def peak_token_texts(self, out, tokenizer) -> list[list[str]]:
        """The generated tokens at the peaks, per row, as decoded text.

        Args:
            out: the :class:`~surgery.engine.GenerationOutput` of the same run.
            tokenizer: the model's tokenizer (``model.tokenizer``).
        """
        return [
            [tokenizer.decode([out.token_ids[row][t]]) for t in peaks.tolist()] for row, peaks in enumerate(self.peaks)
        ]

    def plot(self, path, row: int = 0) -> None:
        """Save a PNG of ``m_t`` over tokens for one row, peaks marked, with the Tukey fence."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        values, peaks = self.values[row], self.peaks[row]
        q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=values.dtype)).tolist()
        fig, ax = plt.subplots(figsize=(8, 3))
        try:
            ax.plot(range(len(values)), values.tolist(), lw=1, label="MI (nHSIC)")
            ax.scatter(peaks.tolist(), values[peaks].tolist(), color="red", zorder=3, label="peaks")
            ax.axhline(q3 + 1.5 * (q3 - q1), color="grey", ls="--", lw=0.8, label="Q3 + 1.5 IQR")
            ax.set_xlabel("generated token")
            ax.set_ylabel("MI with answer")
            ax.set_title(f"row {row}: {len(peaks)} peaks / {len(values)} tokens")
            ax.legend(loc="upper right", fontsize="small")
            fig.tight_layout()
            fig.savefig(path, dpi=120)
        finally:
            plt.close(fig)


@register_block("mi_estimator")
class MIEstimator(Probe):
    """Per-token MI between the emitting state ``h_t`` and the answer state ``h_y`` (MI peaks).

    Paper: arXiv 2506.02867, section 3 (nHSIC, Tukey peaks); see the module docstring for the
    definitions and the deviations (float64; a cheaper but equal formula; re-runs ignored).

    Args:
        site: where ``h_t`` and ``h_y`` are read (default the last block's output).
        answers: reference answer text, one per prompt row, in prompt order. Each is tokenized
            as a plain (non-chat) prompt and run alone; ``h_y`` is the state at its last token.
        sigma: Gaussian kernel bandwidth.
        epsilon: ridge.

    The answer states and ``Ry`` are computed when the probe is bound (entering the trace), in
    one batched forward; every ``generate`` or ``run`` must then have ``len(answers)`` rows.

    Example::

        mi = MIEstimator(answers=["56", "8"])
        with surgery.trace(model, mi) as tr:
            out = tr.generate(["What is 7 * 8?", "3 + 5?"], max_new_tokens=128, chat=True)
        mi.result(out).stats[0].count
    """

    config_class = MIEstimatorConfig

    def __init__(
        self, site: str = "resid_post.-1", answers: list[str] | None = None, sigma: float = 50.0, epsilon: float = 1e-5
    ):
        if answers is not None:
            if isinstance(answers, str) or not all(isinstance(a, str) and a for a in answers):
                raise TypeError("answers must be a list of non-empty strings, one per prompt row")
            answers = tuple(answers)
        if not sigma > 0 or not epsilon > 0:
            raise ValueError(f"sigma and epsilon must be positive, got sigma={sigma}, epsilon={epsilon}")
        self.config = MIEstimatorConfig(site=site, answers=answers, sigma=float(sigma), epsilon=float(epsilon))
        self._ry: tuple[Tensor, Tensor] | None = None
        self._answer_states: Tensor | None = None
        self._records: list[tuple[Tensor, Tensor]] = []

    def sites(self) -> tuple[str, ...]:
        return (self.config.site,)

    def bind(self, model) -> None:
        site = model.resolve_site(self.config.site)
        if site.kind == "logits":
            raise ValueError("MIEstimator needs a residual-width site such as 'resid_post.-1', not 'logits' (d = vocab)")
        if not self.config.answers:
            raise ValueError("MIEstimator needs the reference answers: MIEstimator(answers=[...]), one string per prompt")
        self._answer_states = self._last_token_states(model, site, list(self.config.answers))
        self._ry = _answer_factors(self._answer_states, self.config.sigma, self.config.epsilon)

    @staticmethod
    def _last_token_states(model, site, texts: list[str]) -> Float[Tensor, "n d"]:
        """The site's value at each text's last token, one forward (float64)."""
        rows = [model.tokenizer(text)["input_ids"] for text in texts]
        return states_at(model, site, rows, [[len(row) - 1] for row in rows]).to(torch.float64)

    def reset(self, batch_size: int) -> None:
        n = len(self.config.answers or ())
        if n != batch_size:
            raise ValueError(
                f"MIEstimator has {n} answers but this run has {batch_size} prompt rows: "
                "pass one answer per prompt, in prompt order"
            )
        self._records = []

    def observe(self, site: str, value: Tensor, step: Step) -> None:
        # The last position of every forward emits the next token (prompts are left-padded).
        mi = _nhsic_given_factors(value[:, -1], *self._ry, self.config.sigma, self.config.epsilon)
        self._records.append((mi, step.valid[:, -1]))

    def result(self, out=None) -> MIResult:
        """Per-row MI values (one per generated token), peaks and statistics of the last run.

        A step's record belongs to a row while the row's *next* step still feeds a valid token
        (the step that feeds a stop token emits nothing). The run's last step has no next step,
        so a row that stopped exactly one step before the run ended keeps one extra value unless
        ``out`` is given.

        Args:
            out: the run's :class:`~surgery.engine.GenerationOutput`; when given, each row is cut
                to exactly ``out.lengths[row]`` values (recommended).
        """
        if not self._records:
            return MIResult([], [], [])
        mi = torch.stack([m for m, _ in self._records], dim=1).cpu()  # [batch, steps]
        fed_valid = torch.stack([v for _, v in self._records], dim=1).cpu()
        emits = fed_valid.clone()
        emits[:, :-1] = fed_valid[:, 1:]
        values = [row[keep] for row, keep in zip(mi, emits)]
        if out is not None:
            if len(out.lengths) != len(values) or any(n > len(v) for n, v in zip(out.lengths, values)):
                raise ValueError(
                    f"out does not match this probe's last run: lengths {out.lengths}, "
                    f"recorded {[len(v) for v in values]} values per row"
                )
            values = [v[:n] for v, n in zip(values, out.lengths)]
        found = [tukey_peaks(v) for v in values]
        return MIResult(values=values, peaks=[p for p, _ in found], stats=[s for _, s in found])
