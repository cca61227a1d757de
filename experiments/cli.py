"""The ``surgery`` command: ``surgery demo``, ``surgery run EXPERIMENT.toml`` and ``surgery report FOLDER``.

``surgery run`` checks the study file first (every error names the field and the fix, before
any model loads), then runs what the study's output folder lacks with a progress bar (rate and
ETA), and ends with a table per condition: accuracy with its 95 % interval, tokens, MI peaks
and thought counts, then writes the study's report (``report.html`` in the output folder, see
:mod:`experiments.report`). Killed at any moment, the same command continues where it stopped.
``surgery report`` (re)writes the report of a study folder, finished or not.

Example:
    $ surgery run EXPERIMENT.toml
    $ surgery report runs/gsm8k-baselines
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
    report = commands.add_parser(
        "report", help="(re)write a study's report.html and figures from its output folder",
        description="Write FOLDER/report.html (figures embedded, opens from disk) and FOLDER/report/*.png "
                    "from the results a study stored in FOLDER, and print the per-condition table.")
    report.add_argument("folder", help="the study's output folder (its config.json and results.jsonl)")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
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
        return _run(args.study, progress=not args.no_progress)
    if args.command == "report":
        return _report(args.folder, progress=not args.no_progress)
    from surgery.demo import run_demo

    run_demo(max_new_tokens=args.max_new_tokens, n_problems=args.problems, layer=args.layer,
             scale=args.scale, seed=args.seed, device=args.device)
    return 0


def _run(path: str, progress: bool) -> int:
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
    store = run_study(config, progress=progress)
    print(f"\n{config.name}: results in {store.results_path}\n")
    print(format_table(condition_summaries(store.records())))
    from experiments.report import write_report

    print(f"\nreport: {write_report(store.folder, progress=progress)}")
    return 0


def _report(folder: str, progress: bool) -> int:
    from experiments.report import write_report
    from experiments.report_data import read_study
    from experiments.summary import format_table

    try:
        path = write_report(folder, progress=progress)
    except (FileNotFoundError, ValueError) as error:
        print(f"surgery report: {error}", file=sys.stderr)
        return 2
    print(format_table(read_study(folder).summaries))
    print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
