"""A model's depth, width and architecture without its weights (experiments.model_shape)."""

import gguf
import pytest
from transformers import GPT2Config

from experiments.model_shape import ModelShape, gguf_shape, model_shape


def write_gguf(path, architecture="qwen2", block_count=3, width=48):
    """A GGUF file with arrays (a tokenizer's) before the keys a shape needs, and no tensors."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    writer.add_array("tokenizer.ggml.scores", [0.1, 0.2, 0.3])
    if block_count is not None:
        writer.add_block_count(block_count)
    writer.add_embedding_length(width)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_embedded_model_is_read_from_its_gguf_header():
    assert model_shape("embedded") == ModelShape(n_layers=30, d_model=576, architecture="llama")


def test_a_gguf_file_is_read_past_its_arrays(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    assert gguf_shape(path) == model_shape(path) == ModelShape(3, 48, "qwen2")


def test_a_gguf_header_without_the_depth_is_an_error(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", block_count=None)
    with pytest.raises(ValueError, match="does not say the architecture, block count and embedding length"):
        gguf_shape(path)
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_shape(tmp_path / "x.gguf")


def test_a_local_folder_is_read_from_its_config(tmp_path):
    GPT2Config(n_embd=32, n_layer=2, n_head=4).save_pretrained(tmp_path / "gpt2")
    assert model_shape(tmp_path / "gpt2") == ModelShape(2, 32, "gpt2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is a folder but transformers cannot read a model config there"):
        model_shape(tmp_path / "empty")


def test_an_id_outside_the_hub_cache_is_unknown_without_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_shape("no-such-org/no-such-model") is None
