"""The README's "TransformerLens and nnsight" examples run as written, on a tiny Llama.

The section's ```python blocks are written, in order, to one file after a prelude that defines
the names they assume (``hf_model``, ``tokenizer``, ``vector``, ``prompts``, ``answers``), and run
from that file (nnsight re-reads the source of its ``with`` blocks, so they cannot be exec'd).
"""

import re
import runpy
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
PRELUDE = '''\
import torch
from conftest import ANSWERS, PROMPTS, tiny_model, build_tokenizer

tokenizer = build_tokenizer()
hf_model = tiny_model("llama", tokenizer).module
vector = torch.randn(hf_model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 3
prompts, answers = PROMPTS, ANSWERS
'''


def section_code(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return "\n".join(re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S))


def test_the_backends_section_runs(tmp_path):
    pytest.importorskip("transformer_lens")
    pytest.importorskip("nnsight")
    code = section_code("TransformerLens and nnsight")
    assert "NNsightBlocks" in code and "TransformerBridge" in code
    script = tmp_path / "readme_backends.py"
    script.write_text(PRELUDE + code)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = runpy.run_path(str(script))
    steer, tokens = names["steer"], names["tokens"]
    assert sum(map(len, steer.fired())) > 0 and len(tokens) == len(names["prompts"])
    # TLHooks inside bridge.generate: our engine's tokens (the bridge feeds EOS after a row's stop)
    out, tl_tokens = names["out"], names["tl_tokens"]
    width = tl_tokens.shape[1] - 16
    assert [row[: len(mine)] for row, mine in zip(tl_tokens[:, width:].tolist(), out.token_ids)] == out.token_ids
    assert names["tl_logits"].shape[:2] == (len(names["prompts"]), width)
