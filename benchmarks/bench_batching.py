"""Fixed batches against continuous batching, side by side in one process, on rows whose lengths vary.

Run: python benchmarks/bench_batching.py [--rows 32] [--batch 8] [--min-tokens 24] [--max-tokens 96]
                                         [--workload budgets|stops] [--reps 3] [--compile]
                                         [--vectors 1,8,64] [--device cpu]
                                         [--parts batching,vectors,memory,study]
(or ``surgery bench batching -- --rows 32``)

Workload: the first ``--rows`` GSM8K test questions in the chat template on SmolLM2-135M-Instruct.
``--workload budgets`` (the default): each row has its own budget of new tokens drawn once
(seeded) between ``--min-tokens`` and ``--max-tokens`` (4x apart by default), EOS off so every
row runs to its budget: the spread is set, and the useful tokens are known exactly.
``--workload stops``: one long budget (``--max-tokens``) and EOS on, so each row ends where the
model ends it, as reasoning traces do (SmolLM2 on GSM8K at 384 tokens: 33 to 384, 10th to 90th
percentile about 4x apart, a third of the rows looping to the budget). The printout gives the
lengths' spread and the most any scheduler could gain on them.

Rows, each timed ``--reps`` times in interleaved order (the compiled ones after a warm-up run that
compiles), median reported:
  fixed        batches of ``--batch`` prompts in order, each run to its longest budget (the
               engine today: a row that has reached its budget waits, fed padding, for the
               longest row of its batch; only its own budget's tokens are useful)
  continuous   ``generate(prompts, budgets, batch_size=--batch)``: a finished row's slot is
               taken by the next prompt at once
  (``--paths dynamic,static,compiled``: the same two on each decode path, ``+static`` with
  ``cache="static"``, ``+compile`` with ``cache="static", compile=True``, timed once compiled)
Printed per row: useful tokens per second, rows per hour, the slots' idle share (slot-steps that
produced no useful token), and the ratio to ``fixed``. Before timing, the script checks that every
prompt's tokens are the same in every row (the fixed batches cut at its budget).

Then many settings at once: max(``--vectors``) GSM8K prompts in one batch, each steered: one vector shared by all rows (no stacks) against ``n`` distinct vectors (one
``SteeringVector`` each, carried by its rows through ``stacks=``, so served by one per-row table,
:mod:`surgery.decode.row_tables`) for each count in ``--vectors``; and, for the largest count, the
same blocks each run on its own (``--no-table`` row: how the engine did it before the tables).

Then memory: the KV cache of 200 prompts as one fixed batch against ``--batch`` slots.

Then one compile per study (``--parts study``): a study of 3 conditions (plain, a steering vector,
a token mask) on ``--study-problems`` GSM8K problems, ``[generation] cache = "static", compile =
true``, run once through one slot pool (``run_study``, the default) and once in batches per
condition (``continuous=False``), each from an empty compile cache: how many graphs were
compiled, the seconds to the study's first stored record and to its end. ``--study-backend
eager`` (the default on a CPU: dynamo's tracing without inductor's code generation, which takes
minutes per graph here) or ``inductor`` (what ``compile = true`` runs).
"""

from __future__ import annotations

import random
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not
sys.path.insert(0, str(ROOT / "benchmarks"))

import surgery  # noqa: E402
from _data import gsm8k_questions, model_options, time_rows  # noqa: E402
from interventions import SteeringVector  # noqa: E402
from surgery.decode.slot_forward import SlotForward  # noqa: E402


def fixed_batches(model, prompts, budgets, batch, eos=(), **options):
    """The engine without continuous batching: batches in order, each to its longest budget (or
    until its last row stops); each row's tokens cut at its own budget."""
    tokens = []
    for first in range(0, len(prompts), batch):
        chunk = slice(first, first + batch)
        out = surgery.generate(model, prompts[chunk], max(budgets[chunk]), chat=True, eos_token_ids=eos,
                               progress=False, **options)
        tokens += [row[:budget] for row, budget in zip(out.token_ids, budgets[chunk])]
    return tokens


def continuous(model, prompts, budgets, batch, eos=(), **options):
    out = surgery.generate(model, prompts, budgets, chat=True, eos_token_ids=eos, batch_size=batch, progress=False,
                           **options)
    return out.token_ids


def slot_steps(lengths, batch, fixed: bool) -> int:
    """Slot-steps each way spends on rows of these lengths: fixed batches run every slot until
    the batch's longest row ends."""
    if fixed:
        return sum(max(lengths[i : i + batch]) * len(lengths[i : i + batch]) for i in range(0, len(lengths), batch))
    return sum(lengths)  # a slot holds a row exactly for its length (plus idle slots at the very end)


def pool_steps(lengths, batch) -> int:
    """Decode steps a pool of ``batch`` slots takes over rows of these lengths, admitted in prompt
    order into the first slot that frees (the order ``generate(..., batch_size=)`` admits them)."""
    free_at = [0] * batch  # the step at which each slot's row ends
    for length in lengths:
        slot = min(range(batch), key=free_at.__getitem__)
        free_at[slot] += length
    return max(free_at)


def distinct_vectors(model, prompts, counts, layer, reps):
    """``len(prompts)`` rows, each steered: one shared vector against ``n`` distinct ones (a
    per-row table), and the largest ``n`` with each block on its own."""
    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(model.d_model, generator=generator).to(model.device, model.dtype) for _ in range(max(counts))]
    when = surgery.OnText("\n\n") | surgery.StepWindow(0, None)

    def run_with(n, table=True):
        blocks = [SteeringVector(vectors[i], layer=layer, alpha=0.5, when=when) for i in range(n)]
        if not table:  # each block on its own: one masked add (and trigger, and record) per block
            for block in blocks:
                block.table_key = lambda: None

        def run():
            with surgery.trace(model, *blocks) as tr:
                stacks = [[blocks[i % n]] for i in range(len(prompts))]
                out = tr.generate(prompts, 32, chat=True, progress=False, stacks=None if n == 1 else stacks)
            decode[name].append(out.timings["decode_s"])
            return out
        name = f"{n} vector{'s' if n > 1 else ''}" if table else f"{n}, no table"
        decode[name] = []
        return name, run

    decode: dict[str, list[float]] = {}
    rows = dict(run_with(n) for n in counts)
    if max(counts) > 1:
        rows.update([run_with(max(counts), table=False)])
    for run in rows.values():
        run()
    for seconds in decode.values():
        seconds.clear()  # the warm-up's
    times = time_rows(rows, reps)
    first = next(iter(rows))
    base, base_decode = statistics.median(times[first]), statistics.median(decode[first])
    print(f"\n{len(prompts)} rows steered at resid_pre.{layer}, 32 new tokens, median of {reps} "
          "(whole run with its prefill; decode steps alone):")
    print(f"{'setting':<16}{'median s':>10}{'vs 1 vector':>13}{'decode s':>10}{'vs 1 vector':>13}")
    for name in rows:
        median, step = statistics.median(times[name]), statistics.median(decode[name])
        print(f"{name:<16}{median:>10.3f}{median / base:>12.2f}x{step:>10.3f}{step / base_decode:>12.2f}x")


def cache_memory(model, batch):
    """KV-cache elements for 200 prompts: one fixed batch against ``batch`` slots."""
    prompts = [f"Question {i}: what is {i} plus {i % 7}?" for i in range(200)]
    budgets = [4 + i % 13 for i in range(200)]
    seen = []
    feed = SlotForward.feed

    def watch(self, *args):
        seen.append(sum(layer.keys.numel() + layer.values.numel() for layer in self.cache.layers))
        return feed(self, *args)

    SlotForward.feed = watch
    try:
        surgery.generate(model, prompts, budgets, batch_size=batch, progress=False)
    finally:
        SlotForward.feed = feed
    ids, _ = surgery.encode_prompts(model, prompts)
    config = model.module.config
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    fixed = len(prompts) * (ids.shape[1] + max(budgets)) * per_position
    print(f"\nKV cache for 200 prompts (budgets 4-16): one fixed batch {fixed / 1e6:.1f}M elements; "
          f"{batch} slots at most {max(seen) / 1e6:.2f}M ({fixed / max(seen):.0f}x less)")


STUDY = """
name = "bench-compiles"
output = "out"
[model]
name = "embedded"
device = "{device}"
[dataset]
sample = "gsm8k"
limit = {problems}
[prompt]
template = "{{question}}"
chat = true
[generation]
max_new_tokens = 16
batch_size = {batch}
cache = "static"
compile = true
[conditions.plain]
blocks = []
[conditions.steer]
blocks = [{{ type = "steering_vector", from = "vector.safetensors", alpha = 0.5 }}]
[conditions.mask]
blocks = [{{ type = "token_mask", words = ["Wait", "Step"], penalty = -3.0 }}]
"""


def study_compiles(model, problems: int, batch: int, backend: str) -> None:
    """A study of 3 conditions, compiled: one slot pool against batches per condition."""
    import tempfile
    import time

    from torch._dynamo.utils import counters

    from experiments import runner
    from experiments.study_config import load_study_config

    options = {"backend": "eager", "fullgraph": True} if backend == "eager" else True
    real_settings, real_save = runner.compile_settings, runner._save
    runner.compile_settings = lambda config: {**real_settings(config), "compile": options}
    rows = {}
    try:
        for name, continuous in (("one pool", True), ("per condition", False)):
            with tempfile.TemporaryDirectory() as folder:
                vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)).to(model.dtype)
                SteeringVector(vector, layer=15, when=surgery.OnText("\n\n")).save(Path(folder) / "vector.safetensors")
                path = Path(folder) / "study.toml"
                path.write_text(STUDY.format(device=model.device.type, problems=problems, batch=batch))
                config = load_study_config(path)
                torch._dynamo.reset()
                counters.clear()
                first = []

                def save(*args, first=first):
                    real_save(*args)
                    if not first:
                        first.append(time.perf_counter())

                runner._save = save
                start = time.perf_counter()
                runner.run_study(config, model=model, progress=False, continuous=continuous)
                rows[name] = (counters["stats"]["unique_graphs"], first[0] - start, time.perf_counter() - start)
    finally:
        runner.compile_settings, runner._save = real_settings, real_save
    print(f"\nStudy of 3 conditions x {problems} GSM8K problems, {batch} slots, 16 new tokens, compiled "
          f"({'dynamo, eager backend' if backend == 'eager' else 'inductor'}), from an empty compile cache:")
    print(f"{'run':<16}{'graphs':>8}{'first record s':>16}{'whole study s':>15}")
    for name, (graphs, ttft, total) in rows.items():
        print(f"{name:<16}{graphs:>8}{ttft:>16.1f}{total:>15.1f}")


def main() -> None:
    parser = model_options(__doc__.split("\n")[0], new_tokens=96, reps=3)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--min-tokens", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--workload", choices=("budgets", "stops"), default="budgets",
                        help="budgets: EOS off, a budget per row drawn between --min-tokens and --max-tokens; "
                             "stops: one budget of --max-tokens, rows end at EOS")
    parser.add_argument("--paths", default="dynamic", help="decode paths, each a fixed and a continuous row: "
                        "dynamic (the default cache), static (cache='static'), compiled (static, compile=True)")
    parser.add_argument("--compile", action="store_true", help="also the compiled path (--paths ...,compiled)")
    parser.add_argument("--vectors", default="1,8,64", help="distinct steering-vector counts (empty: skip)")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--parts", default="batching,vectors,memory,study", help="which parts to run")
    parser.add_argument("--study-problems", type=int, default=8)
    parser.add_argument("--study-backend", choices=("eager", "inductor"), default="eager")
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    model = surgery.load(device=args.device)
    prompts = gsm8k_questions(args.rows)
    draw = random.Random(0)
    if args.workload == "budgets":  # EOS off, each row runs to its own budget
        budgets, eos = [draw.randint(args.min_tokens, args.max_tokens) for _ in prompts], ()
    else:  # "stops": one long budget, each row ends where the model stops it (EOS)
        budgets, eos = [args.max_tokens] * len(prompts), None

    if "batching" in parts:
        ways = {"fixed": fixed_batches, "continuous": continuous}
        paths = {"dynamic": ("", {}), "static": ("+static", {"cache": "static"}),
                 "compiled": ("+compile", {"cache": "static", "compile": True})}
        chosen = args.paths.split(",") + (["compiled"] if args.compile and "compiled" not in args.paths else [])
        options = dict(paths[path] for path in chosen)
        rows = {}
        for suffix, extra in options.items():
            for name, way in ways.items():
                rows[name + suffix] = (lambda way=way, extra=extra: way(model, prompts, budgets, args.batch, eos, **extra))
        outputs: dict[str, list] = {name: [] for name in rows}
        for name, run in rows.items():  # the compiled rows' warm-up: their compile is not timed
            if name.endswith("+compile"):
                run()
        times = time_rows({name: (lambda run=run, name=name: outputs[name].append(run())) for name, run in rows.items()},
                          args.reps)
        references, agree = {}, {}  # per path: the fixed batches' tokens; whether they equal the first path's
        for name, runs in outputs.items():  # the exactness check, on every timed run
            path = name.removeprefix("fixed").removeprefix("continuous")
            reference = references.setdefault(path, runs[0])
            assert all(tokens == reference for tokens in runs), f"{name}: a prompt's tokens differ from the fixed batches'"
            agree[path] = reference == next(iter(references.values()))

        lengths = [len(tokens) for tokens in next(iter(references.values()))]
        useful, spread = sum(lengths), sorted(lengths)
        tenth, ninetieth = spread[len(spread) // 10], spread[(9 * len(spread)) // 10]
        fixed_steps = sum(max(lengths[i : i + args.batch]) for i in range(0, len(lengths), args.batch))
        pooled_steps = pool_steps(lengths, args.batch)
        device = torch.cuda.get_device_name() if model.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        workload = (f"budgets {min(budgets)}-{max(budgets)} tokens ({max(budgets) / min(budgets):.1f}x), EOS off"
                    if args.workload == "budgets" else f"budget {args.max_tokens}, rows stop at EOS")
        print(f"\nSmolLM2-135M-Instruct, {model.dtype}, {device}; {args.rows} GSM8K prompts, {args.batch} slots, "
              f"{workload}, median of {args.reps}; every prompt's tokens equal in fixed and continuous batches: yes"
              + "".join(f"; {path[1:]} path's equal the first path's: {'yes' if same else 'NO'}"
                        for path, same in list(agree.items())[1:]))
        print(f"row lengths: min {spread[0]}, 10th percentile {tenth}, median {statistics.median(spread):.0f}, "
              f"mean {useful / len(spread):.0f}, 90th percentile {ninetieth}, max {spread[-1]} "
              f"(90th/10th {ninetieth / tenth:.1f}x). Decode steps: fixed batches {fixed_steps}, a pool in "
              f"prompt order {pooled_steps}, a pool that never empties {useful / args.batch:.0f}: continuous "
              f"batching gains at most {fixed_steps / pooled_steps:.2f}x on the decode steps here (any "
              f"scheduler {slot_steps(lengths, args.batch, True) / useful:.2f}x)")
        print(f"{'row':<20}{'median s':>10}{'useful tok/s':>14}{'rows/hour':>11}{'idle slots':>12}{'vs fixed':>10}")
        for name in rows:
            median = statistics.median(times[name])
            idle = 1 - useful / (slot_steps(lengths, args.batch, name.startswith("fixed")))
            base = statistics.median(times["fixed" + name.removeprefix("fixed").removeprefix("continuous")])
            print(f"{name:<20}{median:>10.2f}{useful / median:>14.1f}{args.rows * 3600 / median:>11.0f}"
                  f"{idle:>11.0%}{base / median:>9.2f}x")
    counts = [int(n) for n in args.vectors.split(",") if n]
    if counts and "vectors" in parts:
        distinct_vectors(model, gsm8k_questions(max(counts)), counts, args.layer, args.reps)
    if "memory" in parts:
        cache_memory(model, args.batch)
    if "study" in parts:
        study_compiles(model, args.study_problems, args.batch, args.study_backend)


if __name__ == "__main__":
    main()
