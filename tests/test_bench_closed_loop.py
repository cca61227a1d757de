"""benchmarks/bench_closed_loop.py runs end to end (its --smoke form: a tiny random model on the CPU):
every row is timed, none fails, each closed-loop row is set against its open-loop version and
every intervention fires."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_closed_loop.py"
ROWS = ["plain", "mi", "mi_sync_free", "rr_words", "rr_peaks", "seal", "seal_gated"]


def test_the_smoke_run_prints_every_row_and_no_failure():
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    printed = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in ROWS}
    assert list(printed) == ROWS, done.stdout
    assert not any("failed:" in " ".join(cells) for cells in printed.values()), done.stdout
    assert "width 64" in done.stdout and "CPU" in done.stdout  # the model and the device are named
    for name, cells in printed.items():  # row, median s, tok/s, vs plain, [+ms/step, [vs open loop]], fires
        assert float(cells[1]) > 0 and float(cells[2]) > 0 and cells[3].endswith("x"), cells
    assert printed["plain"][3] == "1.00x"
    assert printed["rr_peaks"][6] == "rr_words" and printed["rr_peaks"][5].endswith("x"), printed["rr_peaks"]
    assert printed["seal_gated"][6] == "seal" and printed["seal_gated"][5].endswith("x"), printed["seal_gated"]
    for name in ("rr_words", "rr_peaks", "seal", "seal_gated"):  # firings counted, and every trigger fired
        assert int(printed[name][-1]) > 0, printed[name]
    for name in ("plain", "mi", "mi_sync_free"):  # nothing to fire
        assert printed[name][-1] == "-", printed[name]
