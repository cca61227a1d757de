"""A few short arithmetic word problems, for quick tries, the demo and the tests.

Each is one line, asks for a step-by-step solution, and has a small whole-number answer, so
even a 135M model produces a short chain of thought on it in seconds.

Example:
    >>> from surgery.examples import ARITHMETIC_PROBLEMS
    >>> len(ARITHMETIC_PROBLEMS), ARITHMETIC_PROBLEMS[1]
    (4, 'Solve step by step: A train travels 60 km per hour for 3 hours. How far does it go?')
"""

from __future__ import annotations

__all__ = ["ARITHMETIC_PROBLEMS"]

#: Four short word problems (answers: 10 apples, 180 km, 10 dollars, 6 groups).
ARITHMETIC_PROBLEMS = [
    "Solve step by step: Tom has 3 boxes with 4 apples each. He eats 2 apples. How many apples are left?",
    "Solve step by step: A train travels 60 km per hour for 3 hours. How far does it go?",
    "Solve step by step: Anna buys 5 pens at 2 dollars each and pays with a 20 dollar note. What is her change?",
    "Solve step by step: A class has 24 students and they form groups of 4. How many groups are there?",
]
