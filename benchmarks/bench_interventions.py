"""Tokens per second of the decode engine plain vs each intervention alone vs all four stacked.

Run: python benchmarks/bench_interventions.py [--batch 8] [--new-tokens 128] [--reps 3] [--device cpu]

SmolLM2-135M-Instruct on the first GSM8K test questions (chat template), greedy. Rows, timed
``--reps`` times in interleaved order after one warm-up, medians:
  plain          the engine, nothing attached
  steering       SteeringVector at resid_pre.15 where the text reaches "\\n\\n" (OnText)
  token_mask     TokenMask(["wait", "alternatively"], penalty=-3)   (SEAL's baseline)
  tts            ThinkingTokenInsertion(" Wait", budget 32, answer prompt + 8 tokens)
  recycling      RepresentationRecycling(layer 20, the released trigger words): re-runs blocks
                 20.. only, from block 20's recorded input (surgery.decode.partial_rerun)
  recycling_full the same, re-running the whole model for the recomputed position (as before the
                 partial re-run; the same tokens)
  all_four       the four stacked in one trace
  plain_static   the engine with cache="static" (nothing attached)
tok/s is new tokens over wall time; ratios are to ``plain`` (1.00 = as fast). Each recycling
row's cost per re-run is reported as a fraction of a plain decode step.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not
sys.path.insert(0, str(ROOT / "benchmarks"))

import surgery  # noqa: E402
from _data import gsm8k_questions, model_options, time_rows  # noqa: E402
from interventions import RepresentationRecycling, SteeringVector, ThinkingTokenInsertion, TokenMask  # noqa: E402

def main() -> None:
    args = model_options(__doc__.split("\n")[0], new_tokens=128, reps=3).parse_args()

    model = surgery.load(device=args.device)
    prompts = gsm8k_questions(args.batch)
    cuda = model.device.type == "cuda"
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)).to(model.device, model.dtype) * 20

    def blocks(name: str) -> list:
        make = {
            "steering": lambda: SteeringVector(vector, layer=15, when=surgery.OnText("\n\n")),
            "token_mask": lambda: TokenMask(["wait", "alternatively"], penalty=-3.0),
            "tts": lambda: ThinkingTokenInsertion(words=(" Wait",), budget=32, answer_prompt=" So the answer is", answer_tokens=8),
            "recycling": lambda: RepresentationRecycling(layer=20),
        }
        if name in ("plain", "plain_static"):
            return []
        if name == "recycling_full":
            return [make["recycling"]()]
        if name == "all_four":
            return [make[key]() for key in ("steering", "token_mask", "recycling", "tts")]
        return [make[name]()]

    def run(name: str):
        attached = blocks(name)
        full = mock.patch("surgery.decode.forward.supports_partial_rerun", lambda architecture: False)
        with full if name == "recycling_full" else contextlib.nullcontext(), surgery.trace(model, *attached) as tr:
            cache = "static" if name == "plain_static" else "dynamic"
            out = tr.generate(prompts, args.new_tokens, chat=True, progress=False, cache=cache)
        return out, attached

    names = ["plain", "steering", "token_mask", "tts", "recycling", "recycling_full", "all_four", "plain_static"]
    facts = {}
    for name in names:  # warm-up; what each row does
        out, attached = run(name)
        fires = sum(len(row) for block in attached if hasattr(block, "fired") for row in block.fired())
        inserted = sum(len(row) for block in attached if hasattr(block, "insertions") for row in block.insertions())
        reruns = sum(block.reruns() for block in attached if hasattr(block, "reruns"))
        facts[name] = {"tokens": sum(out.lengths), "steps": max(out.lengths), "fires": fires, "inserted": inserted,
                       "reruns": reruns}
    times = time_rows({name: functools.partial(run, name) for name in names}, args.reps)

    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nSmolLM2-135M-Instruct, {model.dtype}, {device}; batch {args.batch}, up to {args.new_tokens} new tokens, "
          f"median of {args.reps}")
    plain_rate = facts["plain"]["tokens"] / statistics.median(times["plain"])
    print(f"{'row':<15}{'median s':>10}{'tokens':>8}{'tok/s':>9}{'vs plain':>10}{'fires':>7}{'inserted':>10}")
    for name in names:
        median = statistics.median(times[name])
        rate = facts[name]["tokens"] / median
        print(f"{name:<15}{median:>10.3f}{facts[name]['tokens']:>8}{rate:>9.1f}{rate / plain_rate:>9.2f}x"
              f"{facts[name]['fires']:>7}{facts[name]['inserted']:>10}")
    step = statistics.median(times["plain"]) / facts["plain"]["steps"]
    for name, how in (("recycling", "blocks 20.. re-run"), ("recycling_full", "the whole model re-run")):
        recycling = facts[name]
        extra = statistics.median(times[name]) - step * recycling["steps"]
        if recycling["reruns"]:
            print(f"{name}: {recycling['fires']} firings in {recycling['reruns']} re-run steps (rows firing together "
                  f"share one) over {recycling['steps']} decode steps; cost per re-run "
                  f"{extra / recycling['reruns'] / step:.2f} of a plain decode step, per firing "
                  f"{extra / recycling['fires'] / step:.2f} (batch {args.batch}; {how})")


if __name__ == "__main__":
    main()
