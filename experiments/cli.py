"""The ``surgery`` command: ``run``, ``report``, ``demo``, ``extract-vector``, ``extract-thought-probe``, ``bench``, ``serve``.

``surgery run`` checks the study file first (every error names the field and the fix, before
any model loads), then runs what the study's output folder lacks with a progress bar (rate and
ETA), and ends with a table per condition: accuracy with its 95 % interval, tokens, MI peaks
and thought counts, then writes the study's report (``report.html`` in the output folder, see
:mod:`experiments.report`). Killed at any moment, the same command continues where it stopped.
``surgery report`` (re)writes the report of a study folder, finished or not. ``--workers N``
shards the problems over N Ray actors (:mod:`experiments.workers`).

``surgery run STUDY --check`` checks a study without loading any weights and prints what it
checked (:mod:`experiments.study_check`; exit 1 with the errors). ``--random-weights`` runs it
offline on a model built from its ``[model] config`` with random weights and its local tokenizer
(a smoke run of the plumbing; its own output folder), and ``--limit``, ``--max-new-tokens``,
``--dataset`` and ``--output`` shrink it to seconds (:class:`~experiments.run_overrides.RunOverrides`).
Blocks whose vector a recipe makes (``extract = {...}``, :mod:`experiments.recipes`) get it first.

Example:
    $ surgery run EXPERIMENT.toml
    $ surgery run studies/replications/seal-math500.toml --check
    $ surgery run studies/replications/seal-math500.toml --random-weights --limit 2 --max-new-tokens 8 \
          --dataset ../shared/data/math500/test.jsonl
    $ surgery run EXPERIMENT.toml --workers 2          # two Ray actors on a local cluster
    $ surgery report runs/gsm8k-baselines
    $ surgery demo --problems 4 --max-new-tokens 96
    $ surgery extract-vector runs/traces seal.safetensors --layer 21
    $ surgery extract-thought-probe runs/traces thought_probe.safetensors --site resid_pre.20
    $ surgery bench engine kernels -- --reps 3
    $ surgery serve --port 8000 --files vectors     # OpenAI-compatible; see experiments.serving
"""

from __future__ import annotations

import argparse
import sys

from experiments.serving.command import add_serve_parser

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
    run.add_argument("--check", action="store_true",
                     help="check the study without loading any weights (fields, sites and layers against the model's "
                          "config, vector widths, dataset, tokenizer, output folder); print what was checked; exit 1 "
                          "on errors")
    run.add_argument("--random-weights", action="store_true",
                     help="offline smoke run: build the model from [model] config with seeded random weights and the "
                          "local [model] tokenizer (widths divided by smoke_shrink, float32 on a CPU); writes to "
                          "OUTPUT-random-weights. Its text is noise: it checks the plumbing, not the method")
    run.add_argument("--limit", type=_positive, metavar="N", help="only the first N problems (also in recipes' studies)")
    run.add_argument("--max-new-tokens", type=_positive, metavar="N", help="generate N tokens per row instead")
    run.add_argument("--dataset", metavar="FILE",
                     help="read this local file of problems instead of the study's dataset (also in recipes' studies)")
    run.add_argument("--output", metavar="FOLDER", help="write the results here instead of the study's output folder")
    run.add_argument("--ray-address", metavar="ADDR", default=None,
                     help="run the workers on this existing Ray cluster ('auto', 'HOST:6379' or "
                          "'ray://HOST:10001') instead of a local one started for the run; every node must see "
                          "the study's output folder at the same path")
    report = commands.add_parser(
        "report", help="(re)write a study's report.html and figures from its output folder",
        description="Write FOLDER/report.html (figures embedded, opens from disk) and FOLDER/report/*.png "
                    "from the results a study stored in FOLDER, and print the per-condition table.")
    report.add_argument("folder", help="the study's output folder (its config.json and results.jsonl)")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo = commands.add_parser(
        "demo", help="a small real study on GSM8K with the embedded model: traces, SEAL vector, seven conditions, report",
        description="Stage 1: the model's own traces on GSM8K sample problems 41-60, asked to check its steps. "
                    "Stage 2: a SEAL vector and a linear thought probe from them. Stage 3: the first --problems "
                    "problems under plain, SEAL steering, token mask, thinking-token insertion, representation "
                    "recycling, and two closed-loop conditions (SEAL steering gated by the thought probe, recycling at "
                    "measured MI peaks), with all three probes; then report.html. Offline, resumable (rerun after a stop). The study files it writes "
                    "(FOLDER/traces.toml, FOLDER/study.toml) run with `surgery run` too.")
    demo.add_argument("--output", default="runs/demo", metavar="FOLDER", help="where it writes (default: runs/demo)")
    demo.add_argument("--problems", type=int, default=12, help="GSM8K problems evaluated, 1-40 (default: 12)")
    demo.add_argument("--max-new-tokens", type=int, default=160, help="tokens per answer (default: 160)")
    demo.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default: 8)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    extract = commands.add_parser(
        "extract-vector", help="write a SEAL steering vector from a study's traces",
        description="SEAL's vector S = mean(execution) - mean(reflection and transition) of the residual stream "
                    "entering block --layer, read at each thought's opening blank line in the rows of one "
                    "condition of a study's output folder (prompts and the model's own token ids). The file "
                    "loads in a study as { type = \"steering_vector\", from = \"FILE\" }.")
    extract.add_argument("folder", help="the study's output folder (holds config.json and results.jsonl)")
    extract.add_argument("output", help="the vector file to write (.safetensors)")
    extract.add_argument("--condition", help="whose rows (required when the study has several conditions)")
    extract.add_argument("--layer", type=int, help="block index (default: SEAL's depth, 20/28 of the model's blocks)")
    extract.add_argument("--correct", type=int, metavar="N",
                         help="only the first N rows graded correct (SEAL's release: 500), in dataset order")
    extract.add_argument("--incorrect", type=int, metavar="N",
                         help="only the first N rows graded incorrect (SEAL's release: 500), in dataset order")
    extract.add_argument("--no-progress", action="store_true", help="no progress bar")
    probe = commands.add_parser(
        "extract-thought-probe", help="write an online thought classifier (linear probe) from a study's traces",
        description="Label every thought of the rows of one condition by SEAL's keyword rules, read its state at "
                    "--site at the opening blank line, fit a linear probe (held-out accuracy printed beside "
                    "chance) and write a ThoughtClassifier carrying it. In a study it loads as "
                    "{ type = \"thought_classifier\", from = \"FILE\" } and publishes the 'predicted' signal that "
                    "gated SEAL steering reads (OnSignal).")
    probe.add_argument("folder", help="the study's output folder (holds config.json and results.jsonl)")
    probe.add_argument("output", help="the file to write (.safetensors)")
    probe.add_argument("--condition", help="whose rows (required when the study has several conditions)")
    probe.add_argument("--site", help="where states are read (default: resid_pre of the block below SEAL's depth)")
    probe.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench = commands.add_parser(
        "bench", help="run the benchmarks (benchmarks/bench_*.py of a source checkout)",
        description="Run benchmarks side by side, each in its own process: medians and ratios. Arguments after "
                    "-- go to every named benchmark, e.g. `surgery bench engine -- --reps 3`.")
    bench.add_argument("names", nargs="*", metavar="NAME", help="which (default: all; --list names them)")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    add_serve_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``surgery`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:  # `surgery bench NAME -- ARGS`: ARGS go to the benchmarks
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = _parser()
    args = parser.parse_args(argv)
    if extra and args.command != "bench":
        parser.error(f"arguments after -- are for `surgery bench` only, not `surgery {args.command}`")
    if args.command == "run":
        return _run(args)
    if args.command == "report":
        return _report(args.folder, progress=not args.no_progress)
    try:
        if args.command == "demo":
            from experiments.demo import run_demo

            run_demo(args.output, problems=args.problems, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, device=args.device, progress=not args.no_progress)
        elif args.command == "extract-vector":
            return _extract(args)
        elif args.command == "extract-thought-probe":
            return _extract_thought_probe(args)
        elif args.command == "bench":
            return _bench(args.names, extra, args.list)
        elif args.command == "serve":
            from experiments.serving.command import serve

            return serve(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"surgery {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


def _extract_thought_probe(args) -> int:
    from experiments.extraction import extract_thought_probe, study_traces
    from experiments.study_sections import ModelSpec
    from surgery.files.saving import save_blocks

    config, _ = study_traces(args.folder, args.condition)
    model = ModelSpec(**config["model"]).load()
    classifier = extract_thought_probe(args.folder, site=args.site, condition=args.condition, model=model,
                                       progress=not args.no_progress)
    path = save_blocks(args.output, [classifier], model)
    probe = classifier.linear_probe
    print(f"{path}: thought classifier at {classifier.config.site}, linear probe over {', '.join(probe.classes)}: "
          f"held-out accuracy {probe.held_out_accuracy:.3f} (chance {probe.chance_accuracy:.3f}), "
          f"trained on {probe.train_counts}, held out {probe.test_counts}")
    return 0


def _extract(args) -> int:
    from experiments.extraction import extract_vector

    vector = extract_vector(args.folder, layer=args.layer, condition=args.condition, progress=not args.no_progress,
                            correct=args.correct, incorrect=args.incorrect)
    path = vector.save(args.output)
    counts = ", ".join(f"{label} {count}" for label, count in vector.metadata["class_counts"].items())
    print(f"{path}: SEAL vector at {vector.config.site} of {vector.metadata['model']}, |S| = {vector.vector.norm():.3f}, "
          f"from {vector.metadata['n_traces']} traces ({counts})")
    return 0


def _bench(names: list[str], extra: list[str], listing: bool) -> int:
    from experiments.bench_command import benchmark_scripts, run_benchmarks

    if listing:
        for name, script in benchmark_scripts().items():
            print(f"{name:<14}{script}")
        return 0
    return run_benchmarks(names, extra)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _run(args) -> int:
    import os

    from experiments.config_checks import StudyConfigError
    from experiments.recipes import make_vectors
    from experiments.runner import run_study
    from experiments.run_overrides import RunOverrides
    from experiments.store import ResultStore
    from experiments.study_config import load_study_config
    from experiments.summary import condition_summaries, format_table

    absolute = {key: os.path.abspath(getattr(args, key)) if getattr(args, key) else None for key in ("dataset", "output")}
    overrides = RunOverrides(random_weights=args.random_weights, limit=args.limit, max_new_tokens=args.max_new_tokens,
                             **absolute)
    if args.check:
        return _check(args.study, overrides)
    progress, workers, address = not args.no_progress, args.workers, args.ray_address
    try:
        config = load_study_config(args.study, overrides)
        if all(recipe.made for recipe in config.recipes):  # else the vectors' checksums are not known yet
            ResultStore(config.output, config.to_dict())  # another study's folder is refused here, before the model loads
    except (StudyConfigError, FileNotFoundError, ValueError) as error:
        print(f"surgery run: {error}", file=sys.stderr)
        return 2
    if config.model.random_weights:
        print(f"{config.name}: RANDOM WEIGHTS ({config.model.label}): its text is noise; this run checks the plumbing, "
              f"not the method. Results in {config.output}")
    model = None
    if not all(recipe.made for recipe in config.recipes):
        model = config.model.load()
        try:
            config = make_vectors(config, model=model, progress=progress)
            ResultStore(config.output, config.to_dict())
        except (StudyConfigError, FileNotFoundError, ValueError) as error:
            print(f"surgery run: {error}", file=sys.stderr)
            return 2
    if workers == 1 and address is None:
        store = run_study(config, model=model, progress=progress)
    else:
        from experiments.workers import run_study_on_ray

        try:
            store = run_study_on_ray(config, workers=workers, address=address, progress=progress)
        except ImportError as error:
            print(f"surgery run: {error}", file=sys.stderr)
            return 2
    print(f"\n{config.name}: results in {store.results_path}\n")
    print(format_table(condition_summaries(store.records())))
    from experiments.report import write_report

    print(f"\nreport: {write_report(store.folder, progress=progress)}")
    return 0


def _check(study: str, overrides) -> int:
    from experiments.study_check import check_study

    report = check_study(study, overrides)
    print("\n".join(report.lines))
    for error in report.errors:
        print(f"surgery run --check: {error}", file=sys.stderr)
    if report.ok:
        print(f"\nOK: {study} is ready: `surgery run {study}`" + (" --random-weights ..." if overrides.random_weights else ""))
        return 0
    print(f"\n{len(report.errors)} error(s): fix the field(s) named above", file=sys.stderr)
    return 1


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
