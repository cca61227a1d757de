"""The compiled decode step: tests/compiled_step_cases.py, run in a child pytest.

The suite runs with jaxtyping's runtime type checks (``--jaxtyping-packages`` in pyproject.toml),
which wrap every function of our packages, hooks included, in a checker that torch.compile cannot
trace (it reads signature mapping proxies after the model's forward has mutated dicts). The
compiled-step cases therefore run in a child pytest without that option: the code under test is
the same, only the test-time wrappers are absent, as they are for every user.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("compiled_step_cases.py")


@pytest.mark.slow
def test_the_compiled_step_cases_pass_without_the_type_check_wrappers():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CASES.parent), str(CASES.parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra", str(CASES)],
        capture_output=True, text=True, timeout=1500, cwd=CASES.parents[1], env=env,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout.splitlines()[-1]
