"""ResidualAdd: where it fires, what it adds, and its errors."""

import pytest
import torch
from conftest import PROMPTS, separator_positions

import surgery
from interventions import ResidualAdd
from surgery.triggers import InThink, OnTokens


def test_fires_exactly_at_separators_inside_think_in_prefill_and_decode(tiny):
    prompts = [p + "\n\n<think>\nSo.\n\n" if i % 2 else p for i, p in enumerate(PROMPTS)]
    add = ResidualAdd(torch.zeros(tiny.d_model), site="resid_pre.1", when=OnTokens("\n\n") & InThink())
    with surgery.trace(tiny, add) as tr:
        out = tr.generate(prompts, 24, chat=True)
    fired = add.fired()
    assert fired == separator_positions(tiny, prompts, out)
    prompt_lengths = out.prompt_lengths
    assert any(p < n for row, n in zip(fired, prompt_lengths) for p in row)  # in the prefill
    assert any(p >= n for row, n in zip(fired, prompt_lengths) for p in row)  # and in decode


def test_logits_equal_a_plain_forward_hook_over_the_full_sequence(tiny):
    """Generate with the cache, then recompute without it: same logits at every generated step."""
    torch.manual_seed(1)
    vector = torch.randn(tiny.d_model) * 3
    add = ResidualAdd(vector, site="resid_pre.2", alpha=0.7, when=OnTokens("\n\n"))
    layer = tiny.architecture.block_list(tiny.module)[2]
    mask_all = tiny.vocabulary_mask(("\n\n",))
    for i, prompt in enumerate(PROMPTS):
        with surgery.trace(tiny, add) as tr:
            out = tr.generate([prompt], 12)
        ids, _ = surgery.encode_prompts(tiny, [prompt])
        full = torch.tensor([ids[0].tolist() + out.token_ids[0]])
        fire = mask_all[full]

        def pre_hook(module, args, kwargs):
            hidden = args[0]
            return (hidden + fire[:, :, None] * (0.7 * vector),), kwargs

        handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            with torch.no_grad():
                logits = tiny.module(input_ids=full).logits[0]
        finally:
            handle.remove()
        reference = logits[ids.shape[1] - 1 : -1].argmax(-1).tolist()
        assert reference == out.token_ids[0], f"prompt {i}"


def test_alpha_zero_is_the_identity(tiny):
    add = ResidualAdd(torch.randn(tiny.d_model), site="resid_post.0", alpha=0.0)
    with surgery.trace(tiny, add) as tr:
        out = tr.generate(PROMPTS, 16)
    assert out.token_ids == surgery.generate(tiny, PROMPTS, 16).token_ids


def test_batched_steering_equals_each_row_alone(tiny):
    vector = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(2))
    def steer(prompts):
        add = ResidualAdd(vector, site="resid_pre.1", alpha=2.0, when=OnTokens("\n\n"))
        with surgery.trace(tiny, add) as tr:
            return tr.generate(prompts, 20, chat=True).token_ids
    batched = steer(PROMPTS)
    assert [steer([p])[0] for p in PROMPTS] == batched


def test_config_round_trips_and_registers():
    add = ResidualAdd(torch.ones(4), site="resid_pre.-2", alpha=0.5, when=OnTokens("\n\n") & InThink())
    data = add.to_dict()
    assert data["block"] == "residual_add" and surgery.block_class("residual_add") is ResidualAdd
    assert data["config"] == {
        "site": "resid_pre.-2",
        "alpha": 0.5,
        "when": {"kind": "and", "left": {"kind": "tokens", "strings": ["\n\n"], "ids": [], "case_sensitive": True},
                 "right": {"kind": "in_think"}},
    }
    assert torch.equal(add.tensors()["vector"], torch.ones(4))


@pytest.mark.parametrize(
    "vector, site, message",
    [
        (torch.ones(63), "resid_pre.0", "width 63"),
        (torch.ones(2, 64), "resid_pre.0", "1-D vector"),
        (torch.full((64,), float("nan")), "resid_pre.0", "NaN"),
        (torch.ones(64, dtype=torch.long), "resid_pre.0", "floating-point"),
        (torch.ones(64, dtype=torch.float64), "resid_pre.0", "torch.float64"),
        (torch.ones(64, device="meta"), "resid_pre.0", "is on meta"),
        (torch.ones(64), "resid_pre.9", "out of range"),
        (torch.ones(64), "resid_pre.-5", "out of range"),
        (torch.ones(64), "logits", "other than 'logits'"),
        (torch.ones(64), "resid_mid.0", "unknown site"),
    ],
)
def test_bad_vectors_and_sites_are_clear_errors(tiny_llama, vector, site, message):
    with pytest.raises(ValueError, match=message):
        with surgery.trace(tiny_llama, ResidualAdd(vector, site=site)):
            pass
    assert tiny_llama._active_trace is None
