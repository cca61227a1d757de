"""Every probe's results for chosen rows only (``result(rows=...)``, ``by_row(rows)``).

Under continuous batching a study saves each prompt's record as soon as the prompt retires, while
other prompts still run in their slots: a probe gives the entries of the rows asked for, each
equal to that row's entry in the whole result after the run, and refuses, naming it, a row that
has not retired yet. Without slots, ``rows`` selects rows of the finished batch.
"""

from types import SimpleNamespace

import pytest
import torch
from conftest import ANSWERS, PROMPTS
from tolerance import assert_close

import surgery
from probes import RecordSite
from probes.mi import MIEstimator
from probes.reasoning_graph import ReasoningGraph
from probes.thought_classifier import ThoughtClassifier
from surgery.triggers import OnText, StepWindow

# five prompts (one repeated) through two slots; budgets that end rows at different steps, so
# prompts retire out of order and later prompts take freed slots mid-run
SLOT_PROMPTS, BUDGETS = [*PROMPTS, PROMPTS[1]], [6, 20, 9, 14, 11]
CHOSEN = [3, 1]

PROBES = {
    "mi": lambda model: MIEstimator(answers=[*ANSWERS, "42"], warmup=3),
    "thoughts": lambda model: ThoughtClassifier("resid_pre.0"),
    "graph": lambda model: ReasoningGraph.for_model(model, min_chars=1),
    "graph_released": lambda model: ReasoningGraph.for_model(model, min_chars=1, steps="released"),
    "record": lambda model: RecordSite("resid_post.1", when=OnText("\n\n") | StepWindow(2, 4)),
}


def run_in_slots(model, probe, read=None):
    """Generate :data:`SLOT_PROMPTS` through two slots; ``read(row)`` runs right after each row retires."""
    with surgery.trace(model, probe) as tr:
        if read is not None:
            retire = tr._retire

            def retire_then_read(slot: int, row: int) -> None:
                retire(slot, row)
                read(row)

            tr._retire = retire_then_read  # the engine gets on_retire=tr._retire when generate starts
        out = tr.generate(SLOT_PROMPTS, BUDGETS, chat=True, batch_size=2)
    assert out.timings["steps"] < sum(BUDGETS)  # slots were shared
    return out


def same_entry(got, expected, path):
    """Float32 states (MI: float64 values of float32 states), compared by the suite's policy."""
    assert_close(got, expected, precision=torch.float32, path=path)


@pytest.mark.parametrize("name", sorted(PROBES))
def test_chosen_rows_after_a_run_in_slots_equal_those_of_the_whole_result(tiny_llama, name):
    probe = PROBES[name](tiny_llama)
    run_in_slots(tiny_llama, probe)
    whole = probe.by_row()
    assert len(whole) == len(SLOT_PROMPTS)
    same_entry(probe.by_row(CHOSEN), [whole[row] for row in CHOSEN], f"{name}.by_row({CHOSEN})")
    assert probe.by_row([]) == []
    same_entry(probe.by_row(), whole, f"{name}.by_row() again")  # nothing cached from the partial reads


@pytest.mark.parametrize("name", sorted(PROBES))
def test_each_row_read_as_it_retires_equals_its_entry_after_the_run(tiny_llama, name):
    """Also, the reads change nothing: the whole result equals a run's without them (the released
    re-encoding is a forward of its own mid-run, which no block of the trace may see)."""
    clean = PROBES[name](tiny_llama)
    run_in_slots(tiny_llama, clean)
    probe = PROBES[name](tiny_llama)
    read, order, refused = {}, [], []

    def read_row(row: int) -> None:
        read[row] = probe.by_row([row])
        order.append(row)
        waiting = [r for r in range(len(SLOT_PROMPTS)) if r not in order]
        if waiting:  # a row still running, or not admitted yet
            with pytest.raises(ValueError, match=f"row {waiting[0]} has not finished"):
                probe.by_row([waiting[0]])
            refused.append(waiting[0])

    run_in_slots(tiny_llama, probe, read_row)
    assert order != sorted(order) and len(refused) == len(SLOT_PROMPTS) - 1  # rows retired out of order
    whole = probe.by_row()
    same_entry(whole, clean.by_row(), f"{name}.by_row() after reads mid-run")
    for row in range(len(SLOT_PROMPTS)):
        same_entry(read[row][0], whole[row], f"{name}: row {row} read as it retired")


@pytest.mark.parametrize("name", sorted(PROBES))
def test_rows_select_rows_of_a_fixed_batch(tiny_llama, name):
    probe = PROBES[name](tiny_llama)
    prompts = SLOT_PROMPTS if name == "mi" else PROMPTS  # MI: one answer per prompt
    with surgery.trace(tiny_llama, probe) as tr:
        tr.generate(prompts, 12, chat=True)
    whole = probe.by_row()
    same_entry(probe.by_row(CHOSEN), [whole[row] for row in CHOSEN], f"{name}.by_row({CHOSEN})")


def test_mi_result_of_chosen_rows(tiny_llama):
    probe = PROBES["mi"](tiny_llama)
    read = {}
    out = run_in_slots(tiny_llama, probe, lambda row: read.setdefault(row, probe.result(rows=[row])))
    whole, got = probe.result(out), probe.result(out, rows=CHOSEN)
    assert (got.peak_rule, got.top_k, got.ratio_steps, got.precision) == (
        whole.peak_rule, whole.top_k, whole.ratio_steps, whole.precision)
    for k, row in enumerate(CHOSEN):
        assert torch.equal(got.values[k], whole.values[row]) and torch.equal(got.peaks[k], whole.peaks[row])
        assert_close(got.stats[k], whole.stats[row])
    for row, alone in read.items():  # read mid-run, when fewer prompts than answers had been admitted
        assert torch.equal(alone.values[0], whole.values[row]) and torch.equal(alone.peaks[0], whole.peaks[row])
        assert_close(alone.stats[0], whole.stats[row])
    assert sum(len(v) for v in whole.values) > 0
    wrong = SimpleNamespace(lengths=[out.lengths[0] + 1, *out.lengths[1:]])  # only row 0's is off
    assert len(probe.result(wrong, rows=CHOSEN).values) == len(CHOSEN)  # out is checked at the rows asked for
    with pytest.raises(ValueError, match="out does not match"):
        probe.result(wrong, rows=[0])


def test_thought_classifier_result_of_chosen_rows(tiny_llama):
    probe = PROBES["thoughts"](tiny_llama)
    run_in_slots(tiny_llama, probe)
    whole, got = probe.result(), probe.result(rows=CHOSEN)
    assert got.thoughts == [whole.thoughts[row] for row in CHOSEN] and got.site == whole.site
    assert_close(got.states, [whole.states[row] for row in CHOSEN])
    per_row = [probe.result(rows=[row]).n_recorded for row in range(len(SLOT_PROMPTS))]
    assert got.n_recorded == per_row[3] + per_row[1] and sum(per_row) == whole.n_recorded
    assert sum(map(len, whole.thoughts)) > 0  # real thoughts were compared


@pytest.mark.parametrize("steps", ["streaming", "released"])
def test_reasoning_graph_partial_reads_do_not_change_the_cached_result(tiny_llama, steps):
    probe = PROBES["graph" if steps == "streaming" else "graph_released"](tiny_llama)
    run_in_slots(tiny_llama, probe)
    partial = probe.result(rows=CHOSEN)  # before any whole result: not cached
    assert len(partial) == len(CHOSEN) and partial.steps == steps
    whole = probe.result()
    assert len(whole) == len(SLOT_PROMPTS) and sum(len(v) for v in whole) > 0
    assert_close(list(partial), [whole[row] for row in CHOSEN])
    assert_close(list(probe.result(rows=CHOSEN)), [whole[row] for row in CHOSEN])  # from the cache
    if steps == "released":
        questions, texts = probe.released_inputs()
        assert probe.released_inputs(CHOSEN) == ([questions[r] for r in CHOSEN], [texts[r] for r in CHOSEN])


def test_record_site_result_of_chosen_rows(tiny_llama):
    probe = PROBES["record"](tiny_llama)
    run_in_slots(tiny_llama, probe)
    whole, got = probe.result(), probe.result(rows=CHOSEN)
    keep = (whole.rows == 3) | (whole.rows == 1)
    assert keep.any() and not keep.all()
    assert_close(got, type(whole)(whole.rows[keep], whole.positions[keep], whole.steps[keep], whole.values[keep]))


def test_a_row_that_never_ran_is_refused(tiny_llama):
    probe = PROBES["mi"](tiny_llama)
    run_in_slots(tiny_llama, probe)
    with pytest.raises(ValueError, match="row 7 has not finished"):
        probe.result(rows=[7])
