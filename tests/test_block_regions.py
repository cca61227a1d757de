"""Marking decoder blocks as one nested compile region (surgery/decode/block_regions.py).

What the marks do under ``torch.compile`` (one region per layer, tokens as the eager step) is
tested in compiled_step_cases.py; here: the marks change nothing eagerly, and never outlive a
generation, a failed one included."""

import pytest
import torch
from conftest import PROMPTS

import surgery
from surgery.decode.block_regions import mark_block_regions


def blocks_of(model):
    return model.architecture.block_list(model.module)


def marked(model) -> list[bool]:
    return ["forward" in vars(block) for block in blocks_of(model)]


def test_marked_blocks_give_the_same_logits_and_unmark_restores_them(tiny):
    ids, _ = surgery.encode_prompts(tiny, PROMPTS[:1])
    with torch.no_grad():
        plain = tiny.module(input_ids=ids).logits
        unmark = mark_block_regions(blocks_of(tiny))
        assert all(marked(tiny))
        inside = tiny.module(input_ids=ids).logits
        unmark()
    assert not any(marked(tiny))
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)


def test_blocks_of_several_classes_or_with_their_own_forward_are_left_alone(tiny_llama):
    blocks = list(blocks_of(tiny_llama))
    mixed = [*blocks, torch.nn.Linear(2, 2)]
    mark_block_regions(mixed)()
    assert not any("forward" in vars(block) for block in mixed)
    own = blocks[0].forward  # another tool's wrapper, set on the instance
    blocks[0].forward = own
    try:
        undo = mark_block_regions(blocks)
        assert vars(blocks[0])["forward"] is own and not any("forward" in vars(block) for block in blocks[1:])
        undo()
        assert vars(blocks[0])["forward"] is own
    finally:
        del blocks[0].forward


def test_a_failed_compiled_generation_leaves_no_mark(tiny_llama):
    def failing(graph, example_inputs):
        raise RuntimeError("backend down")

    with pytest.raises(Exception, match="backend down"):
        surgery.generate(tiny_llama, PROMPTS, 4, cache="static", compile={"backend": failing})
    assert not any(marked(tiny_llama))
    with pytest.raises(Exception, match="backend down"):
        surgery.generate(tiny_llama, PROMPTS, 4, cache="static", compile={"backend": failing}, batch_size=2)
    assert not any(marked(tiny_llama))
