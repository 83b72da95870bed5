# `make test` and `make example` work on a fresh machine: they create (or reuse) .venv with
# Python 3.11, install torch==2.13.0 first so pip takes the CPU build, then this package.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: setup.py requirements/sglang-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps -r requirements/sglang-cpu.txt
	$(PY) -m pip install -q IPython  # imported by sglang.utils
	command -v bwrap >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null) || echo 'warning: bubblewrap (bwrap) is not installed: the code reward sandbox will refuse to run (README, Rewards)'
	touch $@

# the newest SGLang 0.5.x's request types, in a directory of their own (requirements/sglang-newest.txt)
$(VENV)/sglang-newest/.installed: requirements/sglang-newest.txt | $(VENV)/.installed
	rm -rf $(VENV)/sglang-newest
	$(PY) -m pip install -q --no-deps --target $(VENV)/sglang-newest -r requirements/sglang-newest.txt
	touch $@

install: $(VENV)/.installed $(VENV)/sglang-newest/.installed

test: lint $(VENV)/sglang-newest/.installed
	$(PY) -m pytest -q

# ruff's rule set and line length are in pyproject.toml
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

example: $(VENV)/.installed
	$(VENV)/bin/torchrun --nproc-per-node 2 examples/vocab_parallel_logprobs.py

bench: $(VENV)/.installed
	$(PY) -m benchmarks.logprob_entropy

# the CPU RL quick start (megatron_archer/quickstart): build, warm start, Archer under torchrun
quickstart: $(VENV)/.installed
	$(PY) -m megatron_archer.quickstart

.PHONY: install lint test example bench quickstart
