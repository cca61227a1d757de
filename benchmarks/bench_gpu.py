"""Decode throughput on a GPU: HF ``generate`` against our engine, plain and with the full stack.

Run (any CUDA machine, no download): python benchmarks/bench_gpu.py [--batch 32 128]
    [--new-tokens 512] [--prompt-tokens 128] [--reps 3] [--dtype bfloat16] [--rows NAME ...]
Check the script itself on a CPU: python benchmarks/bench_gpu.py --smoke

The model: a randomly initialised Qwen2 model of the DeepSeek-R1-Distill-Qwen-1.5B shape
(28 layers, width 1536, 12 heads / 2 KV heads, MLP 8960, vocabulary 151936), in ``--dtype``;
a synthetic tokenizer of the same vocabulary built here (whole-word entries, among them "\\n\\n",
" Wait", " Hmm", digits), so nothing is downloaded. EOS never wins (its unembedding row is zero),
so every row generates ``--new-tokens``; the unembedding rows of the "\\n\\n" entries are scaled
up so that separators come up in a few percent of tokens and the triggers fire as in a real run
(the fire counts are printed). Prompts: random token ids, ``--prompt-tokens`` long, each row
shorter by a few tokens than the one before (left padding exercised).

Rows, side by side in one process, each timed ``--reps`` times in interleaved order (medians):

  hf_dynamic         ``model.generate``, greedy, its DynamicCache
  hf_static_compile  ``model.generate(cache_implementation="static")``: on CUDA transformers compiles the
                     decode step (CUDA graphs through torch.compile); its first call, the compile,
                     is a warm-up and not timed
  ours_dynamic       ``surgery.generate`` (eager, dynamic cache)
  ours_static        ``surgery.generate(cache="static")`` (eager step on the static cache)
  ours_compiled      ``surgery.generate(cache="static", compile=True)``: the decode step through
                     torch.compile, mode "reduce-overhead" (CUDA-graph replay); the compile is
                     the warm-up
  ours_dynamic+stack / ours_static+stack: the same inside a trace holding the full stack: SEAL
                     steering at "\\n\\n" (resid_pre.20), a token mask (" Wait", penalty -3),
                     the streaming MI probe (nHSIC per token against each row's answer) and
                     the reasoning-graph step pooling
  ours_static+safe / ours_compiled+safe: the graph-safe part of the stack (steering and the
                     token mask; the two probes keep host-side state, so a compiled run holding
                     them decodes eagerly)

Printed per batch size: tok/s, ratio to hf_dynamic, each stack row against its plain row,
peak memory (``torch.cuda.max_memory_allocated``), and how many rows' greedy tokens agree with
hf_dynamic (plain rows) or ours_dynamic+stack (stack rows): in bfloat16 the paths round
differently, so agreement is measured, not asserted.
A row that fails prints its error and the run goes
on, so one broken row does not cost a GPU session its other figures. Kernel rows:
``benchmarks/bench_kernels.py`` on the same machine (``make bench-gpu`` runs both).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

import surgery  # noqa: E402
from interventions import SteeringVector, TokenMask  # noqa: E402
from probes import MIEstimator, ReasoningGraph  # noqa: E402

R1_DISTILL_QWEN_1_5B = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, max_position_embeddings=131072, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, use_sliding_window=False,
)
SMOKE = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
WORDS = ["\n\n", ".\n\n", "\n", " Wait", " Hmm", " So", " Let", " the", " answer", " is", "."] + [f" {d}" for d in range(10)]
PAD, EOS, UNK = 0, 1, 2


def synthetic_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Whole-word entries: specials, :data:`WORDS`, then fillers " w<i>"; decoding concatenates."""
    pieces = ["<pad>", "<eos>", "<unk>", *WORDS]
    pieces += [f" w{i}" for i in range(vocab_size - len(pieces))]
    tokenizer = Tokenizer(models.WordLevel({piece: i for i, piece in enumerate(pieces)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n+|\.\n+| ?[^ \n]+"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_model(shape: dict, dtype: torch.dtype, device: str) -> surgery.Model:
    config = Qwen2Config(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        module = Qwen2ForCausalLM(config).to(dtype).eval()
    module.generation_config.pad_token_id = PAD
    module.generation_config.eos_token_id = EOS
    model = surgery.wrap(module, synthetic_tokenizer(config.vocab_size), name="random R1-Distill-Qwen-1.5B shape")
    with torch.no_grad():
        head = module.get_output_embeddings().weight
        head[EOS] = 0  # never the argmax: every row runs its full length
        head[model.vocabulary_mask(("\n\n",))] *= 4.0  # separators come up now and then
    return model


def prompts_for(batch: int, length: int, vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    first = len(WORDS) + 3
    return [torch.randint(first, vocab_size, (max(4, length - 3 * i),), generator=generator).tolist() for i in range(batch)]


def full_stack(model: surgery.Model, batch: int, probes: bool = True) -> list:
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)) * 0.5
    layer = min(20, model.n_layers - 1)
    blocks = [
        SteeringVector(vector.to(model.dtype), layer=layer, when=surgery.OnText("\n\n")),
        TokenMask([" Wait"], penalty=-3.0),
    ]
    if probes:
        blocks += [MIEstimator(answers=[f" {i % 10} {(7 * i) % 10}" for i in range(batch)]), ReasoningGraph(n_clusters=2)]
    return blocks


def timed(fn, cuda: bool) -> tuple[float, object]:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def run_batch(model: surgery.Model, args, batch: int, cuda: bool) -> None:
    prompts = prompts_for(batch, args.prompt_tokens, model.vocab_size)
    input_ids, attention_mask = surgery.encode_prompts(model, prompts)
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    n = args.new_tokens
    fired: dict[str, int] = {}
    # on the CPU (--smoke) dynamo traces the step into one graph and runs it eagerly (no C++ build)
    compile_options = True if cuda else {"backend": "eager", "fullgraph": True}

    def hf(**options):
        def go():
            with torch.inference_mode():
                out = model.module.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=n,
                                            min_new_tokens=n, do_sample=False, pad_token_id=PAD, eos_token_id=EOS,
                                            **options)
            return out[:, input_ids.shape[1]:].tolist()
        return go

    def ours(cache: str, stack: bool, probes: bool = True, compile=False):
        def go():
            options = dict(cache=cache, eos_token_ids=[EOS], progress=False, compile=compile)
            if not stack:
                return surgery.generate(model, prompts, n, **options).token_ids
            blocks = full_stack(model, batch, probes)
            with surgery.trace(model, *blocks) as tr:
                out = tr.generate(prompts, n, **options)
            fired["steering"] = sum(map(len, blocks[0].fired()))
            fired["mask"] = sum(map(len, blocks[1].fired()))
            return out.token_ids
        return go

    rows = {
        "hf_dynamic": hf(),
        "hf_static_compile": hf(cache_implementation="static"),
        "ours_dynamic": ours("dynamic", False),
        "ours_static": ours("static", False),
        "ours_compiled": ours("static", False, compile=compile_options),
        "ours_dynamic+stack": ours("dynamic", True),
        "ours_static+stack": ours("static", True),
        "ours_static+safe": ours("static", True, probes=False),
        "ours_compiled+safe": ours("static", True, probes=False, compile=compile_options),
    }
    rows = {name: fn for name, fn in rows.items() if not args.rows or name in args.rows}
    tokens, peak, errors = {}, {}, {}
    for name, fn in rows.items():  # warm-up (and the compile), tokens, peak memory
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            tokens[name] = fn()
            peak[name] = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        except Exception as error:  # noqa: BLE001 - report and go on: the other rows still count
            errors[name] = f"{type(error).__name__}: {error}".splitlines()[0][:160]
            traceback.print_exc(limit=3)
    times: dict[str, list[float]] = {name: [] for name in tokens}
    for _ in range(args.reps):
        for name in list(times):
            times[name].append(timed(rows[name], cuda)[0])
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians.get("hf_dynamic")
    print(f"\nbatch {batch}, {n} new tokens, prompts {args.prompt_tokens - 3 * (batch - 1)}..{args.prompt_tokens} tokens; "
          f"median of {args.reps}; stack fired: steering {fired.get('steering', '-')}, mask {fired.get('mask', '-')} per run")
    print(f"{'row':<22}{'median s':>10}{'tok/s':>11}{'vs hf_dynamic':>15}{'stack/plain':>13}{'peak GiB':>10}"
          f"{'same tokens as':>30}")
    for name in rows:
        if name in errors:
            print(f"{name:<22}  failed: {errors[name]}")
            continue
        rate = batch * n / medians[name]
        ratio = f"{base / medians[name]:.2f}x" if base else "-"
        plain = name.split("+")[0]
        stack = f"{medians[plain] / medians[name]:.2f}x" if name != plain and plain in medians else ""
        # plain rows against hf_dynamic, stack rows against the dynamic engine with the same stack
        against = {"": "hf_dynamic", "stack": "ours_dynamic+stack", "safe": "ours_static+safe"}[name.partition("+")[2]]
        same = "-"
        if against in tokens and name != against:
            rows_same = sum(a[: len(b)] == b for a, b in zip(tokens[against], tokens[name]))
            same = f"{against}: {rows_same}/{batch}"
        print(f"{name:<22}{medians[name]:>10.3f}{rate:>11.0f}{ratio:>15}{stack:>13}{peak[name]:>10.2f}{same:>27}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--rows", nargs="*", help="only these rows (names as printed)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model of the same family on the CPU, float32, a few tokens: checks the script")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("bench_gpu needs a CUDA device (none here); `python benchmarks/bench_gpu.py --smoke` checks the "
              "script on the CPU with a tiny model")
        return
    if args.smoke:
        args.batch, args.new_tokens, args.prompt_tokens, args.reps, args.dtype = [3], 12, 10, 1, "float32"
    model = build_model(SMOKE if args.smoke else R1_DISTILL_QWEN_1_5B, getattr(torch, args.dtype),
                        "cuda" if cuda else "cpu")
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads), smoke run"
    print(f"{model.name}: {model.n_layers} layers, width {model.d_model}, vocabulary {model.vocab_size}, "
          f"{args.dtype}, {device}; torch {torch.__version__}")
    for batch in args.batch:
        run_batch(model, args, batch, cuda)


if __name__ == "__main__":
    main()
