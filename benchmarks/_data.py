"""Prompts the benchmarks share: GSM8K test questions, read by path from ../shared."""

from __future__ import annotations

import json
from pathlib import Path

from surgery.examples import ARITHMETIC_PROBLEMS

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def gsm8k_questions(n: int) -> list[str]:
    """The first ``n`` GSM8K test questions; the built-in arithmetic problems without it."""
    if not GSM8K.exists():
        return (ARITHMETIC_PROBLEMS * n)[:n]
    with GSM8K.open() as lines:
        return [json.loads(line)["question"] for _, line in zip(range(n), lines)]
