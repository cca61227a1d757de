"""The ``surgery`` command: ``surgery demo`` and ``surgery run EXPERIMENT.toml``.

``surgery run`` checks the study file first (every error names the field and the fix, before
any model loads), then runs what the study's output folder lacks with a progress bar (rate and
ETA), and ends with a table per condition: accuracy with its 95 % interval, tokens, MI peaks
and thought counts. Killed at any moment, the same command continues where it stopped.
``--workers N`` shards the problems over N Ray actors (:mod:`experiments.workers`).

Example:
    $ surgery run EXPERIMENT.toml
    $ surgery run EXPERIMENT.toml --workers 2          # two Ray actors on a local cluster
    $ surgery demo --max-new-tokens 64 --problems 2
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgery", description="Interventions and probes on reasoning LMs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run", help="run a study from its TOML file (resumable: rerun the same command after a stop)",
        description="Run a study: every problem under every condition, graded, with probe summaries, "
                    "appended to the output folder's store as each finishes. The format of the file is "
                    "documented in experiments.study_config.")
    run.add_argument("study", help="the study's TOML file (EXPERIMENT.toml)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--workers", type=_positive, default=1, metavar="N",
                     help="shard the problems over N Ray actors, each with its own copy of the model (one GPU "
                          "each where there are GPUs, else an equal share of the CPU cores), all writing into "
                          "the one resumable store; needs Ray (pip install -e '.[study]'). Default 1: this "
                          "process, no Ray")
    run.add_argument("--ray-address", metavar="ADDR", default=None,
                     help="run the workers on this existing Ray cluster ('auto', 'HOST:6379' or "
                          "'ray://HOST:10001') instead of a local one started for the run; every node must see "
                          "the study's output folder at the same path")
    demo = commands.add_parser("demo", help="generate plain and steered chains of thought on the embedded model")
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.add_argument("--problems", type=int, default=4, help="how many built-in problems (1-4)")
    demo.add_argument("--layer", type=int, default=15, help="block whose input gets the add")
    demo.add_argument("--scale", type=float, default=0.5, help="vector norm as a fraction of the mean residual norm")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``surgery`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args.study, progress=not args.no_progress, workers=args.workers, address=args.ray_address)
    from surgery.demo import run_demo

    run_demo(max_new_tokens=args.max_new_tokens, n_problems=args.problems, layer=args.layer,
             scale=args.scale, seed=args.seed, device=args.device)
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _run(path: str, progress: bool, workers: int = 1, address: str | None = None) -> int:
    from experiments.config_checks import StudyConfigError
    from experiments.runner import run_study
    from experiments.store import ResultStore
    from experiments.study_config import load_study_config
    from experiments.summary import condition_summaries, format_table

    try:
        config = load_study_config(path)
        ResultStore(config.output, config.to_dict())  # another study's folder is refused here, before the model loads
    except (StudyConfigError, FileNotFoundError, ValueError) as error:
        print(f"surgery run: {error}", file=sys.stderr)
        return 2
    if workers == 1 and address is None:
        store = run_study(config, progress=progress)
    else:
        from experiments.workers import run_study_on_ray

        try:
            store = run_study_on_ray(config, workers=workers, address=address, progress=progress)
        except ImportError as error:
            print(f"surgery run: {error}", file=sys.stderr)
            return 2
    print(f"\n{config.name}: results in {store.results_path}\n")
    print(format_table(condition_summaries(store.records())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
