"""MIEstimator against an independent reference.

References: the paper's nHSIC formula as a float64 numpy transcription (``reference_nhsic`` in
conftest); hidden states from one uncached forward with a plain PyTorch hook on the last decoder
layer.
"""

import json

import pytest
import torch
from conftest import ANSWERS, PROMPTS, reference_nhsic
from tolerance import assert_close

import surgery
from probes.mi import MIEstimator, MIResult
from probes.peaks import tukey_peaks
from surgery.blocks import block_class


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
        assert_close(got.values[row], torch.tensor(want, dtype=torch.float64), rtol=1e-4)  # low-rank path vs the literal formula
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
        assert_close(alone.result().values[0], batched.result().values[row], precision=torch.float32)  # float64 MI of float32 states


def test_values_stop_with_finished_rows(tiny_llama):
    probe = MIEstimator(answers=ANSWERS)
    eos = [surgery.generate(tiny_llama, PROMPTS, 3).token_ids[0][1]]  # row 0 stops at its 2nd token
    with surgery.trace(tiny_llama, probe) as tr:
        out = tr.generate(PROMPTS, 8, eos_token_ids=eos)
    assert out.lengths[0] == 2
    assert [len(v) for v in probe.result().values] == out.lengths
    trimmed = probe.result(out)
    assert [len(v) for v in trimmed.values] == out.lengths


def test_a_row_stopped_just_before_the_end_has_one_value_per_token(tiny_llama):
    plain = surgery.generate(tiny_llama, PROMPTS, 4).token_ids[0]
    probe = MIEstimator(answers=ANSWERS)
    with surgery.trace(tiny_llama, probe) as tr:  # row 0 stops at its 3rd token, one step before the end
        out = tr.generate(PROMPTS, 4, eos_token_ids=[plain[2]])
    assert out.lengths[0] == 3
    assert [len(v) for v in probe.result().values] == out.lengths  # the fed stop token is not a step of row 0
    assert_close(probe.result(out).values, probe.result().values)
    with pytest.raises(ValueError, match="out does not match"):
        probe.result(surgery.generate(tiny_llama, PROMPTS, 2))


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


def test_registry_and_config():
    assert block_class("mi_estimator") is MIEstimator
    probe = MIEstimator("resid_post.1", answers=ANSWERS, sigma=10.0)
    assert json.loads(json.dumps(probe.to_dict()))["config"]["answers"] == ANSWERS


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
        assert_close(got.values[row], torch.tensor(want, dtype=torch.float64), rtol=1e-4)  # low-rank path vs the literal formula
