"""Closed-loop interventions (firing where a probe measures something) against their open-loop versions.

Run: python benchmarks/bench_closed_loop.py [--batch 8] [--new-tokens 64] [--reps 3] [--device cpu]
                                            [--rows NAME ...] [--threads N]
Check the script itself on a CPU in seconds: python benchmarks/bench_closed_loop.py --smoke

SmolLM2-135M-Instruct (the embedded model, 30 layers, width 576) on the first ``--batch`` GSM8K
test questions (chat template), greedy, every row generating exactly ``--new-tokens`` (no EOS
stop: ``eos_token_ids=[]``, so every row does the same number of decode steps). L = 21 (the
intervention layer), the thought probe one block earlier. Rows, side by side in one process,
each run once as a warm-up and then timed ``--reps`` times in interleaved order (medians):

  plain         the engine, nothing attached
  mi            MIEstimator alone (default path: the per-token pivoted Cholesky asks the host
                every 8 columns whether it has converged): the cost of measuring
  mi_sync_free  MIEstimator(sync_free=True) alone: exactly ``kernel_rank`` (64) Cholesky
                columns per token, no host sync; the path the probe takes whenever a trigger
                reads its signals, so the measuring part of rr_peaks
  rr_words      RepresentationRecycling(layer=L) on its released trigger words (open loop, the paper)
  rr_peaks      RepresentationRecycling(layer=L, when=OnSignal(mi, "peak")) next to the MI probe:
                recycle where the running Tukey fence marks an MI peak (closed loop)
  seal          SteeringVector at resid_pre.L at every generated blank line
                (``OnText("\\n\\n") & StepWindow(1)``, SEAL's trigger for a model without think tags)
  seal_gated    the same vector, where the blank line's thought is predicted reflection or
                transition by a ThoughtClassifier at resid_pre.(L-1) with a linear probe
                (``... & OnSignal(classifier, "predicted").isin(["reflection", "transition"])``)

MI needs one reference answer per row: each question's GSM8K answer (the text after "####").
Every run builds its blocks afresh inside the timed call, so the MI rows include binding the
probe at trace entry (one batched forward over the answers and the factorisation of their
kernels), as a user's run does; ``+ms/step`` spreads that one-off cost over the run's steps.

Stand-ins, built here (the cost does not depend on their values): the steering vector is a
random vector of the model's width scaled to the mean norm of the residual stream at
resid_pre.L at blank lines (real SEAL vectors come from ``surgery demo``); the linear probe is
:func:`probes.fit_linear_probe` on the states a ThoughtClassifier at resid_pre.(L-1) recorded
in a plain warm-up run of the same prompts, labels cycled over the three classes (SmolLM2 writes
few reflections, and cycling makes every class present). Closed-loop rows change the text after
their first firing, so each row's firings are its own: the table prints them (``fired()``
lengths summed over the batch) so the work done is visible next to the time.

Printed: the model and device, then per row the median seconds, tok/s (batch x new tokens over
the median), the tok/s ratio to plain (1.00 = as fast, 0.50 = half the speed), the extra time
per decode step over plain, for the closed-loop rows the tok/s ratio to their open-loop
version (rr_peaks vs rr_words, seal_gated vs seal), and the firings. A row that fails prints its
error and the others still run. ``--smoke``: a tiny random Qwen2 model with the synthetic
tokenizer of ``bench_gpu.py`` (separators and RR's words made likely so every trigger fires),
random token-id prompts, batch 3, 32 tokens, one repetition, L = n_layers // 2, MI warm-up 4,
one CPU thread.

On a CPU shared with other work, pass ``--threads 1``: with more threads than free cores, every
op waits at an OpenMP barrier for a thread that is not running, which slows each run by a
factor that changes from minute to minute, so rows timed minutes apart stop being comparable
(here, with a test suite beside it, plain SmolLM2 decoding took 0.24 s a step on one thread,
0.4 to 4.4 s on two).
"""

from __future__ import annotations

import functools
import statistics
import sys
import traceback
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not
sys.path.insert(0, str(ROOT / "benchmarks"))

import surgery  # noqa: E402
from _data import GSM8K, model_options, time_rows  # noqa: E402
from bench_gpu import EOS, PAD, SMOKE, WORDS, prompts_for, synthetic_tokenizer  # noqa: E402
from experiments.datasets import load_problems, sample_problems  # noqa: E402
from interventions import RepresentationRecycling, SteeringVector  # noqa: E402
from interventions.recycling import RR_TRIGGER_WORDS  # noqa: E402
from probes import MIEstimator, ThoughtClassifier, fit_linear_probe  # noqa: E402
from surgery.signals import OnSignal  # noqa: E402
from surgery.triggers import OnText, StepWindow  # noqa: E402

ROWS = ["plain", "mi", "mi_sync_free", "rr_words", "rr_peaks", "seal", "seal_gated"]
OPEN_LOOP = {"rr_peaks": "rr_words", "seal_gated": "seal"}
GATED = ("reflection", "transition")
CLASSES = ("execution", "reflection", "transition")
SMOKE_RR_WORDS = tuple(word for word in RR_TRIGGER_WORDS if f" {word}" in WORDS)  # what the synthetic tokenizer spells
BLANK_LINE = OnText("\n\n") & StepWindow(1)  # surgery.seal_trigger_for a model without think tags


def problems(n: int) -> list:
    """The first ``n`` GSM8K test problems (the package's GSM8K sample without ../shared)."""
    found = load_problems(GSM8K, format="gsm8k", limit=n) if GSM8K.exists() else sample_problems(n)
    return (found * n)[:n]


def smoke_model(device: str) -> surgery.Model:
    """A tiny random Qwen2 of bench_gpu's smoke shape and synthetic word-level tokenizer, float32,
    weights drawn wider (std 0.2, as tests/conftest.py's tiny models) so that its states vary and
    MI peaks come up; EOS never wins, and the unembedding rows of the separators and of RR's
    words the tokenizer has are doubled, so blank lines and recycling's words come up too."""
    config = Qwen2Config(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, initializer_range=0.2, **SMOKE)
    torch.manual_seed(0)
    with torch.device(device):
        module = Qwen2ForCausalLM(config).eval()
    module.generation_config.pad_token_id = PAD
    module.generation_config.eos_token_id = EOS
    model = surgery.wrap(module, synthetic_tokenizer(config.vocab_size), name="tiny random Qwen2 (smoke)")
    with torch.no_grad():
        head = module.get_output_embeddings().weight
        head[EOS] = 0
        head[model.vocabulary_mask(("\n\n",))] *= 2.0
        head[model.vocabulary_mask(tuple(f" {word}" for word in SMOKE_RR_WORDS))] *= 2.0
    return model


def stand_ins(model, probe_site: str, steer_site: str, prompts, generate) -> tuple:
    """One plain run with a ThoughtClassifier at each site: a linear thought probe fit on the
    states recorded at ``probe_site`` (labels cycled over the three classes) and the mean norm of
    the states at ``steer_site`` (where the vector is added)."""
    at_probe, at_steer = ThoughtClassifier(probe_site), ThoughtClassifier(steer_site)
    with surgery.trace(model, at_probe, at_steer) as tr:
        generate(tr)
    states = at_probe.result().all_states().float().cpu()
    steer_states = at_steer.result().all_states().float()
    norm = float(steer_states.norm(dim=-1).mean()) if len(steer_states) else 1.0
    if len(states) < 2 * len(CLASSES):  # too few blank lines to split: jittered copies of those there are
        base = states if len(states) else torch.randn(1, model.d_model)
        noise = torch.randn(2 * len(CLASSES), model.d_model, generator=torch.Generator().manual_seed(0))
        states = torch.cat([states, base[torch.arange(len(noise)) % len(base)] + 0.1 * noise])
    labels = [CLASSES[k % len(CLASSES)] for k in range(len(states))]
    return fit_linear_probe(states, labels), norm, len(steer_states)


def main() -> None:
    parser = model_options(__doc__.split("\n")[0], new_tokens=64, reps=3)
    parser.add_argument("--rows", nargs="*", choices=ROWS, help="only these rows (plain is always timed)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny random model on the CPU, batch 3, 32 tokens, one repetition: checks the script")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads (default: torch's choice, the cores; --smoke: 1)")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.new_tokens, args.reps = 3, 32, 1
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        model = smoke_model(args.device or "cpu")
        rr_words = SMOKE_RR_WORDS
        prompts, chat, warmup = prompts_for(args.batch, 10, model.vocab_size), False, 4
        # answers the synthetic tokenizer can spell: the GSM8K answer's digits as " d" words
        answers = ["".join(f" {c}" for c in p.answer if c.isdigit()) or " 0" for p in problems(args.batch)]
    else:
        model = surgery.load(device=args.device)
        rr_words = RR_TRIGGER_WORDS
        found = problems(args.batch)
        prompts, chat, warmup = [p.question for p in found], True, 16
        answers = [p.answer for p in found]
    layer = 21 if model.n_layers == 30 else model.n_layers // 2
    probe_site, steer_site = f"resid_pre.{layer - 1}", f"resid_pre.{layer}"
    n, batch = args.new_tokens, args.batch
    cuda = model.device.type == "cuda"

    def generate(tr):
        out = tr.generate(prompts, n, chat=chat, eos_token_ids=[], progress=False)
        if out.lengths != [n] * batch:
            raise RuntimeError(f"rows generated {out.lengths} tokens, not {n} each")
        return out

    probe, norm, thoughts = stand_ins(model, probe_site, steer_site, prompts, generate)
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    vector = (vector / vector.norm() * norm).to(model.device, model.dtype)

    def blocks(name: str) -> tuple[list, object | None]:
        """The row's blocks and the intervention whose firings are counted (None: none)."""
        if name == "plain":
            return [], None
        if name in ("mi", "mi_sync_free"):
            return [MIEstimator(answers=answers, warmup=warmup, sync_free=name == "mi_sync_free" or None)], None
        if name == "rr_words":
            rr = RepresentationRecycling(layer=layer, trigger_words=rr_words)
            return [rr], rr
        if name == "rr_peaks":
            mi = MIEstimator(answers=answers, warmup=warmup)
            rr = RepresentationRecycling(layer=layer, when=OnSignal(mi, "peak"))
            return [rr, mi], rr
        if name == "seal":
            steer = SteeringVector(vector, layer=layer, when=BLANK_LINE)
            return [steer], steer
        classifier = ThoughtClassifier(probe_site, linear_probe=probe)
        steer = SteeringVector(vector, layer=layer, when=BLANK_LINE & OnSignal(classifier, "predicted").isin(GATED))
        return [steer, classifier], steer

    fires: dict[str, int] = {}

    def run(name: str):
        attached, counted = blocks(name)
        with surgery.trace(model, *attached) as tr:
            generate(tr)
        if counted is not None:
            fires[name] = sum(map(len, counted.fired()))
        if name == "rr_peaks":  # the probe took the fixed-work path because a trigger reads it
            assert attached[1].sync_free

    names = [name for name in ROWS if not args.rows or name in args.rows or name == "plain"]
    errors: dict[str, str] = {}
    for name in names:  # warm-up; the firings
        try:
            run(name)
        except Exception as error:  # noqa: BLE001 - report and go on: the other rows still count
            errors[name] = f"{type(error).__name__}: {error}".splitlines()[0][:160]
            traceback.print_exc(limit=3)
    timed = [name for name in names if name not in errors]
    times = time_rows({name: functools.partial(run, name) for name in timed}, args.reps)
    medians = {name: statistics.median(values) for name, values in times.items()}

    device = torch.cuda.get_device_name(model.device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{model.name}: {model.n_layers} layers, width {model.d_model}, {model.dtype}, {device}"
          f"{', smoke run' if args.smoke else ''}; torch {torch.__version__}")
    print(f"batch {batch}, {n} new tokens per row (no EOS stop), {'chat template, ' if chat else ''}greedy, "
          f"median of {args.reps}; L = {layer}: recycling at block {layer}, steering at {steer_site}, thought probe "
          f"at {probe_site}; stand-ins: vector norm {norm:.1f} (mean at {steer_site} over {thoughts} blank lines of "
          f"a plain run), probe fit on {sum(probe.train_counts.values())} states with cycled labels; MI warm-up {warmup}")
    print(f"{'row':<14}{'median s':>10}{'tok/s':>9}{'vs plain':>10}{'+ms/step':>10}  {'vs open loop':<20}{'fires':>6}")
    plain = medians.get("plain")
    for name in names:
        if name in errors:
            print(f"{name:<14}  failed: {errors[name]}")
            continue
        median = medians[name]
        ratio = f"{plain / median:.2f}x" if plain else "-"
        extra = f"{(median - plain) / n * 1e3:+.1f}" if plain and name != "plain" else ""
        open_loop = OPEN_LOOP.get(name)
        versus = f"{medians[open_loop] / median:.2f}x {open_loop}" if open_loop in medians else ""
        print(f"{name:<14}{median:>10.3f}{batch * n / median:>9.1f}{ratio:>10}{extra:>10}  {versus:<20}"
              f"{fires.get(name, '-'):>6}")


if __name__ == "__main__":
    main()
