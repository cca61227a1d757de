"""MIEstimator and the MI-peak helpers, each against an independent reference.

References: a float64 numpy transcription of the paper's nHSIC formula (explicit H and inverse,
one vector pair at a time); hidden states from one uncached forward with a plain PyTorch hook on
the last decoder layer; hand-computed Tukey fences.
"""

import json
import math

import numpy as np
import pytest
import torch
from conftest import PROMPTS

import surgery
from probes.mi import MIEstimator, MIResult, PeakStats, hsic_across_examples, nhsic, tukey_peaks
from surgery.blocks import block_class

ANSWERS = ["8", "56", "The answer is 30.", "So 16"]


def reference_nhsic(x, y, sigma=50.0, epsilon=1e-5) -> float:
    """The paper's formula, literally: K, H, K̃ = K H, R = K̃ (K̃ + εmI)⁻¹, tr(Rx Ry), float64."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    m = len(x)
    H = np.eye(m) - np.ones((m, m)) / m

    def R(v):
        K = np.exp(-((v[:, None] - v[None, :]) ** 2) / (2 * sigma**2))
        Kt = K @ H
        return Kt @ np.linalg.inv(Kt + epsilon * m * np.eye(m))

    return float(np.trace(R(x) @ R(y)))


# ---- the estimator -----------------------------------------------------------------------------
@pytest.mark.parametrize("d", [64, 576])
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
def test_batched_nhsic_equals_float64_transcription(d, scale):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(3, d, generator=g) * scale
    x[:, 0] *= 20  # an outlier coordinate, as residual streams have
    y = torch.randn(d, generator=g) * scale
    got = nhsic(x, y)
    want = torch.tensor([reference_nhsic(xi, y) for xi in x], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("scale, low_rank", [(30.0, True), (1000.0, False)])
def test_both_token_side_paths_equal_the_transcription(scale, low_rank):
    """Residual-like vectors take the low-rank (pivoted Cholesky) path; very spread ones fall
    back to the exact LU solve. Both must give the formula's value."""
    from probes.mi import KX_MAX_RANK, _kernel_factor

    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 576, generator=g, dtype=torch.float64) * scale
    x[:, :3] *= 15  # a few outlier coordinates
    y = torch.randn(576, generator=g, dtype=torch.float64) * 30
    assert (_kernel_factor(x, 50.0, KX_MAX_RANK) is not None) == low_rank
    want = torch.tensor([reference_nhsic(xi, y) for xi in x], dtype=torch.float64)
    torch.testing.assert_close(nhsic(x, y), want, rtol=1e-4, atol=0)


def test_nhsic_broadcasts_a_batch_of_answers():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 48, generator=g) * 20, torch.randn(4, 48, generator=g) * 20
    want = torch.tensor([reference_nhsic(a, b) for a, b in zip(x, y)], dtype=torch.float64)
    torch.testing.assert_close(nhsic(x, y), want, rtol=1e-4, atol=0)
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


# ---- peaks -------------------------------------------------------------------------------------
def test_tukey_peaks_by_hand_with_interpolated_quartiles():
    # sorted: 1 2 2 3 3 4 5 6 7 20 25 30 (n = 12, linear interpolation at q·(n-1))
    # Q1 at 2.75: 2 + 0.75·1 = 2.75; median at 5.5: 4.5; Q3 at 8.25: 7 + 0.25·13 = 10.25
    # IQR = 7.5, fence = 10.25 + 11.25 = 21.5: 30 (index 7) and 25 (index 11) are peaks, 20 is not
    values = torch.tensor([1, 20, 3, 4, 5, 6, 7, 30, 3, 2, 2, 25], dtype=torch.float64)
    peaks, stats = tukey_peaks(values)
    assert peaks.tolist() == [7, 11]
    assert (stats.count, stats.min_gap, stats.max_gap, stats.mean_gap) == (2, 4, 4, 4.0)
    assert stats.ratio == pytest.approx(2 / 12)
    assert stats.mean == pytest.approx(9.0)  # 108 / 12
    assert stats.std == pytest.approx(math.sqrt(2078 / 12 - 81))  # population std
    assert stats.aom == pytest.approx(((30 - 4.5) + (25 - 4.5)) / 2 / 7.5)


def test_tukey_peaks_gaps_and_degenerate_cases():
    # nine 1s, three 10s: Q1 = 1, median = 1, Q3 at 8.25 = 1 + 0.25·9 = 3.25, fence = 6.625
    peaks, stats = tukey_peaks(torch.tensor([10.0, 1, 10, 1, 1, 1, 1, 10, 1, 1, 1, 1]))
    assert peaks.tolist() == [0, 2, 7]
    assert (stats.min_gap, stats.max_gap, stats.mean_gap) == (2, 5, 3.5)
    assert stats.aom == pytest.approx(9 / 2.25)
    peaks, stats = tukey_peaks(torch.ones(5))
    assert peaks.tolist() == [] and stats == PeakStats(0, 0.0, None, None, None, 1.0, 0.0, None)
    peaks, stats = tukey_peaks(torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0]))
    assert peaks.tolist() == [4] and stats.min_gap is None and stats.aom is None  # IQR 0
    with pytest.raises(ValueError, match="empty"):
        tukey_peaks(torch.zeros(0))


# ---- the probe ---------------------------------------------------------------------------------
def _last_layer_states(model, ids: list[int]) -> torch.Tensor:
    """Output of the last decoder layer at every position, one uncached forward (plain hook)."""
    kept = []

    def hook(_module, _args, output):
        kept.append((output[0] if isinstance(output, tuple) else output)[0].double())

    handle = model.module.model.layers[-1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model.module(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        handle.remove()
    return kept[0]


def naive_mi(model, prompts, answers, out) -> list[list[float]]:
    """Per row: reference nHSIC between each emitting state and the answer run alone."""
    rows = []
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        prompt_ids = model.tokenizer(prompt)["input_ids"]
        generated = out.token_ids[row]
        states = _last_layer_states(model, prompt_ids + generated[:-1])
        emitting = states[len(prompt_ids) - 1 :]  # position p emits token p - len(prompt) + 1
        assert len(emitting) == len(generated)
        h_y = _last_layer_states(model, model.tokenizer(answer)["input_ids"])[-1]
        rows.append([reference_nhsic(h, h_y) for h in emitting])
    return rows


def test_probe_values_equal_naive_computation(tiny):
    probe = MIEstimator(answers=ANSWERS)
    with surgery.trace(tiny, probe) as tr:
        out = tr.generate(PROMPTS, 12)
    got = probe.result(out)
    assert isinstance(got, MIResult) and len(got.values) == len(PROMPTS)
    for row, want in enumerate(naive_mi(tiny, PROMPTS, ANSWERS, out)):
        assert len(got.values[row]) == out.lengths[row]
        torch.testing.assert_close(got.values[row], torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-9)
        peaks, stats = tukey_peaks(got.values[row])
        assert got.peaks[row].tolist() == peaks.tolist() and got.stats[row] == stats
    texts = got.peak_token_texts(out, tiny.tokenizer)
    assert [len(t) for t in texts] == [len(p) for p in got.peaks]


def test_probe_does_not_change_tokens(tiny):
    with surgery.trace(tiny, MIEstimator(answers=ANSWERS)) as tr:
        out = tr.generate(PROMPTS, 12)
    assert out.token_ids == surgery.generate(tiny, PROMPTS, 12).token_ids


def test_rows_alone_equal_rows_batched(tiny):
    batched = MIEstimator(answers=ANSWERS)
    with surgery.trace(tiny, batched) as tr:
        out = tr.generate(PROMPTS, 12)
    for row, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS)):
        alone = MIEstimator(answers=[answer])
        with surgery.trace(tiny, alone) as tr:
            single = tr.generate([prompt], 12)
        assert single.token_ids[0] == out.token_ids[row]
        torch.testing.assert_close(alone.result().values[0], batched.result().values[row], rtol=1e-4, atol=1e-9)


def test_values_stop_with_finished_rows(tiny_llama):
    probe = MIEstimator(answers=ANSWERS)
    eos = [surgery.generate(tiny_llama, PROMPTS, 3).token_ids[0][1]]  # row 0 stops at its 2nd token
    with surgery.trace(tiny_llama, probe) as tr:
        out = tr.generate(PROMPTS, 8, eos_token_ids=eos)
    assert out.lengths[0] == 2
    assert [len(v) for v in probe.result().values] == out.lengths
    trimmed = probe.result(out)
    assert [len(v) for v in trimmed.values] == out.lengths


def test_result_with_out_trims_a_row_stopped_just_before_the_end(tiny_llama):
    plain = surgery.generate(tiny_llama, PROMPTS, 4).token_ids[0]
    probe = MIEstimator(answers=ANSWERS)
    with surgery.trace(tiny_llama, probe) as tr:  # row 0 stops at its 3rd token, one step before the end
        out = tr.generate(PROMPTS, 4, eos_token_ids=[plain[2]])
    assert out.lengths[0] == 3 and probe.result().values[0].shape == (4,)
    got = probe.result(out)
    assert [len(v) for v in got.values] == out.lengths
    torch.testing.assert_close(got.values[0], probe.result().values[0][:3])


def test_wrong_number_of_answers_is_a_clear_error(tiny_llama):
    with surgery.trace(tiny_llama, MIEstimator(answers=["8", "56"])) as tr:
        with pytest.raises(ValueError, match="2 answers but this run has 4 prompt rows"):
            tr.generate(PROMPTS, 4)
    with pytest.raises(ValueError, match="needs the reference answers"):
        with surgery.trace(tiny_llama, MIEstimator()):
            pass
    with pytest.raises(ValueError, match="not 'logits'"):
        with surgery.trace(tiny_llama, MIEstimator("logits", answers=ANSWERS)):
            pass


def test_registry_config_and_plot(tiny_llama, tmp_path):
    assert block_class("mi_estimator") is MIEstimator
    probe = MIEstimator("resid_post.1", answers=ANSWERS, sigma=10.0)
    assert json.loads(json.dumps(probe.to_dict()))["config"]["answers"] == ANSWERS
    with surgery.trace(tiny_llama, probe) as tr:
        tr.generate(PROMPTS, 10)
    path = tmp_path / "mi.png"
    probe.result().plot(path, row=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_smollm2_values_finite_and_equal_naive(smollm2):
    prompts, answers = ["What is 7 * 8?", "Tom has 3 apples and buys 5 more. How many?"], ["56", "8"]
    probe = MIEstimator(answers=answers)
    with surgery.trace(smollm2, probe) as tr:
        out = tr.generate(prompts, 16)
    got = probe.result(out)
    for row, want in enumerate(naive_mi(smollm2, prompts, answers, out)):
        assert torch.isfinite(got.values[row]).all() and len(got.values[row]) == out.lengths[row]
        assert got.stats[row].count == len(got.peaks[row])
        torch.testing.assert_close(got.values[row], torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-9)
