"""ReasoningGraph: streamed step vectors equal an uncached forward; buffer growth; steps="released"
equals the transcribed released rule (tests/test_released_steps.py); options, configs; SmolLM2."""

import json
import math

import pytest
import torch
from conftest import PNG_MAGIC, PROMPTS
from tolerance import assert_close

import surgery
from probes.graph_metrics import GraphAnalysis
from probes.kmeans import fit_clusters
from probes.plots import plot_trajectory
from probes.reasoning_graph import ReasoningGraph
from surgery.blocks import Block, block_class
from surgery.sites import Site
from surgery.step import Step
from test_released_steps import (  # noqa: F401 (r1 is a fixture)
    GSM_QUESTION,
    assert_rows_equal_rule,
    kept_lines,
    newline_token_ids,
    r1,
    released_rule,
)


# ---- references --------------------------------------------------------------------------------
def naive_step_vectors(model, prompt, generated, layer, min_chars):
    """One uncached forward over prompt + fed generated tokens; split by the released rule on strings."""
    ids, _ = surgery.encode_prompts(model, [prompt])
    prompt_ids = ids[0].tolist()
    fed = prompt_ids + generated[:-1]  # the last generated token is never fed
    with torch.no_grad():
        hidden = model.module(input_ids=torch.tensor([fed]), output_hidden_states=True).hidden_states[layer][0]
    texts = model.vocabulary_texts
    pieces, current = [], []
    for position in range(len(prompt_ids), len(fed)):
        current.append(position)
        if texts[fed[position]].endswith("\n"):
            pieces.append(current)
            current = []
    if current:
        pieces.append(current)
    kept = [p for p in pieces if len("".join(texts[fed[i]] for i in p).strip()) > min_chars]
    if not kept:
        return torch.zeros(0, hidden.shape[-1])
    return torch.stack([hidden[p].mean(0) for p in kept])


def run_probe(model, prompts, new_tokens, batch_size=None, **options):
    probe = ReasoningGraph.for_model(model, **options)
    with surgery.trace(model, probe) as tr:
        out = tr.generate(prompts, new_tokens, **({"batch_size": batch_size} if batch_size else {}))
    return probe, out


# ---- the probe -----------------------------------------------------------------------------------
@pytest.mark.parametrize("min_chars", [5, 0])
def test_streamed_step_vectors_equal_an_uncached_forward(tiny, min_chars):
    probe, out = run_probe(tiny, PROMPTS, 24, min_chars=min_chars)
    layer = int(0.9 * tiny.n_layers)
    assert probe.config.site == f"resid_pre.{layer}"
    got = probe.result()
    assert len(got) == len(PROMPTS)
    total = 0
    for row, prompt in enumerate(PROMPTS):
        expected = naive_step_vectors(tiny, prompt, out.token_ids[row], layer, min_chars)
        assert got[row].shape == expected.shape
        # 1e-5 relative to the states' scale (up to ~25 here): the cached decode and the uncached
        # forward sum in different orders, ~1e-6 of the scale apart in float32.
        assert_close(got[row], expected)
        total += len(expected)
    assert total >= len(PROMPTS)  # the check compared real steps
    assert [v.shape for v in probe.result()] == [v.shape for v in got]  # result() is repeatable


def test_probe_does_not_change_tokens(tiny):
    _, out = run_probe(tiny, PROMPTS, 16)
    assert out.token_ids == surgery.generate(tiny, PROMPTS, 16).token_ids


def test_rows_alone_equal_rows_batched(tiny_llama):
    batched, _ = run_probe(tiny_llama, PROMPTS, 20, min_chars=0)
    together = batched.result()
    for row, prompt in enumerate(PROMPTS):
        alone, _ = run_probe(tiny_llama, [prompt], 20, min_chars=0)
        assert_close(alone.result()[0], together[row])


def test_default_site_comes_from_the_model(tiny_llama):
    probe = ReasoningGraph()
    with pytest.raises(ValueError, match="for_model"):
        probe.sites()  # unbound: no model to pick the site from yet
    with surgery.trace(tiny_llama, probe) as tr:  # the trace binds it first
        assert tr.blocks == [probe]
    assert probe.sites() == ("resid_pre.3",) == (ReasoningGraph.for_model(tiny_llama).config.site,)
    assert block_class("reasoning_graph") is ReasoningGraph
    with pytest.raises(ValueError, match="step rule"):
        ReasoningGraph(step="paragraph")


def test_no_generated_steps_give_the_documented_empty_result(tiny_llama):
    probe, _ = run_probe(tiny_llama, PROMPTS, 1)  # one token: nothing generated is ever fed
    steps = probe.result()
    assert [tuple(v.shape) for v in steps] == [(0, 64)] * len(PROMPTS)
    empty = probe.analyse(n_clusters=200)
    assert isinstance(empty, GraphAnalysis)
    assert empty.cycle_detection_ratio == 0.0 and empty.centers.shape == (0, 64)
    assert all(len(g) == 0 for g in empty.graphs) and all(m.n_steps == 0 and not m.has_cycle for m in empty.metrics)
    with pytest.raises(ValueError, match="n_clusters=3 is more than the 0 step vectors"):
        fit_clusters(steps, 3)


class StubModel:
    """What bind() reads from a model, over a made-up vocabulary (no weights)."""

    def __init__(self, texts, width, n_layers=10):
        self.vocabulary_texts, self.d_model, self.n_layers = texts, width, n_layers
        self.device, self.name = torch.device("cpu"), "stub"

    def resolve_site(self, site):
        return Site.parse(site).resolve(self.n_layers)

    def site_width(self, site):
        return self.d_model


def test_buffer_grows_past_its_capacity_and_keeps_every_step():
    # ids 0-4 end a line (1 and 2 too short to keep). 400 decode steps over 3 rows, one row
    # finishing early.
    texts = ["abcdef\n", " x\n", "\n", "  hello world \n", "ab cd\n", "abc", " ", "de", "\t"]
    model = StubModel(texts, width=5)
    probe = ReasoningGraph(site="resid_pre.9", min_chars=2)
    probe.bind(model)
    probe.reset(3)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(len(texts), (3, 400), generator=generator)
    values = torch.randn(3, 400, 5, generator=generator)
    finished = torch.zeros(3, dtype=torch.bool)
    step = Step.prefill(torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
    probe.observe("resid_pre.9", torch.randn(3, 2, 5), step)  # the prefill is ignored
    with torch.inference_mode():  # as the engine runs; result() is read outside it
        for k in range(400):
            finished = finished | torch.tensor([False, False, k >= 300])
            step = step.next(tokens[:, k], finished, (None, None))
            probe.observe("resid_pre.9", values[:, k : k + 1], step)
    got = probe.result()
    for row in range(3):
        n = 300 if row == 2 else 400
        pieces, current = [], []
        for k in range(n):
            current.append(k)
            if texts[tokens[row, k]].endswith("\n"):
                pieces.append(current)
                current = []
        pieces += [current] if current else []
        kept = [p for p in pieces if len("".join(texts[tokens[row, k]] for k in p).strip()) > 2]
        expected = torch.stack([values[row, p].mean(0) for p in kept])
        assert len(expected) > 64  # more steps than the initial capacity
        assert_close(got[row], expected)
    assert 64 < probe._streamed.buffer.shape[1] <= 4 * max(len(v) for v in got)  # grows with steps, not tokens


# ---- continuous batching -------------------------------------------------------------------------
SLOT_PROMPTS, BUDGETS = [*PROMPTS, PROMPTS[1]], [6, 24, 9, 14, 11]  # a repeated prompt, budgets that free slots


@pytest.mark.parametrize("steps", ["streaming", "released"])
def test_result_in_slots_equals_each_prompt_alone(tiny_llama, steps):
    probe, out = run_probe(tiny_llama, SLOT_PROMPTS, BUDGETS, steps=steps, min_chars=1, batch_size=2)
    assert out.timings["steps"] < sum(BUDGETS)  # slots were shared
    got = probe.result()
    assert len(got) == len(SLOT_PROMPTS) and got.steps == steps and got.site == "resid_pre.3"
    for row, (prompt, budget) in enumerate(zip(SLOT_PROMPTS, BUDGETS)):
        alone, alone_out = run_probe(tiny_llama, [prompt], budget, steps=steps, min_chars=1)
        assert alone_out.token_ids[0] == out.token_ids[row]
        assert_close(got[row], alone.result()[0], path=f"row {row}")
        if steps == "released":
            assert [texts[0] for texts in alone.released_inputs()] == [texts[row] for texts in probe.released_inputs()]
    assert sum(len(v) for v in got) >= len(SLOT_PROMPTS)  # real vectors were compared
    with surgery.trace(tiny_llama, probe) as tr:  # a fixed batch afterwards: as before
        tr.generate(PROMPTS, 20)
    fresh, _ = run_probe(tiny_llama, PROMPTS, 20, steps=steps, min_chars=1)
    assert_close(list(probe.result()), list(fresh.result()))


def test_released_questions_in_slots(tiny_llama):
    questions = [f"Question {i}" for i in range(len(SLOT_PROMPTS))]
    probe, _ = run_probe(tiny_llama, SLOT_PROMPTS, BUDGETS, steps="released", questions=questions, batch_size=2)
    assert probe.released_inputs()[0] == questions  # one per prompt, more than the slots
    probe, _ = run_probe(tiny_llama, SLOT_PROMPTS, BUDGETS, steps="released", questions=questions[:4], batch_size=2)
    with pytest.raises(ValueError, match="4 questions for a run of 5 rows"):
        probe.result()


# ---- the real model --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_steps_graph_and_plot(smollm2, tmp_path):
    prompts = ["What is 7 * 8? Explain step by step.", "List three prime numbers, one per line.",
               "Tom has 3 apples and buys 5 more. How many apples does he have? Think step by step."]
    probe = ReasoningGraph.for_model(smollm2, min_chars=5)
    assert probe.config.site == f"resid_pre.{int(0.9 * smollm2.n_layers)}"
    with surgery.trace(smollm2, probe) as tr:
        out = tr.generate(prompts, 64, chat=True)
    steps = probe.result()
    total = sum(len(v) for v in steps)
    assert total >= 3, out.texts
    assert all(v.shape[1] == smollm2.d_model and torch.isfinite(v).all() for v in steps)
    found = probe.analyse(n_clusters=min(4, total))
    assert len(found.metrics) == len(prompts) and 0.0 <= found.cycle_detection_ratio <= 1.0
    for labels, m, v in zip(found.labels, found.metrics, steps):
        assert m.n_steps == len(labels) == len(v)
        assert math.isfinite(m.diameter) and m.diameter >= 0
    row = max(range(len(steps)), key=lambda i: len(steps[i]))
    path = plot_trajectory(steps[row], found.labels[row], found.centers, tmp_path / "smollm2.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


# ---- steps="released" ----------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("min_chars", [5, 1])
def test_released_mode_equals_the_released_rule(tiny, chat, min_chars):
    probe = ReasoningGraph.for_model(tiny, steps="released", min_chars=min_chars)
    with surgery.trace(tiny, probe) as tr:
        out = tr.generate(PROMPTS, 40, chat=chat)
    questions, texts = probe.released_inputs()
    assert questions == PROMPTS  # the user turn (chat) or the prompt text (the tiny tokenizer adds no BOS)
    fed = [ids[:-1] for ids in out.token_ids]  # the last generated token is never fed back
    assert texts == tiny.tokenizer.batch_decode(fed, skip_special_tokens=True)
    layer = int(0.9 * tiny.n_layers)
    newlines = newline_token_ids(tiny.tokenizer)
    expected = [released_rule(tiny, q, t, layer, newlines, min_chars) for q, t in zip(questions, texts)]
    got = probe.result()
    assert got.steps == "released" and got.site == f"resid_pre.{layer}"
    assert_rows_equal_rule(got, expected, tiny.d_model)
    assert sum(len(v) for v in got) >= len(PROMPTS)  # real vectors were compared
    assert [v.shape for v in probe.result()] == [v.shape for v in got]  # repeatable, one forward per run


def test_r1_chat_prompts_give_the_user_turn_as_question(r1):
    model, _ = r1
    prompts = [GSM_QUESTION, "What is 7 * 8?\nThink step by step."]
    for chat in (True, False):
        probe = ReasoningGraph.for_model(model, steps="released")
        with surgery.trace(model, probe) as tr:
            tr.generate(prompts, 3, chat=chat)
        assert probe.released_inputs()[0] == prompts  # chat: the user turn; plain: the text, BOS skipped
        assert [tuple(v.shape) for v in probe.result()] == [(0, model.d_model)] * 2  # two fed tokens: no lines
    given = ReasoningGraph.for_model(model, steps="released", questions=["Q one", "Q two"])
    with surgery.trace(model, given) as tr:
        tr.generate(prompts, 3, chat=True)
    assert given.released_inputs()[0] == ["Q one", "Q two"]
    # a system prompt before the user turn: not one user turn, the questions must be given
    system = model.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": GSM_QUESTION}],
        tokenize=False, add_generation_prompt=True)
    probe = ReasoningGraph.for_model(model, steps="released")
    with surgery.trace(model, probe) as tr:
        tr.generate([model.tokenizer(system, add_special_tokens=False)["input_ids"]], 3)
    with pytest.raises(ValueError, match="questions="):
        probe.result()


# ---- options, configs, errors --------------------------------------------------------------------
def test_the_default_is_unchanged_and_old_configs_load():
    default = ReasoningGraph()
    assert default.config.steps == "streaming" and default.config.step == "line"
    old = {"block": "reasoning_graph",
           "config": {"site": "resid_pre.3", "n_clusters": 7, "step": "line", "min_chars": 5, "seed": 0, "n_init": 10}}
    loaded = Block.from_dict(old)
    assert loaded.config == ReasoningGraph(site="resid_pre.3", n_clusters=7).config
    released = ReasoningGraph(steps="released", prompt_line=False, drop_last_step=False, max_length=None,
                              template="Q: {question}\n", questions=["a", "b"])
    again = Block.from_dict(json.loads(json.dumps(released.to_dict())))
    assert again.config == released.config and again.config.questions == ("a", "b")


def test_bad_released_settings_are_clear_errors(tiny_llama):
    with pytest.raises(ValueError, match="unknown steps='stream'"):
        ReasoningGraph(steps="stream")
    with pytest.raises(ValueError, match="'{question}' exactly once"):
        ReasoningGraph(steps="released", template="Q: {Question}")
    with pytest.raises(ValueError, match="max_length must be an int >= 1"):
        ReasoningGraph(steps="released", max_length=0)
    with pytest.raises((ValueError, TypeError)):  # jaxtyping's TypeError under pytest, ours otherwise
        ReasoningGraph(steps="released", prompt_line="yes")
    with pytest.raises(ValueError, match="only steps='released' takes drop_last_step"):
        ReasoningGraph(drop_last_step=False)
    with pytest.raises(ValueError, match="questions is a list of strings"):
        ReasoningGraph(steps="released", questions="What is 2 + 2?")
    with pytest.raises(ValueError, match="2 questions for 4 rows at once"):
        with surgery.trace(tiny_llama, ReasoningGraph(steps="released", questions=["a", "b"])) as tr:
            tr.generate(PROMPTS, 2)
    with pytest.raises(ValueError, match="belongs to ReasoningGraph"):
        ReasoningGraph().released_inputs()
    with pytest.raises(RuntimeError, match="has not run"):
        ReasoningGraph(steps="released").result()


def test_released_denominator_leaves_out_the_skipped_samples(tiny_llama):
    probe = ReasoningGraph.for_model(tiny_llama, steps="released", min_chars=3, n_clusters=3, n_init=2)
    prompts = PROMPTS
    with surgery.trace(tiny_llama, probe) as tr:
        tr.generate(prompts, 20)
    _, texts = probe.released_inputs()
    embedded = [len(kept_lines(t, 3)) >= 2 for t in texts]  # the samples the released code keeps
    assert any(embedded) and not all(embedded)  # both kinds occur
    assert [len(v) > 0 for v in probe.result()] == embedded
    everyone, released = probe.analyse(), probe.analyse(min_steps=1)
    cycles = [m.has_cycle for m in released.metrics]
    assert released.min_steps == 1 and everyone.min_steps == 0
    assert everyone.cycle_detection_ratio == sum(cycles) / len(prompts)
    assert released.cycle_detection_ratio == sum(c for c, e in zip(cycles, embedded) if e) / sum(embedded)


@pytest.mark.slow
def test_smollm2_released_steps_equal_the_rule(smollm2):
    prompts = ["What is 7 * 8? Explain step by step.",
               "Tom has 3 apples and buys 5 more. How many apples? Think step by step."]
    probe = ReasoningGraph.for_model(smollm2, steps="released")
    with surgery.trace(smollm2, probe) as tr:
        tr.generate(prompts, 64, chat=True)
    questions, texts = probe.released_inputs()
    assert questions == prompts  # the user turn of SmolLM2's chat template
    layer = int(0.9 * smollm2.n_layers)
    newlines = newline_token_ids(smollm2.tokenizer)
    expected = [released_rule(smollm2, q, t, layer, newlines) for q, t in zip(questions, texts)]
    got = probe.result()
    assert_rows_equal_rule(got, expected, smollm2.d_model)
    assert sum(len(v) for v in got) >= 2, texts
