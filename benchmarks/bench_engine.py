"""Tokens per second of HF generate vs the surgery decode engine, side by side in one process.

Run: python benchmarks/bench_engine.py [--batch 8] [--new-tokens 64] [--reps 5] [--device cpu]

Rows, each timed ``--reps`` times in interleaved order after one warm-up, median reported:
  hf_generate      model.generate, greedy
  engine           surgery.generate, nothing attached
  engine+trace     an empty trace (hooks machinery only)
  engine+steer     a ResidualAdd at resid_pre.L wherever the text reaches "\\n\\n" (OnText)
  engine+steer_tok the same add on single tokens containing "\\n\\n" (OnTokens)
Prompts are the first GSM8K test questions (../shared/data/gsm8k/test.jsonl when present, else
surgery.examples.ARITHMETIC_PROBLEMS) in the chat template. The script checks that the engine's
tokens equal HF generate's before timing, and prints ratios to hf_generate (> 1 means faster).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not
sys.path.insert(0, str(ROOT / "benchmarks"))

import surgery  # noqa: E402
from _data import gsm8k_questions, model_options, time_rows  # noqa: E402
from interventions import ResidualAdd  # noqa: E402
from surgery.prompts import encode_prompts  # noqa: E402

def main() -> None:
    parser = model_options(__doc__.split("\n")[0], new_tokens=64, reps=5)
    parser.add_argument("--layer", type=int, default=15)
    args = parser.parse_args()

    model = surgery.load(device=args.device)
    texts = gsm8k_questions(args.batch)
    input_ids, attention_mask = encode_prompts(model, texts, chat=True)
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)).to(model.device, model.dtype)
    cuda = model.device.type == "cuda"

    def hf_generate():
        with torch.inference_mode():
            out = model.module.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=args.new_tokens,
                do_sample=False, pad_token_id=model.pad_token_id,
            )
        return out[:, input_ids.shape[1]:]

    def engine():
        return surgery.generate(model, texts, args.new_tokens, chat=True, progress=False)

    def traced(*blocks):
        def run():
            with surgery.trace(model, *blocks) as tr:
                return tr.generate(texts, args.new_tokens, chat=True, progress=False)
        return run

    steer_text = ResidualAdd(vector, site=f"resid_pre.{args.layer}", when=surgery.OnText("\n\n"))
    steer_tokens = ResidualAdd(vector, site=f"resid_pre.{args.layer}", when=surgery.OnTokens("\n\n"))
    rows = {
        "hf_generate": hf_generate,
        "engine": engine,
        "engine+trace": traced(),
        "engine+steer": traced(steer_text),
        "engine+steer_tok": traced(steer_tokens),
    }

    # correctness first: the engine's greedy tokens are HF generate's
    reference = hf_generate().tolist()
    ours = engine()
    eos = set(model.eos_token_ids)
    for row, tokens in zip(reference, ours.token_ids):
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        assert row[:cut] == tokens, "engine tokens differ from HF generate"
    new_tokens = {}
    for name, fn in rows.items():  # warm-up, and count the tokens each row produces
        out = fn()
        new_tokens[name] = out.numel() if isinstance(out, torch.Tensor) else sum(out.lengths)
    fired = [sum(map(len, block.fired())) for block in (steer_text, steer_tokens)]

    times = time_rows(rows, args.reps)

    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nSmolLM2-135M-Instruct, {model.dtype}, {device}; batch {args.batch}, up to {args.new_tokens} new tokens, "
          f"median of {args.reps}; engine tokens == HF generate tokens: yes")
    print(f"steering fired {fired[0]} times (OnText) and {fired[1]} times (OnTokens) per run")
    base = statistics.median(times["hf_generate"])
    print(f"{'row':<18}{'median s':>10}{'tok/s':>10}{'vs hf_generate':>16}")
    for name in rows:
        median = statistics.median(times[name])
        print(f"{name:<18}{median:>10.3f}{new_tokens[name] / median:>10.1f}{base / median:>15.2f}x")


if __name__ == "__main__":
    main()
