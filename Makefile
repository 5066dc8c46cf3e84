# Two commands do all the set-up (see README.md):
#   make report   build .venv with .[report] from the lock and run the main job
#   make test     build .venv with .[report,torch,test] from the lock and run the whole test suite
# `make lock` re-resolves the locks from pyproject.toml with today's registry (then commit them).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -n 2
REPORT_OUT ?= reports/
LOCKS := requirements

# The floating-point environment the committed reports/ are made in. numpy's AVX-512 kernels of exp
# and log and XLA's AVX-512 (FP16) code give other last bits than their AVX2 ones, which moves the
# finite-difference and JAX figures; capping both at AVX2 (x86-64-v3) makes the report the same on
# every x86-64 machine that has AVX2. The certified figures do not depend on it.
REPORT_ENV := NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR" XLA_FLAGS="--xla_cpu_max_isa=AVX2"

.PHONY: report test lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The locks pin every package (torch to 2.13.0, the CPU wheel on disk: an unpinned torch would pull
# the CUDA build): report.lock is what `.[report]` resolves to, test.lock `.[report,torch,test]`.
# pip installs gradcheck with those extras and the lock's exact versions in one resolution, so a lock
# that no longer satisfies pyproject.toml fails here instead of running with other versions.
$(VENV)/.core: pyproject.toml $(LOCKS)/report.lock | $(BIN)/python
	$(BIN)/pip install --quiet -r $(LOCKS)/report.lock -e '.[report]'
	touch $@

$(VENV)/.test: pyproject.toml $(LOCKS)/test.lock | $(BIN)/python
	$(BIN)/pip install --quiet -r $(LOCKS)/test.lock -e '.[report,torch,test]'
	touch $@ $(VENV)/.core

report: $(VENV)/.core
	$(REPORT_ENV) $(BIN)/gradcheck report --out $(REPORT_OUT)

test: $(VENV)/.test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Resolve the test install afresh, then the report's packages constrained to the same versions.
lock:
	rm -rf $(VENV)-lock && $(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install --quiet -e '.[report,torch,test]'
	$(VENV)-lock/bin/pip freeze --exclude-editable | grep -v '^gradcheck' > $(LOCKS)/test.lock
	rm -rf $(VENV)-lock && $(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install --quiet -c $(LOCKS)/test.lock -e '.[report]'
	$(VENV)-lock/bin/pip freeze --exclude-editable | grep -v '^gradcheck' > $(LOCKS)/report.lock
	rm -rf $(VENV)-lock

clean:
	rm -rf $(VENV) $(VENV)-lock .pytest_cache .hypothesis
