"""What the model benchmarks share: GSM8K test questions (read by path from ../shared), their options."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from surgery.examples import ARITHMETIC_PROBLEMS

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def gsm8k_questions(n: int) -> list[str]:
    """The first ``n`` GSM8K test questions; the built-in arithmetic problems without it."""
    if not GSM8K.exists():
        return (ARITHMETIC_PROBLEMS * n)[:n]
    with GSM8K.open() as lines:
        return [json.loads(line)["question"] for _, line in zip(range(n), lines)]


def model_options(description: str, *, new_tokens: int, reps: int) -> argparse.ArgumentParser:
    """The options every benchmark on the embedded model takes (batch, new tokens, repetitions, device)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=new_tokens)
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--device", default=None)
    return parser


def time_rows(rows: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each row, ``reps`` rounds, rows interleaved within a round (fair on a
    noisy machine); CUDA is synchronised around every call."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(reps):
        for name, fn in rows.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times
