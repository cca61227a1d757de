"""``surgery serve``: its options, and starting uvicorn (or Ray Serve replicas) with them.

Example:
    >>> parser = argparse.ArgumentParser()
    >>> add_serve_parser(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["serve", "--slots", "4", "--files", "."])
    >>> settings_from(args).slots, str(settings_from(args).files)
    (4, '.')
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_serve_parser", "serve", "settings_from"]


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_serve_parser(commands) -> None:
    """Add ``serve`` to the ``surgery`` command's subparsers."""
    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server; each request may bring its own interventions and probes",
        description="Serve /v1/chat/completions, /v1/completions and /v1/models (streaming and not). A request may "
                    "add 'interventions' and 'probes': lists of block tables as in a study condition, e.g. "
                    '[{"type": "steering_vector", "from": "seal.safetensors", "alpha": 1.0}]; the response adds '
                    "'surgery' (where each intervention fired, each probe's summary). Requests with different "
                    "blocks share one slot pool, each row exactly as it would run alone.")
    serve.add_argument("--model", default=None, help="HF id, folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--model-id", default=None, help="the name clients pass as 'model' (default: the model's name)")
    serve.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    serve.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="default: float32 on a CPU, bfloat16 on a GPU")
    serve.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="default: 8000")
    serve.add_argument("--slots", type=_positive, default=8, help="rows decoded together (default: 8)")
    serve.add_argument("--max-tokens", type=_positive, default=2048,
                       help="the most tokens a completion may ask for (default: 2048)")
    serve.add_argument("--max-queue", type=_positive, default=256,
                       help="requests that may wait; more are answered 429 (default: 256)")
    serve.add_argument("--cache", default="dynamic", choices=["dynamic", "static"], help="the KV cache (default: dynamic)")
    serve.add_argument("--files", type=Path, default=None, metavar="DIR",
                       help="the directory requests' 'from' files (saved vectors, .safetensors) are read from; "
                            "nothing outside it is read. Default: no files")
    serve.add_argument("--stack", action="append", default=[], metavar="NAME=FILE.json",
                       help="serve a stack under its own model name, for harnesses that cannot add request fields: "
                            'FILE.json holds {"interventions": [...], "probes": [...]} (repeatable)')
    serve.add_argument("--replicas", type=_positive, default=1,
                       help="copies of the server behind Ray Serve (one GPU each where there are GPUs); "
                            "needs pip install 'reasoning-surgery[serve]'. Default 1: this process, no Ray")
    serve.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="run the replicas on this existing Ray cluster ('auto', 'HOST:6379')")


def settings_from(args):
    """The :class:`~experiments.serving.server.ServerSettings` of parsed ``surgery serve`` arguments.

    Raises:
        ValueError: a bad ``--stack`` or a ``--files`` that is not a directory.
    """
    from experiments.serving.server import ServerSettings, read_preset  # torch loads only when serving

    if args.files is not None and not args.files.is_dir():
        raise ValueError(f"--files {args.files}: not a directory")
    presets = dict(read_preset(text) for text in args.stack)
    return ServerSettings(model=args.model, model_id=args.model_id, device=args.device, dtype=args.dtype,
                          slots=args.slots, max_tokens=args.max_tokens, max_queue=args.max_queue, files=args.files,
                          presets=presets, cache=args.cache)


def serve(args) -> int:
    """Run the server until interrupted (Ctrl-C); returns the exit status."""
    settings = settings_from(args)
    if args.replicas > 1 or args.ray_address is not None:
        from experiments.serving.replicas import serve_replicas

        serve_replicas(settings, args.replicas, args.host, args.port, args.ray_address)
        return 0
    import uvicorn

    from experiments.serving.app import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0
