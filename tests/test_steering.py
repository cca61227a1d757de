"""SteeringVector: SEAL's trigger, extraction against a naive reference, saving and loading."""

import json

import pytest
import torch
from conftest import PROMPTS, separator_positions, tiny_model
from tolerance import assert_close

import surgery
from interventions import SteeringVector, seal_trigger
from surgery.thoughts import thought_positions

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


def test_default_trigger_is_seal_and_fires_at_separators_inside_think(tiny):
    prompts = [p + "\n\n<think>\nSo.\n\n" if i % 2 else p for i, p in enumerate(PROMPTS)]
    steer = SteeringVector(torch.zeros(tiny.d_model), layer=1)
    assert steer.config.when == seal_trigger() and steer.config.site == "resid_pre.1"
    with surgery.trace(tiny, steer) as tr:
        out = tr.generate(prompts, 24, chat=True)
    assert steer.fired() == separator_positions(tiny, prompts, out)
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
        assert steer.fired()[0] == separator_positions(tiny, [prompt], out)[0]
