"""Saving a list of blocks to one file and loading it back, checked against the model."""

import json

import pytest
import torch
from conftest import tiny_model

from interventions import RepresentationRecycling, SteeringVector, TokenMask
from surgery.files import storage
from surgery.files.saving import load_blocks, save_blocks
from surgery.triggers import InThink, OnText, StepWindow


def blocks_for(model):
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    return [
        SteeringVector(vector, layer=-1, when=OnText("\n\n") & ~StepWindow(0, 1) | InThink(), metadata={"note": "x"}),
        TokenMask(["wait", "so the"], penalty=None),
        RepresentationRecycling(layer=1, trigger_words=("Wait",), probability=0.5, seed=3),
    ]


def test_blocks_come_back_equal_in_order(tiny_llama, tmp_path):
    blocks = blocks_for(tiny_llama)
    path = save_blocks(tmp_path / "run.safetensors", blocks, tiny_llama)
    loaded = load_blocks(path, tiny_llama)
    assert [type(b) for b in loaded] == [type(b) for b in blocks]
    for before, after in zip(blocks, loaded):
        assert after.config == before.config and after.to_dict() == before.to_dict()
    assert torch.equal(loaded[0].vector, blocks[0].vector)
    document, _ = storage.read(path, "surgery.blocks", 1)
    assert document["model"] == {"name": "tiny-llama", "architecture": "llama", "d_model": 64, "n_layers": 4,
                                 "vocab_size": tiny_llama.vocab_size}
    assert json.loads(json.dumps(document)) == document


def test_tensors_follow_the_model_or_the_arguments(tiny_llama, tmp_path):
    path = save_blocks(tmp_path / "run.safetensors", blocks_for(tiny_llama))
    half = load_blocks(path, dtype=torch.float64)[0]
    assert half.vector.dtype == torch.float64 and half.vector.device.type == "cpu"
    assert load_blocks(path, tiny_llama)[0].vector.dtype == tiny_llama.dtype


def test_a_mismatched_model_is_a_clear_error_that_says_what_to_do(tiny_llama, tokenizer, tmp_path):
    qwen = tiny_model("qwen2", tokenizer)
    path = save_blocks(tmp_path / "run.safetensors", blocks_for(tiny_llama), tiny_llama)
    with pytest.raises(ValueError, match=r"block 0 \(steering_vector\).*saved for tiny-llama \(llama, d_model=64\).*"
                                         r"qwen2 with d_model=48.*build the block again"):
        load_blocks(path, qwen)
    # configs without tensors move between models, but are still checked (layer range)
    configs_only = save_blocks(tmp_path / "configs.safetensors", blocks_for(tiny_llama)[1:], tiny_llama)
    assert len(load_blocks(configs_only, qwen)) == 2
    deep = save_blocks(tmp_path / "deep.safetensors", [RepresentationRecycling(layer=3, trigger_words=("Wait",))], tiny_llama)
    with pytest.raises(ValueError, match=r"block 0 \(representation_recycling\).*layer 3 is out of range"):
        load_blocks(deep, qwen)


def test_unknown_blocks_and_foreign_files_are_refused(tiny_llama, tmp_path):
    path = save_blocks(tmp_path / "run.safetensors", blocks_for(tiny_llama)[1:])
    document, tensors = storage.read(path, "surgery.blocks", 1)
    document["blocks"][0]["block"] = "not_a_block"
    storage.write(path, "surgery.blocks", 1, document, tensors)
    with pytest.raises(ValueError, match="'not_a_block', which is not registered here"):
        load_blocks(path)
    with pytest.raises(TypeError, match="saves surgery blocks"):
        save_blocks(tmp_path / "x.safetensors", [object()])
    storage.write(tmp_path / "result.safetensors", "surgery.result", 1, {}, {})
    with pytest.raises(ValueError, match="holds a surgery.result file, not a surgery.blocks file"):
        load_blocks(tmp_path / "result.safetensors")
