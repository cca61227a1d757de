"""The first compile of a decode step: every decoder block inlined vs each compiled once for all layers.

Run: python benchmarks/bench_first_compile.py [--rows 16] [--batch 8] [--reps 1] [--device cpu]
(or ``surgery bench first_compile``)

Workload: SmolLM2-135M-Instruct (30 decoder blocks), the first ``--rows`` GSM8K questions in the
chat template, budgets drawn (seeded) between 16 and 64 new tokens, EOS off, through ``--batch``
slots with ``cache="static"``; a ``SteeringVector`` at resid_pre.15 on "\\n\\n" and a
``TokenMask``: what a study's compiled pool runs.

Each setting runs in a child process of its own, so nothing compiled in memory carries over:
  inlined      ``compile=True`` with ``regions: False``: dynamo inlines all 30 blocks and inductor
               compiles each (the step before surgery.decode.block_regions)
  regions      ``compile=True``: each block one nested compile region, compiled once, stamped
               out 30 times in the same single graph
  regions, disk cache   the same in a new process reusing the previous child's inductor cache
               folder (``TORCHINDUCTOR_CACHE_DIR``), what a second run of a study pays
The first two start from an empty inductor cache folder. Each child times the eager pool, the
first compiled pool (its compile included) and the compiled pool again (warm); the compile's cost
is first minus warm. Printed: those seconds, the graphs dynamo compiled, whether every prompt's
tokens equal the eager pool's, and each first compile's ratio to the inlined one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not
sys.path.insert(0, str(ROOT / "benchmarks"))

import surgery  # noqa: E402
from _data import gsm8k_questions, model_options  # noqa: E402
from interventions import SteeringVector, TokenMask  # noqa: E402


def child(regions: bool, rows: int, batch: int, device: str | None) -> dict:
    """One setting, in this (fresh) process: eager pool, first compiled pool, compiled pool again."""
    from torch._dynamo.utils import counters

    model = surgery.load(device=device)
    prompts = gsm8k_questions(rows)
    draw = random.Random(0)
    budgets = [draw.randint(16, 64) for _ in prompts]
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)).to(model.device, model.dtype)

    def pool(compile) -> tuple[list[list[int]], float]:
        blocks = [SteeringVector(vector, layer=15, alpha=0.5, when=surgery.OnText("\n\n") | surgery.StepWindow(0, None)),
                  TokenMask(["Wait", "Hmm"], penalty=-3.0)]
        with surgery.trace(model, *blocks) as tr:
            start = time.perf_counter()
            out = tr.generate(prompts, budgets, chat=True, eos_token_ids=[], batch_size=batch, cache="static",
                              compile=compile, progress=False)
            return out.token_ids, time.perf_counter() - start

    eager, eager_s = pool(False)
    options = {"fullgraph": True, "regions": regions}
    if model.device.type == "cuda":
        options["mode"] = "reduce-overhead"
    counters.clear()
    first, first_s = pool(options)
    again, again_s = pool(options)
    return {"eager_s": eager_s, "first_s": first_s, "warm_s": again_s, "graphs": counters["stats"]["unique_graphs"],
            "equal": first == eager and again == eager}


def run_child(regions: bool, cache_dir: str, args) -> dict:
    command = [sys.executable, __file__, "--child", "regions" if regions else "inlined", "--rows", str(args.rows),
               "--batch", str(args.batch)] + (["--device", args.device] if args.device else [])
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the child for regions={regions} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = model_options(__doc__.split("\n")[0], new_tokens=64, reps=1)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--child", choices=("regions", "inlined"), help=argparse.SUPPRESS)  # the parent runs each setting so
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "regions", args.rows, args.batch, args.device)))
        return

    results: dict[str, list[dict]] = {"inlined": [], "regions": [], "regions, disk cache": []}
    for _ in range(args.reps):
        with tempfile.TemporaryDirectory() as inlined_cache, tempfile.TemporaryDirectory() as regions_cache:
            results["inlined"].append(run_child(False, inlined_cache, args))
            results["regions"].append(run_child(True, regions_cache, args))
            results["regions, disk cache"].append(run_child(True, regions_cache, args))

    def median(name, key):
        return statistics.median(r[key] for r in results[name])

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nFirst compile of a pool: SmolLM2-135M-Instruct, {device}, {args.rows} GSM8K prompts, {args.batch} slots, "
          f"budgets 16-64, steering + token mask, cache='static'; median of {args.reps}, each setting a fresh process")
    print(f"{'setting':<22}{'eager s':>9}{'first s':>9}{'warm s':>8}{'compile s':>11}{'graphs':>8}{'tokens':>8}"
          f"{'vs inlined':>12}")
    base = median("inlined", "first_s") - median("inlined", "warm_s")
    for name in results:
        compile_s = median(name, "first_s") - median(name, "warm_s")
        equal = "equal" if all(r["equal"] for r in results[name]) else "DIFFER"
        print(f"{name:<22}{median(name, 'eager_s'):>9.1f}{median(name, 'first_s'):>9.1f}{median(name, 'warm_s'):>8.1f}"
              f"{compile_s:>11.1f}{median(name, 'graphs'):>8.0f}{equal:>8}{base / max(compile_s, 1e-9):>11.2f}x")


if __name__ == "__main__":
    main()
