"""Rows per hour of a study run by one process vs sharded over Ray workers, side by side.

Run: python benchmarks/bench_workers.py [--problems 16] [--batch 8] [--new-tokens 128] [--reps 2]
                                        [--workers 2] [--device cpu]

The study: SmolLM2-135M-Instruct (the embedded model), the first ``--problems`` GSM8K problems of
the shipped sample (chat template), one condition with no blocks and no probes, greedy, batch
``--batch``. Rows, each run ``--reps`` times in interleaved order into a fresh output folder
(a temporary directory), medians:

  one_process   ``run_study(config)`` in this process (torch on every core), model load included
  ray_workers   ``run_study_on_ray(config, workers=N)``: N actors, each loading the model and
                running every N-th problem in batches of ``--batch`` (on CPUs each actor gets
                cores // N torch threads; on GPUs one GPU each, queued when there are fewer)

The local Ray cluster is started once before timing (as with ``--ray-address``); its start is
timed apart and shown as a second ratio with it added to every run. Rows per hour count stored
(problem, condition) records. On a shared machine the fastest run of each row is shown too (the
least disturbed by other jobs; a run with two torch threads suffers more from a third process
than two single-thread ones do). The script reports how many rows of the two runs have identical
tokens (threads change float rounding, so an occasional greedy tie may break the other way).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

import surgery  # noqa: E402
from experiments.runner import run_study  # noqa: E402
from experiments.study_config import load_study_config  # noqa: E402
from experiments.workers import run_study_on_ray  # noqa: E402

STUDY = """
name = "bench-workers"
output = "out"
[model]
name = "embedded"
device = "{device}"
[dataset]
sample = "gsm8k"
limit = {problems}
[generation]
max_new_tokens = {new_tokens}
batch_size = {batch}
[conditions.plain]
blocks = []
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto", help="the study's [model] device: auto, cpu, cuda")
    args = parser.parse_args()
    import ray

    surgery.load()  # read the weights once, so the first timed run does not pay the cold disk
    start = time.perf_counter()
    ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    ray_start = time.perf_counter() - start
    cpus = int(ray.cluster_resources().get("CPU", 0))

    def study(folder: str):
        path = Path(folder) / "study.toml"
        path.write_text(STUDY.format(device=args.device, problems=args.problems, new_tokens=args.new_tokens,
                                     batch=args.batch))
        return load_study_config(path)

    rows = {
        "one_process": lambda config: run_study(config, progress=False),
        "ray_workers": lambda config: run_study_on_ray(config, workers=args.workers, progress=False),
    }
    load = [os.getloadavg()[0]]  # other jobs on the machine change both rows, and not equally
    times: dict[str, list[float]] = {name: [] for name in rows}
    stored: dict[str, dict] = {}
    for _ in range(args.reps):
        for name, run in rows.items():
            with tempfile.TemporaryDirectory() as folder:
                config = study(folder)
                begin = time.perf_counter()
                store = run(config)
                times[name].append(time.perf_counter() - begin)
                stored[name] = {(r["problem"], r["condition"]): r["payload"] for r in store.records()}
    ray.shutdown()
    load.append(os.getloadavg()[0])

    one, two = stored["one_process"], stored["ray_workers"]
    assert sorted(one) == sorted(two) and len(one) == args.problems, "the two runs stored different rows"
    same = sum(one[key]["token_ids"] == two[key]["token_ids"] for key in one)
    tokens = sum(payload["n_tokens"] for payload in one.values())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({cpus} cores)"
    print(f"\nSmolLM2-135M-Instruct, {device}; {args.problems} GSM8K sample problems x 1 condition, batch "
          f"{args.batch}, up to {args.new_tokens} new tokens ({tokens} in all), greedy, median of {args.reps}")
    print(f"one process: {torch.get_num_threads()} torch threads; {args.workers} Ray workers: "
          f"{max(1, cpus // args.workers)} thread(s) each on CPU; Ray cluster start {ray_start:.1f} s (not in the rows)")
    print(f"rows with identical tokens in the two runs: {same}/{len(one)}; load average (1 min) {load[0]:.1f} at "
          f"the start, {load[1]:.1f} at the end, on {os.cpu_count()} CPUs")
    base = statistics.median(times["one_process"])
    fastest = min(times["one_process"])
    print(f"{'row':<14}{'median s':>10}{'rows/hour':>11}{'vs one_process':>16}{'with Ray start':>16}"
          f"{'fastest s':>11}{'fastest vs':>12}")
    for name in rows:
        median = statistics.median(times[name])
        with_start = median + (ray_start if name == "ray_workers" else 0.0)
        print(f"{name:<14}{median:>10.1f}{args.problems * 3600 / median:>11.0f}{base / median:>15.2f}x"
              f"{base / with_start:>15.2f}x{min(times[name]):>11.1f}{fastest / min(times[name]):>11.2f}x")
    print(json.dumps({name: [round(t, 2) for t in values] for name, values in times.items()}))


if __name__ == "__main__":
    main()
