"""Closed loop: interventions firing where a probe measures something, equal to the offline rule.

For each closed-loop block: (1) its tokens equal the open run's up to its first firing, (2) it
fires exactly where the offline rule, applied to what the run itself measured, says, (3) forcing
the intervention at those positions reproduces its tokens, and (4) rows alone equal rows batched.
"""

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import PROMPTS
from tolerance import assert_close

import surgery
from experiments.block_specs import parse_block
from interventions import RepresentationRecycling, SteeringVector
from probes import MIEstimator, ThoughtClassifier, fit_linear_probe
from probes.peaks import running_peaks
from surgery.capture import states_at
from surgery.signals import OnSignal
from surgery.triggers import OnText, StepWindow, Trigger

ANSWERS = ["The answer is 8.", "56", "So 16.", "20"]
GATED = ("reflection", "transition")


@dataclass(frozen=True, eq=False)
class AtPositions(Trigger):
    """Test-only: fires at the given position ids of each row (the forced, open-loop replay)."""

    kind: ClassVar[str] = "_at_positions"
    positions: tuple = ()

    def mask(self, step):
        table = torch.zeros(len(self.positions), 4096, dtype=torch.bool)
        for row, positions in enumerate(self.positions):
            table[row, list(positions)] = True
        rows = torch.arange(step.batch_size)[:, None].expand_as(step.positions)
        return table.to(step.positions.device)[rows, step.positions]


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---- recycling at measured MI peaks ---------------------------------------------------------


def closed_rr(model, prompts, answers, new_tokens, warmup=4, layer=1):
    mi = MIEstimator(answers=answers, warmup=warmup)
    rr = RepresentationRecycling(layer=layer, when=OnSignal(mi, "peak"))
    with surgery.trace(model, rr, mi) as tr:
        out = tr.generate(prompts, new_tokens, chat=True)
    return out, rr, mi


def emitted_token(out, row, position):
    """The generated-token index a position emits (position p emits token p - prompt + 1)."""
    return position - out.prompt_lengths[row] + 1


def check_rr_equals_offline(model, prompts, answers, new_tokens, warmup=4, layer=1):
    open_mi = MIEstimator(answers=answers, warmup=warmup, sync_free=True)
    with surgery.trace(model, open_mi) as tr:
        plain = tr.generate(prompts, new_tokens, chat=True)
    assert plain.token_ids == surgery.generate(model, prompts, new_tokens, chat=True).token_ids
    out, rr, mi = closed_rr(model, prompts, answers, new_tokens, warmup, layer)
    assert mi.sync_free
    own = mi.result(out).values
    fired = [[emitted_token(out, row, p) for p in positions] for row, positions in enumerate(rr.fired())]
    assert any(fired), "the test needs at least one firing"
    for row in range(len(prompts)):
        # its firings are the running-fence rule on its own values
        assert fired[row] == running_peaks(own[row], warmup).tolist()
        # the same tokens as the open run up to the first firing, which is the open run's first peak
        offline = running_peaks(open_mi.result(plain).values[row], warmup).tolist()
        if not fired[row]:
            assert out.token_ids[row] == plain.token_ids[row] and not offline
            continue
        first = fired[row][0]
        assert offline and offline[0] == first
        assert out.token_ids[row][:first] == plain.token_ids[row][:first]
        assert first_difference(out.token_ids[row], plain.token_ids[row]) >= first
    # recycling forced at exactly those positions (no probe) gives the same tokens
    forced = RepresentationRecycling(layer=layer, when=AtPositions(tuple(tuple(p) for p in rr.fired())))
    with surgery.trace(model, forced) as tr:
        replay = tr.generate(prompts, new_tokens, chat=True)
    assert replay.token_ids == out.token_ids
    assert forced.fired() == rr.fired()
    return out, rr


def test_recycling_at_measured_peaks_equals_the_offline_rule(tiny):
    check_rr_equals_offline(tiny, PROMPTS, ANSWERS, 40)


def test_recycling_at_measured_peaks_rows_alone_equal_rows_batched(tiny):
    out, rr, _ = closed_rr(tiny, PROMPTS, ANSWERS, 32)
    for row in range(len(PROMPTS)):
        alone, single, _ = closed_rr(tiny, PROMPTS[row : row + 1], ANSWERS[row : row + 1], 32)
        assert alone.token_ids[0] == out.token_ids[row]
        assert single.fired()[0] == rr.fired()[row]


def test_peak_signal_waits_for_its_warmup(tiny_llama):
    out, rr, mi = closed_rr(tiny_llama, PROMPTS, ANSWERS, 24, warmup=12)
    assert all(emitted_token(out, row, p) >= 12 for row, ps in enumerate(rr.fired()) for p in ps)


@pytest.mark.slow
def test_smollm2_recycling_at_measured_peaks_equals_the_offline_rule(smollm2):
    prompts = ["What is 7 * 8? Think step by step.", "Tom has 3 apples and buys 5 more. How many now?"]
    check_rr_equals_offline(smollm2, prompts, ["56", "8"], 48, warmup=8, layer=20)


# ---- continuous batching: each prompt's closed loop as alone ---------------------------------

#: The first two rows end together (a pool step with two admissions and no decode between).
SLOT_BUDGETS = [12, 12, 16, 10, 14]


def mi_steering(model, prompts, answers, budgets, stack, batch_size=None):
    """A steering vector fired by MIEstimator's signal, read in the forward after the one that
    measured it (``"previous"``: the last layer's MI above a threshold, steering block 1) or in
    the same forward (``"same"``: the running peaks of block 0's MI, steering block 2)."""
    if stack == "previous":
        mi = MIEstimator(answers=answers, warmup=3)
        when, layer = OnSignal(mi, "value", ">", 0.08, previous=True), 1
    else:
        mi = MIEstimator("resid_post.0", answers=answers, warmup=3)
        when, layer = OnSignal(mi, "peak"), 2
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)).to(model.dtype) * 4
    steer = SteeringVector(vector, layer=layer, when=when)
    with surgery.trace(model, steer, mi) as tr:
        out = tr.generate(prompts, budgets, chat=True, batch_size=batch_size)
    return out, steer, mi


@pytest.mark.parametrize("stack", ["previous", "same"])
def test_mi_closed_loop_in_slots_equals_each_prompt_alone(tiny, stack):
    """batch_size=2 over five prompts (a repeated one): three are admitted into freed slots
    mid-run, while the rows beside them decode; each prompt gets the tokens, firings and MI
    values it gets alone (a signal leaking from a slot's previous row, or overwritten in the
    others' admission prefill, would fire the vector elsewhere)."""
    prompts, answers = [*PROMPTS, PROMPTS[1]], [*ANSWERS, ANSWERS[1]]
    out, steer, mi = mi_steering(tiny, prompts, answers, SLOT_BUDGETS, stack, batch_size=2)
    assert out.timings["steps"] < sum(SLOT_BUDGETS)  # slots were shared
    fired, values = steer.fired(), mi.result(out).values
    assert len(fired) == len(prompts) and any(fired[2:]), "the test needs firings in admitted rows"
    for row in range(len(prompts)):
        alone, single, single_mi = mi_steering(tiny, prompts[row : row + 1], answers[row : row + 1],
                                               SLOT_BUDGETS[row], stack)
        assert alone.token_ids[0] == out.token_ids[row], f"row {row}: tokens differ alone and in slots"
        assert single.fired()[0] == fired[row], f"row {row}: firings differ alone and in slots"
        assert_close(single_mi.result().values[0], values[row], precision=torch.float32)


# ---- SEAL steering gated by the online thought probe ----------------------------------------


def thought_probe(model, site, prompts, new_tokens=40):
    """A linear thought probe fit with fit_linear_probe on the states the classifier recorded
    in a plain run (labels cycled through the three classes: random weights write no reflection)."""
    classifier = ThoughtClassifier(site)
    with surgery.trace(model, classifier) as tr:
        tr.generate(prompts, new_tokens, chat=True)
    found = classifier.result()
    states = found.all_states()
    labels = [("execution", "reflection", "transition")[k % 3] for k in range(len(states))]
    return fit_linear_probe(states, labels)


BLANK_LINE = OnText("\n\n") & StepWindow(1)  # seal_trigger_for a model without think tags


def gated_run(model, probe, site, layer, prompts, new_tokens, classifier_first=False):
    classifier = ThoughtClassifier(site, linear_probe=probe)
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)).to(model.dtype) * 4
    steer = SteeringVector(vector, layer=layer, when=BLANK_LINE & OnSignal(classifier, "predicted").isin(GATED))
    blocks = (classifier, steer) if classifier_first else (steer, classifier)
    with surgery.trace(model, *blocks) as tr:
        out = tr.generate(prompts, new_tokens, chat=True)
    return out, steer, vector


def blank_line_ends(model, fed, prompt_length):
    """Reference for BLANK_LINE: generated positions whose token completes an occurrence of "\n\n"."""
    texts, text, ends = model.vocabulary_texts, "", []
    for position, token in enumerate(fed):
        start = max(len(text) - 1, 0)
        text += texts[token]
        if position >= prompt_length and any(text[i : i + 2] == "\n\n" for i in range(start, len(text) - 1)):
            ends.append(position)
    return ends


def offline_gated_positions(model, probe, site, prompts, out):
    """Where the gated steering should fire, from scratch: every generated token completing a
    blank line whose state at ``site``, read by one plain full-sequence forward over the run's
    tokens (steering sits above ``site``, so it does not change them), the probe labels
    reflection or transition (``probe.predict``, scikit-learn's rule)."""
    rows, candidates = [], []
    for row, prompt in enumerate(prompts):
        ids = surgery.encode_prompts(model, [prompt], chat=True)[0][0].tolist()
        fed = ids + out.token_ids[row][:-1]
        rows.append(fed)
        candidates.append(blank_line_ends(model, fed, len(ids)))
    labels = probe.predict(states_at(model, model.resolve_site(site), rows, candidates))
    found, k = [], 0
    for positions in candidates:
        found.append([p for p, label in zip(positions, labels[k : k + len(positions)]) if label in GATED])
        k += len(positions)
    return found


def check_gated_equals_offline(model, site, layer, prompts, new_tokens):
    probe = thought_probe(model, site, prompts, new_tokens)
    plain = surgery.generate(model, prompts, new_tokens, chat=True)
    out, steer, vector = gated_run(model, probe, site, layer, prompts, new_tokens)
    fired = steer.fired()
    assert fired == offline_gated_positions(model, probe, site, prompts, out)
    assert any(fired), "the test needs at least one firing"
    everywhere = [blank_line_ends(model, surgery.encode_prompts(model, [p], chat=True)[0][0].tolist() + ids[:-1],
                                  out.prompt_lengths[row]) for row, (p, ids) in enumerate(zip(prompts, out.token_ids))]
    assert any(len(f) < len(e) for f, e in zip(fired, everywhere)), "the gate should hold some separators back"
    for row in range(len(prompts)):
        first = (fired[row][0] - out.prompt_lengths[row] + 1) if fired[row] else len(plain.token_ids[row])
        assert out.token_ids[row][:first] == plain.token_ids[row][:first]
    # the vector added at exactly those positions, no probe: the same tokens
    forced = SteeringVector(vector, layer=layer, when=AtPositions(tuple(tuple(p) for p in fired)))
    with surgery.trace(model, forced) as tr:
        replay = tr.generate(prompts, new_tokens, chat=True)
    assert replay.token_ids == out.token_ids and forced.fired() == fired


def test_steering_gated_by_the_thought_probe_equals_the_offline_rule(tiny):
    check_gated_equals_offline(tiny, "resid_pre.1", 2, PROMPTS, 40)


def test_gated_steering_rows_alone_equal_rows_batched(tiny_llama):
    probe = thought_probe(tiny_llama, "resid_pre.1", PROMPTS)
    out, steer, _ = gated_run(tiny_llama, probe, "resid_pre.1", 2, PROMPTS, 32, classifier_first=True)
    for row in range(len(PROMPTS)):
        alone, single, _ = gated_run(tiny_llama, probe, "resid_pre.1", 2, PROMPTS[row : row + 1], 32)
        assert alone.token_ids[0] == out.token_ids[row]
        assert single.fired()[0] == steer.fired()[row]


@pytest.mark.slow
def test_smollm2_gated_steering_equals_the_offline_rule(smollm2):
    prompts = [f"Explain how to {task}. Use several paragraphs." for task in
               ("add fractions", "multiply two numbers", "find a percentage", "solve 2x + 3 = 7")]  # blank lines
    check_gated_equals_offline(smollm2, "resid_pre.18", 21, prompts, 128)


# ---- what the trace refuses -----------------------------------------------------------------


def test_a_signal_read_before_it_exists_is_refused_at_trace_entry(tiny_llama):
    probe = thought_probe(tiny_llama, "resid_pre.1", PROMPTS[:2])
    vector = torch.zeros(tiny_llama.d_model, dtype=tiny_llama.dtype)

    def steering(classifier, layer, **options):
        return SteeringVector(vector, layer=layer, when=OnSignal(classifier, "predicted", "in", ["reflection"], **options))

    later = ThoughtClassifier("resid_pre.2", linear_probe=probe)
    with pytest.raises(ValueError, match=r"resid_pre\.1, but the probe computes it at resid_pre\.2, later in the forward"):
        surgery.trace(tiny_llama, steering(later, 1), later).__enter__()
    same = ThoughtClassifier("resid_pre.1", linear_probe=probe)
    with pytest.raises(ValueError, match="the same site"):
        surgery.trace(tiny_llama, steering(same, 1), same).__enter__()
    assert tiny_llama._active_trace is None and not any(b._forward_pre_hooks for b in tiny_llama.module.model.layers)
    with surgery.trace(tiny_llama, steering(later, 1, previous=True), later) as tr:  # the previous step's value
        tr.generate(PROMPTS[:1], 4)
    earlier = ThoughtClassifier("resid_pre.0", linear_probe=probe)
    with surgery.trace(tiny_llama, steering(earlier, 1), earlier):
        pass
    mi = MIEstimator(answers=ANSWERS[:1])  # the token-choice phase reads the last layer's signal
    with surgery.trace(tiny_llama, RepresentationRecycling(layer=1, when=OnSignal(mi, "peak")), mi) as tr:
        tr.generate(PROMPTS[:1], 4)


def test_signal_errors_name_the_fix(tiny_llama):
    mi = MIEstimator(answers=ANSWERS[:1])
    rr = RepresentationRecycling(layer=1, when=OnSignal(mi, "peak"))
    with pytest.raises(ValueError, match="not attached"):
        surgery.trace(tiny_llama, rr).__enter__()
    with pytest.raises(ValueError, match="publishes no signal 'peaks'.*'value', 'fence', 'peak'"):
        surgery.trace(tiny_llama, RepresentationRecycling(layer=1, when=OnSignal(mi, "peaks")), mi).__enter__()
    with pytest.raises(ValueError, match="float signal: compare it"):
        surgery.trace(tiny_llama, RepresentationRecycling(layer=1, when=OnSignal(mi, "value")), mi).__enter__()
    with pytest.raises(ValueError, match="signals need the online linear probe"):
        classifier = ThoughtClassifier("resid_pre.0")
        surgery.trace(tiny_llama, RepresentationRecycling(layer=1, when=OnSignal(classifier, "predicted").isin(GATED)),
                      classifier).__enter__()
    with pytest.raises(ValueError, match="no such probe is attached"):
        surgery.trace(tiny_llama, RepresentationRecycling(layer=1, when=OnSignal("mi_estimator", "peak"))).__enter__()
    with surgery.trace(tiny_llama, RepresentationRecycling(layer=1, when=OnSignal("mi_estimator", "peak")), mi) as tr:
        tr.generate(PROMPTS[:1], 4)  # by registry name, as a config file names it
    assert tiny_llama._active_trace is None


def test_a_gate_may_name_a_class_the_probe_was_not_fit_on(tiny_llama):
    """A thought probe fit without transition thoughts (SmolLM2's traces give none) still gates on
    ["reflection", "transition"]: transition matches nothing; a misspelt class is an error."""
    classifier = ThoughtClassifier("resid_pre.1")
    with surgery.trace(tiny_llama, classifier) as tr:
        tr.generate(PROMPTS, 40, chat=True)
    states = classifier.result().all_states()
    probe = fit_linear_probe(states, [("execution", "reflection")[k % 2] for k in range(len(states))])
    assert probe.classes == ("execution", "reflection")
    online = ThoughtClassifier("resid_pre.1", linear_probe=probe)
    vector = torch.zeros(tiny_llama.d_model, dtype=tiny_llama.dtype)
    steer = SteeringVector(vector, layer=2, when=BLANK_LINE & OnSignal(online, "predicted").isin(GATED))
    with surgery.trace(tiny_llama, steer, online) as tr:
        out = tr.generate(PROMPTS, 40, chat=True)
    assert steer.fired() == offline_gated_positions(tiny_llama, probe, "resid_pre.1", PROMPTS, out)
    typo = SteeringVector(vector, layer=2, when=OnSignal(online, "predicted").isin(["reflecton"]))
    with pytest.raises(ValueError, match=r"classes \['execution', 'reflection', 'transition'\]: \['reflecton'\]"):
        surgery.trace(tiny_llama, typo, online).__enter__()


def test_on_signal_round_trips_and_compares():
    rule = OnSignal("mi_estimator", "value") > 0.5
    assert (rule.op, rule.value) == (">", 0.5)
    assert surgery.Trigger.from_dict(rule.to_dict()) == rule
    gated = BLANK_LINE & OnSignal("thought_classifier@resid_pre.3", "predicted").isin(["reflection", "transition"])
    assert surgery.Trigger.from_dict(gated.to_dict()) == gated
    assert gated.signal_triggers()[0].value == ("reflection", "transition")
    with pytest.raises(ValueError, match="op must be one of"):
        OnSignal("mi_estimator", "value", "=>", 1.0)
    with pytest.raises(ValueError, match="needs a list"):
        OnSignal("mi_estimator", "value", "in", 1.0)


def test_the_readme_closed_loop_condition_is_a_valid_study_block():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = re.search(r'^blocks = \[\{ type = "representation_recycling".*signal = "peak".*$', readme, re.MULTILINE).group(0)
    (table,) = tomllib.loads(line)["blocks"]
    spec = parse_block("conditions.rr_peaks.blocks[0]", table, ".", None, kind="intervention")
    assert surgery.Trigger.from_dict(spec.config["when"]) == OnSignal("mi_estimator", "peak")
