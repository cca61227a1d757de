"""benchmarks/bench_gpu.py runs end to end (its --smoke form: a tiny model of the same family on the
CPU), so the script a GPU session runs first is known to work before the GPU is lent."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
ROWS = ["hf_dynamic", "hf_static_compile", "ours_dynamic", "ours_static", "ours_compiled", "ours_dynamic+stack",
        "ours_static+stack", "ours_static+safe", "ours_compiled+safe"]


@pytest.mark.slow
def test_the_smoke_run_prints_every_row_and_no_failure():
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    printed = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in ROWS}
    assert set(printed) == set(ROWS), done.stdout
    assert not any("failed" in line for line in printed.values()), done.stdout
    # plain rows: greedy tokens of the float32 smoke model agree with HF generate on every row
    for name in ("hf_static_compile", "ours_dynamic", "ours_static", "ours_compiled"):
        assert printed[name].endswith("hf_dynamic: 3/3"), printed[name]
    assert printed["ours_static+stack"].endswith("ours_dynamic+stack: 3/3")
    assert printed["ours_compiled+safe"].endswith("ours_static+safe: 3/3")
    assert "stack fired: steering" in done.stdout
