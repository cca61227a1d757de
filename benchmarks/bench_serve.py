"""`surgery serve` at 1, 8 and 32 concurrent clients, plain and with mixed stacks, against tr.generate.

Run: python benchmarks/bench_serve.py [--requests 32] [--new-tokens 64] [--batch 8] [--clients 1,8,32]
                                      [--reps 2] [--device cpu]

The workload: SmolLM2-135M-Instruct (the embedded model), the first ``--requests`` GSM8K test
questions as chat requests, greedy, ``max_tokens = --new-tokens``, rows ending at EOS as the model
ends them. The server (``--batch`` slots) runs in this process, uvicorn on a thread on loopback,
driven by the official ``openai`` client: ``C`` client threads each send their share of the
requests one after another, non-streaming. Rows, interleaved per round, medians of ``--reps``:

  library plain   ``surgery.generate(model, prompts, T, batch_size=slots, chat=True)``: one slot pool
  library mixed   ``tr.generate(prompts, T, stacks=..., batch_size=slots)``, each prompt its own stack
  serve plain xC  the requests with no blocks, from C clients
  serve mixed xC  the same, each request with its own stack, as in the library's mixed row: a
                  steering vector with its own alpha (requests 0, 2, 4...), a token mask (1, 4, 7...),
                  the MI probe with the reference answer (3, 7, 11...); the rest none

Printed: seconds, requests per second and completion tokens per second, the server's throughput
as a share of the library's on the same prompts (its overhead: HTTP, JSON, waves), and how many
waves the last round ran and how many requests joined a running wave.
Every served completion is checked equal to the library's, request by request.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import openai  # noqa: E402

import surgery  # noqa: E402
from _data import GSM8K, model_options  # noqa: E402
from experiments.serving import ServerSettings, serve_in_thread  # noqa: E402
from interventions import SteeringVector, TokenMask  # noqa: E402
from probes import MIEstimator  # noqa: E402

LAYER = 15
MASKED = ["Wait", "Alternatively"]


def requests_and_answers(n: int) -> tuple[list[str], list[str]]:
    with GSM8K.open() as lines:
        rows = [json.loads(line) for _, line in zip(range(n), lines)]
    return [row["question"] for row in rows], [row["answer"].split("####")[-1].strip() for row in rows]


def stack_tables(i: int, answer: str) -> dict:
    """Request ``i``'s ``interventions`` and ``probes`` (the mixed workload)."""
    tables = {"interventions": [], "probes": []}
    if i % 2 == 0:
        tables["interventions"].append({"type": "steering_vector", "from": "v.safetensors", "alpha": 0.5 + i / 8})
    if i % 3 == 1:
        tables["interventions"].append({"type": "token_mask", "words": MASKED, "penalty": -3.0})
    if i % 4 == 3:
        tables["probes"].append({"type": "mi_estimator", "answers": [answer]})
    return tables


def library_stack(model, vector, i: int, answer: str, rows: int) -> list:
    """The same stack built by the library's classes (an MI probe holds one answer per row of the run)."""
    blocks = []
    if i % 2 == 0:
        blocks.append(SteeringVector(vector, layer=LAYER, alpha=0.5 + i / 8, when=surgery.OnText("\n\n")))
    if i % 3 == 1:
        blocks.append(TokenMask(words=MASKED, penalty=-3.0))
    if i % 4 == 3:
        blocks.append(MIEstimator(answers=[answer] * rows))
    return blocks


def main() -> None:
    parser = model_options(__doc__.splitlines()[0], new_tokens=64, reps=2)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", default="1,8,32")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    model = surgery.load(device=args.device)
    questions, answers = requests_and_answers(args.requests)
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)).to(model.dtype) * 2
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    surgery.save_blocks(folder / "v.safetensors",
                        [SteeringVector(vector, layer=LAYER, when=surgery.OnText("\n\n"))], model)
    n, tokens = args.requests, args.new_tokens
    expected: dict[str, list[str]] = {}

    def library(mode: str):
        def run():
            if mode == "plain":
                out = surgery.generate(model, questions, tokens, batch_size=args.batch, chat=True)
            else:
                stacks = [library_stack(model, vector, i, answers[i], n) for i in range(n)]
                with surgery.trace(model, *[b for s in stacks for b in s]) as tr:
                    out = tr.generate(questions, tokens, stacks=stacks, batch_size=args.batch, chat=True)
            expected[mode] = out.texts
            return sum(out.lengths)
        return run

    settings = ServerSettings(slots=args.batch, max_tokens=max(tokens, 16), max_queue=4 * n, files=folder)
    print(f"# {n} GSM8K chat requests x {tokens} tokens (EOS on), greedy, {args.batch} slots; SmolLM2-135M-Instruct "
          f"on {model.device}, {torch.get_num_threads()} threads; {args.reps} reps, medians")
    with serve_in_thread(settings, model=model) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=3600)
        stats_url, waves = base_url.removesuffix("/v1") + "/surgery/stats", {}

        def served(mode: str, c: int):
            def one(i: int):
                extra = stack_tables(i, answers[i]) if mode == "mixed" else None
                response = client.chat.completions.create(
                    model=model.name, messages=[{"role": "user", "content": questions[i]}], max_tokens=tokens,
                    temperature=0, extra_body=extra)
                return response.choices[0].message.content, response.usage.completion_tokens

            def client_share(k: int):
                return [(i, *one(i)) for i in range(k, n, c)]

            def run():
                before = httpx.get(stats_url).json()
                with ThreadPoolExecutor(c) as pool:
                    done = [row for share in pool.map(client_share, range(c)) for row in share]
                texts = dict((i, text) for i, text, _ in done)
                wrong = [i for i in range(n) if texts[i] != expected[mode][i]]
                if wrong:
                    raise AssertionError(f"serve {mode} x{c}: requests {wrong[:5]} differ from the library's")
                after = httpx.get(stats_url).json()
                waves[f"serve {mode} x{c}"] = (after["waves"] - before["waves"], after["joined_late"] - before["joined_late"])
                return sum(count for _, _, count in done)
            return run

        rows = {f"library {m}": library(m) for m in ("plain", "mixed")}
        rows.update({f"serve {m} x{c}": served(m, c) for m in ("plain", "mixed") for c in clients})
        times = {name: [] for name in rows}
        counts = {}
        for _ in range(args.reps):
            for name, run in rows.items():
                start = time.perf_counter()
                counts[name] = run()
                times[name].append(time.perf_counter() - start)
    print(f"{'row':<20} {'seconds':>8} {'req/s':>7} {'tok/s':>7} {'share':>6}  waves / requests that joined one late")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        library_s = statistics.median(times[f"library {name.split()[1]}"])
        share = f"{library_s / median:.2f}x" if name.startswith("serve") else ""
        joined = "{} / {}".format(*waves[name]) if name in waves else ""
        print(f"{name:<20} {median:8.2f} {n / median:7.2f} {counts[name] / median:7.1f} {share:>6}  {joined}")
    print("every served completion equal to the library's: yes")


if __name__ == "__main__":
    main()
