"""The ``surgery`` command: ``surgery demo`` runs the main job on the embedded model.

Example:
    $ surgery demo --max-new-tokens 64 --problems 2
"""

from __future__ import annotations

import argparse

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``surgery`` console script."""
    parser = argparse.ArgumentParser(prog="surgery", description="Interventions and probes on reasoning LMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="generate plain and steered chains of thought on the embedded model")
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.add_argument("--problems", type=int, default=4, help="how many built-in problems (1-4)")
    demo.add_argument("--layer", type=int, default=15, help="block whose input gets the add")
    demo.add_argument("--scale", type=float, default=0.5, help="vector norm as a fraction of the mean residual norm")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from surgery.demo import run_demo

        run_demo(max_new_tokens=args.max_new_tokens, n_problems=args.problems, layer=args.layer,
                 scale=args.scale, seed=args.seed, device=args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
