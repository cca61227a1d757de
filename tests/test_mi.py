"""MIEstimator against an independent reference.

References: the paper's nHSIC formula as a float64 numpy transcription (``reference_nhsic`` in
conftest); hidden states from one uncached forward with a plain PyTorch hook on the last decoder
layer. The released code's modes (``peak_rule="top_k"``, ``precision="float32"``,
``ratio_steps="released_total_tokens"``) against our transcriptions of the released rules
(``tests/test_peaks.py``, ``released_nhsic_float32`` in ``tests/test_hsic.py``).
"""

import json

import pytest
import torch
from conftest import ANSWERS, PROMPTS, reference_nhsic
from tolerance import assert_close

import surgery
from probes.mi import MIEstimator, MIResult
from probes.peaks import running_top_k_peaks, top_k_peaks, tukey_peaks
from surgery.blocks import Block, block_class


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


def test_continuous_batching_gives_each_prompt_its_result_alone(tiny):
    """batch_size=2 over five prompts (one repeated with another answer), budgets that end rows
    at different steps, so three prompts are admitted into freed slots mid-run: each prompt's
    values, peaks and statistics equal its run alone; then a fixed batch on the same probe
    equals a fresh probe's."""
    prompts, answers, budgets = [*PROMPTS, PROMPTS[1]], [*ANSWERS, "42"], [6, 20, 9, 14, 11]
    probe = MIEstimator(answers=answers, warmup=3)
    with surgery.trace(tiny, probe) as tr:
        out = tr.generate(prompts, budgets, chat=True, batch_size=2)
    got = probe.result(out)
    assert out.timings["steps"] < sum(budgets) and len(got.values) == len(prompts)  # slots were shared
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        alone = MIEstimator(answers=[answer], warmup=3)
        with surgery.trace(tiny, alone) as tr:
            single = tr.generate([prompt], budgets[row], chat=True)
        assert single.token_ids[0] == out.token_ids[row]
        want = alone.result(single)
        assert_close(got.values[row], want.values[0], precision=torch.float32)  # float64 MI of float32 states
        assert got.peaks[row].tolist() == want.peaks[0].tolist()
        assert_close(got.stats[row], want.stats[0], precision=torch.float32)
    fresh = MIEstimator(answers=answers, warmup=3)
    with surgery.trace(tiny, probe, fresh) as tr:
        fixed = tr.generate(prompts, 6, chat=True)
    assert all(torch.equal(a, b) for a, b in zip(probe.result(fixed).values, fresh.result(fixed).values))


def test_continuous_batching_needs_one_answer_per_prompt(tiny_llama):
    with surgery.trace(tiny_llama, MIEstimator(answers=ANSWERS[:3])) as tr:
        with pytest.raises(ValueError, match="3 answers, and this run admits prompt 3"):
            tr.generate(PROMPTS, 2, batch_size=2)
    probe = MIEstimator(answers=ANSWERS)
    with surgery.trace(tiny_llama, probe) as tr:
        tr.generate(PROMPTS[:3], 2, batch_size=2)
    with pytest.raises(ValueError, match="4 answers but this run has 3 prompt rows"):
        probe.result()


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
    with surgery.trace(tiny_llama, MIEstimator(answers=ANSWERS)) as tr:
        with pytest.raises(ValueError, match="4 answers but this run has 2 prompt rows"):
            tr.generate(PROMPTS[:2], 4)
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


# ---- the released code's choices, as named modes (issue 20) ---------------------------------


def test_peak_rule_top_k_takes_the_top_values_and_says_so(tiny_llama, tmp_path):
    tukey = MIEstimator(answers=ANSWERS)
    top = MIEstimator(answers=ANSWERS, peak_rule="top_k", top_k=3, ratio_steps="released_total_tokens")
    with surgery.trace(tiny_llama, tukey, top) as tr:
        out = tr.generate(PROMPTS, 12)
    default, released = tukey.result(out), top.result(out)
    described = (default.peak_rule, default.top_k, default.ratio_steps, default.precision)
    assert described == ("tukey", None, "values", "float64")
    assert (released.peak_rule, released.top_k, released.ratio_steps) == ("top_k", 3, "released_total_tokens")
    for row, values in enumerate(default.values):
        assert torch.equal(released.values[row], values)  # the rule changes the peaks, never the values
        peaks, stats = top_k_peaks(values, 3, "released_total_tokens")
        assert released.peaks[row].tolist() == peaks.tolist() and released.stats[row] == stats
        assert released.stats[row].count == 3 and released.stats[row].ratio == 3 / (len(values) - 1)
        assert default.peaks[row].tolist() == tukey_peaks(values)[0].tolist()
    loaded = MIResult.load(released.save(tmp_path / "mi.safetensors"))
    assert (loaded.peak_rule, loaded.top_k, loaded.ratio_steps) == ("top_k", 3, "released_total_tokens")
    assert [p.tolist() for p in loaded.peaks] == [p.tolist() for p in released.peaks]


def test_precision_float32_on_the_states_the_probe_saw_equals_the_released_computation(tiny):
    """Fed the very states the probe saw (recorded beside it), our transcription of the released
    float32 estimator gives the probe's values; a float64 probe beside it is unchanged.

    Identical inputs matter: float32 nHSIC turns the float32 rounding between a cached, batched
    run and one uncached forward (~1e-7 relative in the states) into ~1e-2 differences in m_t
    (measured, up to 20 % relative on the tiny models), so it cannot be checked against states
    recomputed another way.
    """
    from test_hsic import released_nhsic_float32

    from probes.record import RecordSite

    prompts, answers = PROMPTS[:2], ANSWERS[:2]
    released = MIEstimator(answers=answers, precision="float32")
    default = MIEstimator(answers=answers)
    record = RecordSite("resid_post.-1")
    with surgery.trace(tiny, released, default, record) as tr:
        out = tr.generate(prompts, 6)
    got = released.result(out)
    assert got.precision == "float32"
    # the answers as the probe ran them, in one batch (alone, their states differ by float32 rounding)
    answer_states = MIEstimator._last_token_states(tiny, tiny.resolve_site("resid_post.-1"), answers)
    for row, h_y in enumerate(answer_states):
        positions, states = record.result().for_row(row)
        emitting = states[positions >= out.prompt_lengths[row] - 1]  # the prompt's last position emits token 0
        values = got.values[row]
        assert len(emitting) == len(values) == out.lengths[row]
        assert values.dtype == torch.float64 and torch.equal(values.float().double(), values)  # float32 numbers
        want = torch.stack([released_nhsic_float32(h, h_y) for h in emitting]).double()
        assert_close(values, want, precision=torch.float32)  # same ops in the same order
        float64 = torch.tensor([reference_nhsic(h, h_y) for h in emitting], dtype=torch.float64)
        assert_close(default.result(out).values[row], float64, rtol=1e-4)  # low-rank path vs the literal formula


def test_closed_loop_top_k_fires_where_the_running_top_k_rule_says(tiny):
    from interventions import RepresentationRecycling
    from surgery.signals import OnSignal

    k, warmup = 3, 2
    mi = MIEstimator(answers=ANSWERS, peak_rule="top_k", top_k=k, warmup=warmup)
    rr = RepresentationRecycling(layer=1, when=OnSignal(mi, "peak"))
    with surgery.trace(tiny, rr, mi) as tr:
        out = tr.generate(PROMPTS, 24, chat=True)
    assert mi.sync_free
    values = mi.result(out).values
    fired = [[p - out.prompt_lengths[row] + 1 for p in positions] for row, positions in enumerate(rr.fired())]
    assert any(fired)
    for row in range(len(PROMPTS)):
        assert fired[row] == running_top_k_peaks(values[row], k, warmup).tolist()
        assert all(t >= max(k, warmup) for t in fired[row])


def test_new_options_round_trip_and_refuse_bad_values():
    released = MIEstimator(answers=ANSWERS, peak_rule="top_k", top_k=7, precision="float32",
                           ratio_steps="released_total_tokens")
    rebuilt = Block.from_dict(json.loads(json.dumps(released.to_dict())))
    assert type(rebuilt) is MIEstimator and rebuilt.config == released.config
    assert MIEstimator(answers=ANSWERS).config.peak_rule == "tukey"
    assert (MIEstimator().config.precision, MIEstimator().config.ratio_steps, MIEstimator().config.top_k) == (
        "float64", "values", 20)
    bad = [
        (dict(peak_rule="iqr"), r"peak_rule must be one of \('tukey', 'top_k'\)"),
        (dict(peak_rule="top_k", top_k=0), "top_k must be a positive integer"),
        (dict(top_k=True), "top_k must be a positive integer"),
        (dict(precision="float16"), r"precision must be one of \('float64', 'float32'\)"),
        (dict(ratio_steps="tokens"), "ratio_steps must be one of"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            MIEstimator(answers=ANSWERS, **kwargs)


def test_new_options_in_a_study_table(tiny_llama):
    import tomllib

    from experiments.block_specs import parse_block
    from experiments.config_checks import StudyConfigError

    table = tomllib.loads('mi = { type = "mi_estimator", answers_from = "dataset", peak_rule = "top_k", top_k = 20, '
                          'precision = "float32", ratio_steps = "released_total_tokens" }')["mi"]
    spec = parse_block("probes.mi", table, ".", None, kind="probe")
    block = spec.build(tiny_llama, answers=ANSWERS)
    assert (block.config.peak_rule, block.config.top_k, block.config.precision, block.config.ratio_steps) == (
        "top_k", 20, "float32", "released_total_tokens")
    with pytest.raises(StudyConfigError, match="peak_rule must be one of"):
        parse_block("probes.mi", {"type": "mi_estimator", "answers_from": "dataset", "peak_rule": "top20"}, ".", None,
                    kind="probe")
    with pytest.raises(StudyConfigError, match="expected an integer"):
        parse_block("probes.mi", {"type": "mi_estimator", "answers_from": "dataset", "top_k": "20"}, ".", None,
                    kind="probe")


@pytest.mark.slow
def test_smollm2_released_modes_equal_the_released_rules(smollm2):
    """On real states (d = 576): float32 values equal the released transcription on the states the
    probe saw, and the top-k peaks are the notebook's top 20 of them."""
    from test_hsic import released_nhsic_float32
    from test_peaks import notebook_top_k

    from probes.record import RecordSite

    prompts, answers = ["What is 7 * 8? Think step by step."], ["7 * 8 = 56. The answer is 56."]
    probe = MIEstimator(answers=answers, precision="float32", peak_rule="top_k", ratio_steps="released_total_tokens")
    record = RecordSite("resid_post.-1")
    with surgery.trace(smollm2, probe, record) as tr:
        out = tr.generate(prompts, 24, chat=True)
    got = probe.result(out)
    h_y = MIEstimator._last_token_states(smollm2, smollm2.resolve_site("resid_post.-1"), answers)[0]
    positions, states = record.result().for_row(0)
    emitting = states[positions >= out.prompt_lengths[0] - 1]
    want = torch.stack([released_nhsic_float32(h, h_y) for h in emitting]).double()
    assert_close(got.values[0], want, precision=torch.float32)  # same ops in the same order
    assert got.peaks[0].tolist() == notebook_top_k(got.values[0], 20)
    count = min(20, out.lengths[0])
    assert got.stats[0].count == count and got.stats[0].ratio == count / (out.lengths[0] - 1)
