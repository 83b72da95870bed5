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
	command -v bwrap >/dev/null && ldconfig -p | grep -q libseccomp.so.2 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap libseccomp2 >/dev/null) || echo 'warning: bubblewrap (bwrap) or libseccomp2 is not installed: the code reward sandbox will refuse to run (README, Rewards)'
	touch $@

# the newest SGLang 0.5.x's request types, in a directory of their own (requirements/sglang-newest.txt)
$(VENV)/sglang-newest/.installed: requirements/sglang-newest.txt | $(VENV)/.installed
	rm -rf $(VENV)/sglang-newest
	$(PY) -m pip install -q --no-deps --target $(VENV)/sglang-newest -r requirements/sglang-newest.txt
	touch $@

install: $(VENV)/.installed $(VENV)/sglang-newest/.installed

test: lint $(VENV)/sglang-newest/.installed
	$(PY) -m pytest -q

# The float-sensitive tests under other CPU kernels (vector width, thread count, MKL code path):
# their bounds follow from the arithmetic (tests/numerics.py), so each setting must pass. Every
# setting runs; the target fails at the end if any did. CI runs the plain suite only.
KERNEL_TESTS := tests/ops tests/models tests/actor tests/algorithms tests/trainer/test_cp_loss_fn.py \
	tests/trainer/test_parallel_layouts.py tests/rollout/test_local_engine.py \
	tests/rollout/test_local_engine_memory.py
KERNEL_SETTINGS := ATEN_CPU_CAPABILITY=default ATEN_CPU_CAPABILITY=avx2 ATEN_CPU_CAPABILITY=avx512 \
	OMP_NUM_THREADS=1 OMP_NUM_THREADS=2 MKL_ENABLE_INSTRUCTIONS=AVX2 MKL_ENABLE_INSTRUCTIONS=SSE4_2

test-kernels: $(VENV)/.installed
	@failed=""; for setting in $(KERNEL_SETTINGS); do \
		echo "== $$setting"; \
		out=$$(env $$setting $(PY) -m pytest -q -p no:cacheprovider $(KERNEL_TESTS) 2>&1); \
		rc=$$?; echo "$$out" | grep -E '^(FAILED|ERROR) ' ; echo "$$out" | tail -n 1; \
		[ $$rc -eq 0 ] || failed="$$failed $$setting"; \
	done; \
	if [ -n "$$failed" ]; then echo "test-kernels failed under:$$failed"; exit 1; fi; \
	echo "test-kernels: every setting passed"

# the package from its declared dependencies alone: fresh venv, train, checkpoint, resume
test-install:
	PYTHON=$(PYTHON) bash tools/install_check.sh

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

# The SGLang adapter against real SGLang servers on CPU (tests/sglang_server; README, "Real SGLang
# servers"): each of SGLANG_VERSIONS in its own environment, .venv/sglang-server-VERSION
# (tools/sglang_server_env.sh). SGLANG_CPU_MATERIAL: a folder holding SGLang's CPU kernel sources
# (sgl-kernel-cpu-src.tar.gz) and wheels/ built from them; without it only a kernel wheel already
# cached in .venv/sglang-kernels serves, and otherwise the tests skip, saying why.
SGLANG_VERSIONS ?= 0.5.23 0.5.5
SGLANG_CPU_MATERIAL ?=
test-sglang: $(VENV)/.installed
	for v in $(SGLANG_VERSIONS); do SGLANG_CPU_MATERIAL="$(SGLANG_CPU_MATERIAL)" bash tools/sglang_server_env.sh $$v || exit 1; done
	SGLANG_SERVER_VERSIONS="$(SGLANG_VERSIONS)" $(PY) -m pytest -q -p no:cacheprovider tests/sglang_server \
	|| { echo "test-sglang: FAILED above; running the tier once more with fresh servers (README, Real SGLang servers: a deviation seen once)"; \
	     SGLANG_SERVER_VERSIONS="$(SGLANG_VERSIONS)" $(PY) -m pytest -q -p no:cacheprovider tests/sglang_server; }

.PHONY: install lint test test-kernels test-install example bench quickstart test-sglang
