"""Shared fixtures: tiny random Llama/Qwen2 models with a tokenizer built here, and SmolLM2."""

import os
import re
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

# Triton reads TRITON_INTERPRET when it is first imported: set it before anything imports it, so
# the Triton kernels run in the interpreter on CPU tensors when there is no GPU (that is how CI
# checks them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import surgery  # noqa: E402

#: What the header of every run names: the stack whose releases change the toolkit's behaviour.
STACK = ("torch", "transformers", "transformer-lens", "nnsight", "triton", "tokenizers", "accelerate", "numpy")
LOCK = Path(__file__).parents[1] / "requirements" / "lock.txt"


def lock_lines() -> list[str]:
    """The pins of requirements/lock.txt, ``name==version``, without its comments."""
    return [line for line in LOCK.read_text().splitlines() if line and not line.startswith("#")]


def pytest_report_header(config):
    """The versions this run tests, and where they differ from requirements/lock.txt (as under
    `make test-latest`); `make test` installs the lock's."""
    pins = dict(line.split("==", 1) for line in lock_lines())
    shown = []
    for name in STACK:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        differs = pins.get(name) not in (None, version.split("+")[0])
        shown.append(f"{name} {version}" + (f" (lock: {pins[name]})" if differs else ""))
    return "stack: " + ", ".join(shown)


# Qwen2's pre-tokenizer pattern: punctuation keeps the newlines that follow it, so ".\n\n" can be
# one token, as in the R1-Distill models.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
CORPUS = [
    "Tom has 3 apples.\n\nHe buys 5 more, so 3 + 5 = 8.\n\nWait, let me check: 3 + 5 = 8.\n\nSo the answer is 8.",
    "Let me think.\n\nFirst, 7 * 8 = 56.\n\n\nWait, is that right? Yes.\n\nTherefore 56.",
    "Hmm, the train goes 60 miles in 2 hours.\n\nSo the speed is 30.\n\nAlternatively, 60 / 2 = 30.\n\nWait.",
    "Okay: 12 - 4 = 8.\n\nThen 8 * 2 = 16.\n\nSo 16.\n\nWait, check again. 16 is right.\n\n",
    "Now add them\n\n\nThen the total is 20\n\nSo 20",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on a few reasoning snippets (~400 entries)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def _tiny_config(kind: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, max_position_embeddings=128, initializer_range=0.2)
    if kind == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, pad_token_id=0, eos_token_id=2, bos_token_id=None, **common)
    if kind == "qwen2":
        return Qwen2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, pad_token_id=0, eos_token_id=2, bos_token_id=None,
                           tie_word_embeddings=False, **common)
    if kind == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=vocab_size,
                          pad_token_id=0, eos_token_id=2, bos_token_id=None, initializer_range=0.2)
    raise ValueError(kind)


_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "gpt2": GPT2LMHeadModel}
# Random weights rarely emit a separator; scaling the unembedding rows of the "\n\n" tokens makes
# them come up in roughly a third (Llama) or a sixth (Qwen2) of the generated tokens, so
# triggers get exercised in decode steps as well as in the prefill.
_SEPARATOR_BOOST = {"llama": 2.0, "qwen2": 2.5, "gpt2": 1.0}


def tiny_model(kind: str, tokenizer, seed: int = 0) -> surgery.Model:
    """A randomly initialised tiny model of one architecture, wrapped (float32, CPU, eval)."""
    torch.manual_seed(seed)
    module = _CLASSES[kind](_tiny_config(kind, len(tokenizer)))
    module.generation_config.pad_token_id = 0
    model = surgery.wrap(module, tokenizer, name=f"tiny-{kind}")
    with torch.no_grad():
        module.get_output_embeddings().weight[model.vocabulary_mask(("\n\n",))] *= _SEPARATOR_BOOST[kind]
    return model


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny(request, tokenizer) -> surgery.Model:
    """Each tiny reasoning-model architecture in turn (Llama, Qwen2)."""
    return tiny_model(request.param, tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tokenizer) -> surgery.Model:
    return tiny_model("llama", tokenizer)


@pytest.fixture(scope="session")
def smollm2() -> surgery.Model:
    """The embedded default model (slow tests only)."""
    return surgery.load()


#: The real DeepSeek-R1-Distill-Qwen tokenizer and chat template (../shared beside the clone).
R1_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "r1-distill-qwen-tokenizer"
R1_VOCAB_SIZE = 151936  # the real 1.5B's embedding rows (the tokenizer has 151,665 entries)
#: Texts whose tokens a tiny R1 model emits (their unembedding rows are kept, every other row is
#: zeroed): the separators, the think tags and a few words of a reflection, so greedy decoding
#: writes think spans, blank lines and thoughts of every class.
R1_FOCUS = ("\n\n", ".\n\n", "\n\n\n", ":\n\n", "\n", "<think>", "</think>", "Wait", ",", " let", " me", " check",
            "So", " the", " answer", " is", " 5", ".", "Alternatively", " another", " way")


@pytest.fixture(scope="session")
def r1_tokenizer():
    """The real R1-Distill-Qwen tokenizer (a few seconds)."""
    return AutoTokenizer.from_pretrained(R1_TOKENIZER)


def tiny_r1_model(r1_tokenizer, seed: int = 0, focus: bool = True) -> surgery.Model:
    """A tiny random Qwen2 of the real R1-Distill-Qwen-1.5B vocabulary width, with its tokenizer.

    With ``focus`` only the unembedding rows of :data:`R1_FOCUS`'s tokens are kept (scaled up),
    so its greedy text is made of separators, think tags and thought words rather than random
    pieces of the whole vocabulary (``focus=False``: plain random weights).
    """
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=R1_VOCAB_SIZE, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
                         bos_token_id=r1_tokenizer.bos_token_id, eos_token_id=r1_tokenizer.eos_token_id,
                         pad_token_id=r1_tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.2)
    module = Qwen2ForCausalLM(config)
    module.generation_config.pad_token_id = r1_tokenizer.pad_token_id
    if focus:
        ids = sorted({i for text in R1_FOCUS for i in r1_tokenizer(text, add_special_tokens=False)["input_ids"]})
        with torch.no_grad():
            rows = module.get_output_embeddings().weight
            kept = rows[ids] * 4
            rows.zero_()
            rows[ids] = kept
    return surgery.wrap(module, r1_tokenizer, name="tiny-r1-distill-qwen")


@pytest.fixture(scope="session")
def tiny_r1(r1_tokenizer) -> surgery.Model:
    """A tiny random Qwen2 with the real R1-Distill-Qwen tokenizer (:func:`tiny_r1_model`)."""
    return tiny_r1_model(r1_tokenizer)


@pytest.fixture(scope="session")
def tiny_r1_plain(r1_tokenizer) -> surgery.Model:
    """The same with plain random weights (``focus=False``)."""
    return tiny_r1_model(r1_tokenizer, focus=False)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file

PROMPTS = [
    "Tom has 3 apples.",
    "Let me think.\n\nFirst, 7 * 8 = 56.",
    "Wait",
    "Hmm, the train goes 60 miles in 2 hours.\n\nSo the speed is",
]
ANSWERS = ["8", "56", "The answer is 30.", "So 16"]  # one reference answer per prompt (MI)


def reference_nhsic(x, y, sigma=50.0, epsilon=1e-5) -> float:
    """The paper's formula, literally: K, H, K̃ = K H, R = K̃ (K̃ + εmI)⁻¹, tr(Rx Ry), float64."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    m = len(x)
    H = np.eye(m) - np.ones((m, m)) / m

    def R(v):
        K = np.exp(-((v[:, None] - v[None, :]) ** 2) / (2 * sigma**2))
        Kt = K @ H
        return Kt @ np.linalg.inv(Kt + epsilon * m * np.eye(m))

    return float(np.trace(R(x) @ R(y)))


def clusters(n_per_class, d, classes=("execution", "reflection", "transition"), spread=4.0, seed=0):
    """States around one random centre per class, and their labels (linear thought probes)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(classes), d, generator=generator) * spread
    states = torch.cat([centres[k] + torch.randn(n_per_class, d, generator=generator) for k in range(len(classes))])
    labels = [c for c in classes for _ in range(n_per_class)]
    return states, labels


def occurrences_ending_at_each_token(texts, tokens, pattern):
    """Reference for text triggers: does an occurrence of ``pattern`` end in each token?

    Counts overlapping occurrences in the text up to each token and looks at the difference.
    """
    counts, text = [], ""
    for token in tokens:
        text += texts[token]
        counts.append(len(re.findall(f"(?={re.escape(pattern)})", text)))
    return [(c - p) > 0 for p, c in zip([0] + counts[:-1], counts)]


def separator_positions(model, prompts, out, chat=True, from_prompt_end=False):
    """Reference: position ids of the fed tokens containing "\\n\\n" inside <think>, per row.

    Fed tokens are the prompt and every generated token but the last (which is never fed).
    ``from_prompt_end``: only the last prompt token and what follows it (SEAL's prefill rule).
    """
    open_id, close_id = model.think_token_ids
    texts = model.vocabulary_texts
    rows = []
    for i, prompt in enumerate(prompts):
        ids, _ = surgery.encode_prompts(model, [prompt], chat=chat)
        fed = ids[0].tolist() + out.token_ids[i][:-1]
        inside, hits = False, []
        for position, token in enumerate(fed):
            if token == open_id:
                inside = True
            elif token == close_id:
                inside = False
            if inside and "\n\n" in texts[token] and (not from_prompt_end or position >= len(ids[0]) - 1):
                hits.append(position)
        rows.append(hits)
    return rows


def frequent_words(model, n=3):
    """Words the plain run emits as whole tokens, so token triggers fire often on random weights."""
    out = surgery.generate(model, PROMPTS, 24, chat=True)
    texts = model.vocabulary_texts
    counts = Counter(texts[t].strip() for ids in out.token_ids for t in ids if texts[t].strip().isalpha())
    return tuple(w for w, _ in counts.most_common(n))


def all_hooks(module):
    """Every forward (pre-)hook on the module tree. transformers installs a few of its own the
    first time hidden states are requested, so tests compare with the set before the trace."""
    return {(id(m), key) for m in module.modules() for key in [*m._forward_hooks, *m._forward_pre_hooks]}


def logits_of(model):
    """Logits of one plain forward over PROMPTS (padded), outside any trace."""
    with torch.no_grad():
        ids, mask = surgery.encode_prompts(model, PROMPTS)
        return model.module(input_ids=ids, attention_mask=mask).logits


def full_stack(model, words=("Wait", "So")):
    """The acceptance stack of the backends: SEAL steering at "\\n\\n", a token mask, RR, TTTS
    and the three probes (fresh blocks each call)."""
    from interventions import RepresentationRecycling, SteeringVector, ThinkingTokenInsertion, TokenMask
    from probes import MIEstimator, ReasoningGraph, ThoughtClassifier

    from surgery.triggers import OnText

    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)) * 5
    # SEAL: "\n\n" inside <think>; a model without think tags (SmolLM2) steers at every blank line
    when = None if model.think_token_ids != (None, None) else OnText("\n\n")
    return [
        SteeringVector(vector, layer=1, when=when),
        TokenMask(["Hmm", "let me check"], penalty=-4.0),
        RepresentationRecycling(layer=0, trigger_words=words),
        ThinkingTokenInsertion(words=(" Wait",), budget=6, answer_prompt=" So", answer_tokens=2),
        MIEstimator(answers=ANSWERS),
        ThoughtClassifier("resid_pre.1"),
        ReasoningGraph(n_clusters=2),
    ]


def run_full_stack(model, eos, words=("Wait", "So"), new_tokens=28):
    """Generate PROMPTS with :func:`full_stack`: (output, blocks, probe results)."""
    blocks = full_stack(model, words)
    with surgery.trace(model, *blocks) as tr:
        out = tr.generate(PROMPTS, new_tokens, chat=True, eos_token_ids=[eos])
    return out, blocks, [blocks[4].result(out), blocks[5].result(), blocks[6].result()]


def assert_same_probe_results(ours, theirs):
    """MI values, thought states and step vectors agree within float32 tolerance; thoughts exactly."""
    from tolerance import assert_close

    mi, thoughts, steps = ours
    mi2, thoughts2, steps2 = theirs
    for a, b in zip(mi.values, mi2.values, strict=True):
        assert_close(a, b, precision=torch.float32)
    assert [p.tolist() for p in mi.peaks] == [p.tolist() for p in mi2.peaks]
    assert thoughts.thoughts == thoughts2.thoughts
    for a, b in zip(thoughts.states, thoughts2.states, strict=True):
        assert_close(a, b, precision=torch.float32)
    for a, b in zip(steps, steps2, strict=True):
        assert_close(a, b, precision=torch.float32)
