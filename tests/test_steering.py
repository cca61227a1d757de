"""SteeringVector: SEAL's trigger, extraction against a naive reference, saving and loading."""

import json

import pytest
import torch
from conftest import PROMPTS, separator_positions, tiny_model
from tolerance import assert_close

import surgery
from interventions import SteeringVector, seal_trigger, seal_trigger_for
from surgery.thoughts import thought_positions, trigger_positions

TRACES = [
    ("Tom has 3 apples.", "Let me see.\n\nHe buys 5 more, so 8.\n\nWait, let me check: 3 + 5 = 8.\n\nSo 8.</think>\n\nIt is 8."),
    ("What is 7 * 8?", "First.\n\n7 * 8 = 56.\n\nAlternatively, 8 * 7 = 56.\n\n\nTherefore 56."),
    ("Hmm, the train goes 60 miles in 2 hours.", "Speed.\n\nSo 30.\n\nHold on, 60 / 2 = 30.\n\nThen 30."),
]


def naive_vector(model, traces, layer, chat=True):
    """Reference: full hidden states of every trace kept, then averaged by label."""
    states = {"execution": [], "reflection": [], "transition": []}
    for prompt, completion in traces:
        ids, _ = surgery.encode_prompts(model, [prompt], chat=chat)
        prompt_row = ids[0].tolist()
        completion_row = (model.tokenizer(completion, add_special_tokens=False)["input_ids"]
                          if isinstance(completion, str) else list(completion))
        with torch.no_grad():
            hidden = model.module(input_ids=torch.tensor([prompt_row + completion_row]),
                                  output_hidden_states=True).hidden_states[layer][0]
        for position, label in thought_positions(model, prompt_row, completion_row):
            states[label].append(hidden[position])
    execution = torch.stack(states["execution"]).double().mean(0)
    other = torch.stack(states["reflection"] + states["transition"]).double().mean(0)
    return (execution - other).float(), {k: len(v) for k, v in states.items()}


def test_default_trigger_is_seal_and_fires_at_separators_inside_think_from_the_prompt_end(tiny):
    # odd rows' prompts hold separators inside an open <think>: SEAL (and its released code)
    # steers only the last prompt position in the prefill, never the earlier ones
    prompts = [p + "\n\n<think>\nSo.\n\nThen.\n\n" if i % 2 else p for i, p in enumerate(PROMPTS)]
    steer = SteeringVector(torch.zeros(tiny.d_model), layer=1)
    assert steer.config.when == seal_trigger() and steer.config.site == "resid_pre.1"
    with surgery.trace(tiny, steer) as tr:
        out = tr.generate(prompts, 24, chat=True)
    assert steer.fired() == separator_positions(tiny, prompts, out, from_prompt_end=True)
    everywhere = separator_positions(tiny, prompts, out)
    assert any(set(everywhere[i]) - set(steer.fired()[i]) for i in range(1, len(prompts), 2))  # prompt ones left alone
    assert any(p >= n for row, n in zip(steer.fired(), out.prompt_lengths) for p in row)


def test_thought_positions_point_at_the_opening_separator(tiny):
    prompt, completion = TRACES[0]
    ids, _ = surgery.encode_prompts(tiny, [prompt], chat=True)
    completion_row = tiny.tokenizer(completion, add_special_tokens=False)["input_ids"]
    found = thought_positions(tiny, ids[0].tolist(), completion_row)
    tokens = ids[0].tolist() + completion_row
    assert [label for _, label in found] == ["execution", "reflection", "execution"]  # not after </think>
    assert all("\n\n" in tiny.vocabulary_texts[tokens[p]] for p, _ in found)


@pytest.mark.parametrize("layer", [0, 2, -1])
def test_extraction_equals_the_naive_full_hidden_state_reference(tiny, layer):
    steer = SteeringVector.from_thoughts(tiny, TRACES, layer=layer, chat=True, batch_size=2)
    reference, counts = naive_vector(tiny, TRACES, layer % tiny.n_layers)
    assert_close(steer.vector, reference)
    assert steer.metadata["class_counts"] == counts == {"execution": 6, "reflection": 2, "transition": 1}
    assert steer.metadata["site"] == f"resid_pre.{layer % tiny.n_layers}"


def test_extraction_reads_token_ids_as_generated_not_retokenised(tiny):
    # ids as a model emits them: each piece its own tokens, which tokenising the joined text need not give
    pieces = [piece for _, completion in TRACES for piece in [completion.split("\n\n")]]
    traces = [(prompt, [t for i, piece in enumerate(split) for t in
                        tiny.tokenizer(("\n\n" if i else "") + piece, add_special_tokens=False)["input_ids"]])
              for (prompt, _), split in zip(TRACES, pieces, strict=True)]
    steer = SteeringVector.from_thoughts(tiny, traces, layer=1, chat=True, batch_size=2)
    reference, counts = naive_vector(tiny, traces, 1)
    assert_close(steer.vector, reference)
    assert steer.metadata["class_counts"] == counts and counts["reflection"] + counts["transition"] > 0


def test_save_and_load_round_trip(tiny, tmp_path):
    steer = SteeringVector.from_thoughts(tiny, TRACES, layer=1, chat=True, alpha=0.5)
    path = steer.save(tmp_path / "seal.safetensors")
    loaded = SteeringVector.load(path)
    assert torch.equal(loaded.vector, steer.vector) and loaded.config == steer.config
    assert loaded.metadata == json.loads(json.dumps(steer.metadata))
    with surgery.trace(tiny, steer) as tr:
        a = tr.generate(PROMPTS, 12, chat=True)
    with surgery.trace(tiny, loaded) as tr:
        b = tr.generate(PROMPTS, 12, chat=True)
    assert a.token_ids == b.token_ids


def test_loading_onto_another_width_or_architecture_is_a_clear_error(tiny_llama, tokenizer, tmp_path):
    qwen = tiny_model("qwen2", tokenizer)
    path = SteeringVector.from_thoughts(qwen, TRACES, layer=1, chat=True).save(tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match="extracted from a qwen2 model"):
        with surgery.trace(tiny_llama, SteeringVector.load(path)):
            pass
    wider = SteeringVector(torch.ones(64), layer=1, metadata={})
    with pytest.raises(ValueError, match="width 64"):
        with surgery.trace(qwen, wider):
            pass
    (tmp_path / "other.safetensors").write_bytes(b"")
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a surgery file"):
        SteeringVector.load(tmp_path / "other.safetensors")


def test_alpha_zero_is_the_identity_and_rows_steer_as_alone(tiny):
    steer = SteeringVector.from_thoughts(tiny, TRACES, layer=1, chat=True)
    with surgery.trace(tiny, SteeringVector(steer.vector, layer=1, alpha=0.0)) as tr:
        assert tr.generate(PROMPTS, 16, chat=True).token_ids == surgery.generate(tiny, PROMPTS, 16, chat=True).token_ids

    def steered(prompts):
        with surgery.trace(tiny, SteeringVector(steer.vector * 20, layer=1)) as tr:
            return tr.generate(prompts, 16, chat=True).token_ids

    batched = steered(PROMPTS)
    assert [steered([p])[0] for p in PROMPTS] == batched


def test_extraction_errors(tiny):
    with pytest.raises(ValueError, match="at least one"):
        SteeringVector.from_thoughts(tiny, [], layer=1)
    with pytest.raises(ValueError, match="both execution and reflection"):
        SteeringVector.from_thoughts(tiny, [("a", "b.\n\nc.\n\nd.")], layer=1)
    with pytest.raises(ValueError, match="out of range"):
        SteeringVector.from_thoughts(tiny, TRACES, layer=40)
    with pytest.raises(ValueError, match="block index"):
        SteeringVector(torch.ones(4), layer=True)


def test_steered_logits_equal_a_plain_hook_over_the_full_sequence(tiny):
    """Cached, triggered decoding vs one uncached pass with the vector added by a plain hook."""
    steer = SteeringVector(torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(4)) * 4, layer=2)
    prompts = [p + "\n\n<think>\nSo.\n\n" for p in PROMPTS]
    layer = tiny.architecture.block_list(tiny.module)[2]
    for prompt in prompts:
        with surgery.trace(tiny, steer) as tr:
            out = tr.generate([prompt], 16, chat=True)
        ids, _ = surgery.encode_prompts(tiny, [prompt], chat=True)
        full = torch.tensor([ids[0].tolist() + out.token_ids[0]])
        fire = torch.zeros_like(full, dtype=torch.bool)
        fire[0, steer.fired()[0]] = True
        handle = layer.register_forward_pre_hook(
            lambda m, a, k: ((a[0] + fire[:, :, None] * steer.vector,), k), with_kwargs=True)
        try:
            with torch.no_grad():
                logits = tiny.module(input_ids=full).logits[0]
        finally:
            handle.remove()
        assert logits[ids.shape[1] - 1 : -1].argmax(-1).tolist() == out.token_ids[0]
        assert steer.fired()[0] == separator_positions(tiny, [prompt], out, from_prompt_end=True)[0]


# ---- SEAL on the real DeepSeek-R1-Distill-Qwen tokenizer ----------------------------------------

R1_TAILS = {
    "open": "<think>\nLet me see.\n\nFirst, 2 + 3 = 5.\n\n",          # reasoning already begun in the prompt
    "closed": "<think>\nOld.\n\nDone.</think>\n\nSo 5.\n\n<think>\n",  # an earlier turn's span, then a new one
    "earlier": "<think>\nOld.\n\nDone.</think>\n\n",                    # only an earlier, closed span
    "plain": "",
}


def r1_prompt(tokenizer, tail):
    head = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                         add_generation_prompt=True)
    return head + tail


def seal_positions_as_released(prompt_ids, fed_ids, separator_ids, think_ids):
    """Transcription of the released SEAL steering rule (METHODS.md section 1): one flag per row,
    set after the prefill when the prompt holds a <think>, then set by a fed <think> and cleared by
    a fed </think>; in the prefill only the last prompt position can be steered; a position is
    steered when its token holds "\\n\\n" and the flag is set."""
    open_id, close_id = think_ids
    flag = open_id in prompt_ids
    steered = [len(prompt_ids) - 1] if flag and prompt_ids[-1] in separator_ids else []
    for k, token in enumerate(fed_ids):
        flag = True if token == open_id else False if token == close_id else flag
        if flag and token in separator_ids:
            steered.append(len(prompt_ids) + k)
    return steered


def seal_positions_as_in_the_paper(prompt_ids, fed_ids, separator_ids, think_ids):
    """The paper's rule: a separator inside the think span (the last tag seen decides), at the
    last prompt position or after it."""
    inside, steered = False, []
    for position, token in enumerate(prompt_ids + fed_ids):
        inside = True if token == think_ids[0] else False if token == think_ids[1] else inside
        if inside and token in separator_ids and position >= len(prompt_ids) - 1:
            steered.append(position)
    return steered


@pytest.mark.parametrize("tail", list(R1_TAILS))
@pytest.mark.parametrize("released", [False, True])
def test_seal_on_r1_steers_where_its_rule_says(tiny_r1, r1_tokenizer, tail, released):
    separators = {i for i, text in enumerate(tiny_r1.vocabulary_texts) if "\n\n" in text}
    vector = torch.randn(tiny_r1.d_model, generator=torch.Generator().manual_seed(1))
    steer = SteeringVector(vector, layer=1, when=seal_trigger(released=released))
    prompt = r1_prompt(r1_tokenizer, R1_TAILS[tail])
    with surgery.trace(tiny_r1, steer) as tr:
        out = tr.generate([prompt], 40, chat=False)
    prompt_ids = surgery.encode_prompts(tiny_r1, [prompt], chat=False)[0][0].tolist()
    fed = out.token_ids[0][:-1]
    rule = seal_positions_as_released if released else seal_positions_as_in_the_paper
    assert steer.fired()[0] == rule(prompt_ids, fed, separators, tiny_r1.think_token_ids)
    # extraction reads exactly where decoding steered (the last generated token is never fed)
    assert trigger_positions(tiny_r1, prompt_ids, fed, steer.config.when) == steer.fired()[0]


def test_seal_released_and_paper_rules_differ_only_after_a_closed_span(tiny_r1, r1_tokenizer):
    fired = {}
    for released in (False, True):
        steer = SteeringVector(torch.zeros(tiny_r1.d_model), layer=1, when=seal_trigger(released=released))
        with surgery.trace(tiny_r1, steer) as tr:
            tr.generate([r1_prompt(r1_tokenizer, R1_TAILS[t]) for t in R1_TAILS], 40, chat=False)
        fired[released] = steer.fired()
    lengths = [len(surgery.encode_prompts(tiny_r1, [r1_prompt(r1_tokenizer, R1_TAILS[t])])[0][0]) for t in R1_TAILS]
    assert any(p >= n for row, n in zip(fired[True], lengths) for p in row)  # decode steps fire too
    same = [a == b for a, b in zip(fired[False], fired[True])]
    assert same == [True, True, False, True]  # "earlier": the released flag is still set, the span closed
    assert fired[False][2] == [] and fired[True][2]


R1_TRACES = [
    ("What is 2 + 3?", "<think>\nOkay, 2 + 3.\n\nFirst, 2 + 3 = 5.\n\n\n\nWait, let me check: 5.\n\n"
                       "Alternatively, count.\n\n \n\nSo 5.\n</think>\n\nThe answer is 5."),
    ("Tom has 3 apples and buys 2 more.", "<think>\nSo 5.\n\nHold on, 3 + 2 = 5.\n\nThen 5.</think>\n\n5."),
    ("What is 7 * 8?", "<think>\nHmm.\n\n7 * 8 = 56.\n\nLet me verify.\n\nAnother way: 8 * 7 = 56.\n\n56.\n\n"),
]


def released_seal_vector(model, traces, layer):
    """Transcription of the released SEAL extraction (METHODS.md section 1): each trace is read in
    one forward pass; every token holding "\\n\\n" while the think flag is set opens a step, whose
    text runs to the next such token (or to </think>); an empty step counts as execution; the
    state is read at the separator token; S = mean(execution) - mean(reflection and transition)."""
    separators = {i for i, text in enumerate(model.vocabulary_texts) if "\n\n" in text}
    texts, open_id, close_id = model.vocabulary_texts, *model.think_token_ids
    states = {"execution": [], "reflection": [], "transition": []}
    for prompt, completion in traces:
        prompt_ids = surgery.encode_prompts(model, [prompt], chat=True)[0][0].tolist()
        ids = prompt_ids + model.tokenizer(completion, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hidden = model.module(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
        flag, opened = open_id in prompt_ids, []
        for position, token in enumerate(ids):
            if position >= len(prompt_ids):
                flag = True if token == open_id else False if token == close_id else flag
            if flag and token in separators and position >= len(prompt_ids) - 1:
                opened.append(position)
        for j, position in enumerate(opened):
            end = opened[j + 1] if j + 1 < len(opened) else len(ids)
            step = "".join(texts[t] for t in ids[position + 1 : end]).split("</think>")[0].lower().strip()
            if step.startswith("wait") or any(k in step for k in ("verify", "make sure", "hold on", "think again",
                                                                    "'s correct", "'s incorrect", "let me check",
                                                                    "seems right")):
                label = "reflection"
            elif step.startswith("alternatively") or any(k in step for k in ("another way", "another approach",
                                                                                 "another method", "another solution",
                                                                                 "another strategy", "another technique")):
                label = "transition"
            else:
                label = "execution"
            states[label].append(hidden[position].double())
    other = states["reflection"] + states["transition"]
    return (torch.stack(states["execution"]).mean(0) - torch.stack(other).mean(0)).float(), \
        {k: len(v) for k, v in states.items()}


def test_seal_extraction_on_r1_equals_the_released_extraction(tiny_r1):
    steer = SteeringVector.from_thoughts(tiny_r1, R1_TRACES, layer=2, chat=True, batch_size=2,
                                         when=seal_trigger(released=True), empty_thoughts="execution")
    reference, counts = released_seal_vector(tiny_r1, R1_TRACES, 2)
    assert_close(steer.vector, reference)
    assert steer.metadata["class_counts"] == counts
    paper = SteeringVector.from_thoughts(tiny_r1, R1_TRACES, layer=2, chat=True)  # empty thoughts skipped
    assert sum(paper.metadata["class_counts"].values()) < sum(counts.values())
    assert paper.metadata["class_counts"]["reflection"] == counts["reflection"]


def test_extraction_and_decoding_agree_on_a_blank_line_that_begins_in_the_prompt(tiny_llama):
    """No think tags: the default trigger fires on the first generated "\\n" after a prompt that
    ends in "\\n", and extraction reads a state there too (one rule for both)."""
    model = tiny_llama
    model.__dict__["think_token_ids"] = (None, None)
    try:
        when = seal_trigger_for(model)
        prompt = model.tokenizer("So the speed is 30.\n", add_special_tokens=False)["input_ids"]
        completion = model.tokenizer("\nWait, 60 / 2 = 30.\n\nSo 30.", add_special_tokens=False)["input_ids"]
        assert model.vocabulary_texts[prompt[-1]].endswith("\n") and model.vocabulary_texts[completion[0]] == "\n"
        found = thought_positions(model, prompt, completion, when)
        assert found[0] == (len(prompt), "reflection")
        assert [p for p, _ in found] == trigger_positions(model, prompt, completion, when)
        steer = SteeringVector(torch.zeros(model.d_model), layer=1, when=when)
        with surgery.trace(model, steer) as tr:
            out = tr.generate(["So the speed is 30.\n"], 24, chat=False)
        fed = out.token_ids[0][:-1]
        assert steer.fired()[0] == trigger_positions(model, prompt, fed, when)
    finally:
        del model.__dict__["think_token_ids"]
