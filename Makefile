# Two commands on a fresh machine with Python 3.11: `make book` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: book test test-fast sync check-sync release lint clean bench

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version" || { echo "needs Python 3.11 (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exactly, so the CPU wheel is used instead of a CUDA build from the registry
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

book: $(STAMP)
	$(PY) -m autograder book

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

sync: $(STAMP)
	$(PY) -m autograder sync

check-sync: $(STAMP)
	$(PY) -m autograder sync --check

release: $(STAMP)
	$(PY) -m autograder release --out _build/course

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# GPU benchmark (chapters 7, 8 and 9): a Python with CUDA PyTorch and triton and this package installed
# (with .venv's CPU wheel only the correctness gate runs). BENCH_ARGS=--quick for a smoke run.
BENCH_PYTHON ?= python3
bench:
	$(BENCH_PYTHON) benchmarks/attention.py --out benchmarks/results $(BENCH_ARGS)

clean:
	rm -rf _build
